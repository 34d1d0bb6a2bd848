// Package chaos is Troupe's failure-injection suite: it proves "nothing
// lost, nothing applied twice, every saga ends" the way a skeptical user
// would, with separate operating-system processes.
//
// Run starts a throwaway PostgreSQL server (fsync on) with one database
// per service, a NATS JetStream server in a process of its own, and every
// service of the online shop (Order, Customer) and of food delivery
// (Order, Store, Delivery) as a process of its own (RunNode, which the
// troupe command runs as "troupe chaos node"). Clients place orders over
// HTTP while the harness, on a seeded schedule, kills a service process
// with SIGKILL and starts it again, kills the NATS server and starts it
// again on the same files, and crashes PostgreSQL (pg_ctl stop -m
// immediate, then start, replaying its log). Inside each service, the
// broker publishes a share of messages twice, holds some copies back and
// shuffles every batch (broker/faulty), and the services fail a share of
// deliveries and calls on purpose.
//
// Clients place orders over HTTP with an Idempotency-Key, send each again
// after every failure until it is taken, and send some again after their
// 201. Each service process also runs an audit consumer: it reads every
// message its service publishes, through an inbox of its own, and records
// each one in a table without a unique key.
//
// After the workload the harness waits until every order, saga and flow
// has ended, every outbox message is delivered and audited, and every
// hold has expired or been confirmed. It then checks the invariants from
// the databases' contents:
//
//   - the examples' own (shop.CheckDatabases, delivery.CheckDatabases):
//     credit reserved equals approved totals, each placed order holds
//     exactly its packets and one agent, nothing assigned twice, nothing
//     left held;
//   - no message recorded twice by an audit (an effect applied twice);
//   - no outbox message left unaudited (a message lost);
//   - every order a client was answered 201 for is in its database, and
//     one order per Idempotency-Key.
//
// The Report counts the sagas, the faults by kind and the messages
// dead-lettered, and lists the violations, which must be none; its last
// line is "violations: N".
//
//	troupe chaos --duration 2m --seed 1
package chaos
