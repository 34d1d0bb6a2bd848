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
// After the workload the harness waits until every order and saga has
// ended, every outbox message is delivered and every hold has expired or
// been confirmed, then checks the examples' invariants from the databases'
// contents (shop.CheckDatabases, delivery.CheckDatabases): credit reserved
// equals approved totals, each placed order holds exactly its packets and
// one agent, nothing assigned twice, nothing left held, and every order a
// client was answered 201 for is in its database. The Report counts
// the sagas and the faults by kind and lists the violations, which must be
// none; its last line is "violations: N".
//
//	troupe chaos --duration 2m --seed 1
package chaos
