// Package inbox makes message consumers idempotent: every message has its
// effect on the consumer's database exactly once per consumer group, although
// brokers deliver at least once.
//
// # How
//
// The inbox keeps a table, troupe_inbox(consumer, message_id, source,
// handled_at), whose primary key is (consumer, message_id, source): a message
// is known by its id and source, which CloudEvents makes unique together, so
// two producers that happen to use the same ids do not shadow each other. A handler's database effect
// and the message's inbox row are written in one transaction: they commit
// together or not at all. A message delivered again finds its row and is
// acknowledged without calling the handler; a crash before the commit leaves
// neither effect nor row, so the redelivery does the work.
//
//	ib, err := inbox.New(db, inbox.Config{})
//	h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
//		_, err := tx.Exec(ctx, "UPDATE accounts SET ...", ...)
//		return err
//	})
//	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "shop.orders", Group: "billing"}, h)
//
// # Batches, and savepoints when a handler fails
//
// Throughput comes from batching: each batch the broker delivers is handled
// in one transaction, so a batch of 100 messages costs one commit (one fsync)
// instead of 100. The inbox claims the rows of the whole batch in one
// INSERT, then runs each message's handler in turn in that transaction,
// with nothing in between, and commits: on PostgreSQL a batch costs its
// handlers' statements plus two round trips, the claim and the commit.
//
// A handler that fails (returns an error or panics) rolls the whole
// transaction back, and the batch runs again in a new one where each
// message runs under a SAVEPOINT: a handler that fails there has its
// writes, and its inbox row, rolled back to the savepoint, and the rest of
// the batch commits. The message that failed first is not run again in
// that second transaction; it keeps its first error (but for PostgreSQL's
// "current transaction is aborted", which is another handler's fault). So
// a failing handler is called once per delivery, while a handler that
// succeeded may be called a second time when another message of its batch
// failed: its writes through tx are applied once, but what it does outside
// tx (calling another service) may happen twice, as it may on any
// redelivery. The second transaction costs one more round trip per message
// (RELEASE SAVEPOINT and the next SAVEPOINT travel together) and, on
// PostgreSQL, a subtransaction for each savepoint in which a handler
// writes; more than 64 of them in one transaction overflow the server's
// per-backend subtransaction cache, which can slow other sessions'
// visibility checks while it runs. Batches that fail often are best kept
// to 64 messages or fewer (SubscribeConfig.MaxBatch).
//
// After the commit the inbox settles each delivery: handled messages and
// duplicates are acknowledged, transient failures Nak'ed with a backoff
// delay computed from the delivery's attempt (Config.Backoff; by default
// exponential from 1 s to 5 min with jitter), and failures wrapped with
// Permanent dead-lettered with the error as the reason. A message that
// keeps failing is dead-lettered by the broker on its subscription's last
// attempt (MaxDeliver), or by the inbox at Config.MaxAttempts, which puts
// the last error in the reason.
//
// A transaction whose handlers all succeeded can still fail to commit: a
// deferred constraint is violated, or, on PostgreSQL, a handler returned
// nil after one of its statements failed, which aborts the transaction.
// The inbox then handles the batch's messages again one per transaction,
// so the others commit, and the message that cannot commit alone fails
// with the commit's error, like a transient handler error (Nak'ed, and
// dead-lettered at Config.MaxAttempts with that error). If the database
// cannot be reached, nothing of the batch is written and every message is
// Nak'ed.
//
// # Concurrent duplicates
//
// Two consumers of a group can receive the same message at the same time
// (a redelivery after AckWait while the first is still working). On
// PostgreSQL the second one's insert of the inbox row waits for the first's
// transaction: if it commits, the insert finds the row and the second
// acknowledges without effect; if it rolls back, the second does the work.
// On SQLite write transactions are serialized (BEGIN IMMEDIATE), so the
// second transaction starts only after the first has ended, with the same
// result. A handler holding row locks of its own in another order than the
// inbox row can still deadlock with a concurrent duplicate on PostgreSQL;
// the database then aborts one transaction, whose batch is Nak'ed and
// retried.
//
// The handler's ctx carries the message being handled (message.WithCause):
// messages the handler adds to an outbox in the same tx take their
// correlation id, causation id and trace parent from it.
//
// # Retention
//
// Inbox rows are deleted Config.Retention (default 7 days) after their
// message was handled, by Prune or by Run in the background, in bounded
// batches. Retention must exceed the longest time after which the broker
// may deliver a copy of a handled message: the redelivery horizon (AckWait
// × MaxDeliver plus Nak delays, for a message whose acknowledgement was
// lost) and the time a re-published copy can still reach the group (for
// NATS JetStream, the stream's MaxAge when a relay re-publishes after the
// dedup window; for Kafka, the topic's retention when a group is reset to
// replay). A copy arriving after its row was pruned is handled again.
//
// # The saga barrier
//
// A saga participant runs each side of a step (its action, its
// compensation) through BarrierTx, in the transaction that applies it. The
// barrier's rows, keyed by saga id, step and side, absorb the three
// anomalies of sagas over an at-least-once transport: a duplicate request
// has no second effect; a compensation that arrives before its action
// succeeds as a no-op (a null compensation); and the late action is then
// refused, so nothing stays reserved that no compensation will release.
// Barrier rows are kept (Prune does not delete them): a late action may
// arrive at any time after its compensation.
package inbox
