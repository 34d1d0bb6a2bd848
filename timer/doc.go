// Package timer provides durable timers and scheduled tasks: a message
// delivered at a time, a recurring schedule (cron or fixed interval), or an
// HTTP call made at a time, stored in the service's own database and fired
// once, even when processes crash, restart, or run several at a time.
//
// # Scheduling
//
// A Scheduler writes timers through the caller's transaction, like the
// outbox: the timer exists exactly when the business change that asked for
// it commits.
//
//	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
//		// ... the business change ...
//		return sched.ScheduleTx(ctx, tx, deadline, timer.ToTopic("orders"), msg)
//	})
//
// A timer targets a topic (its message is written to the outbox when it
// fires, and published by the relay) or a local handler registered with
// Handle (it runs in the firing transaction). CancelTx and RescheduleTx take
// the caller's transaction too. A timer's id is its message's id, so a
// service that derives the id from its data can cancel it without storing
// it. PutScheduleTx stores a recurring Schedule; ScheduleHTTPTx an HTTPTask.
// ScheduleLaterTx and TryCancelLaterTx are for callers that would ignore
// the answer (ErrExists, whether a timer was cancelled): their statement is
// queued with sqldb.ExecLater, so on PostgreSQL it costs no round trip of
// its own.
//
// # Firing
//
// Run fires due timers in batches: one transaction claims up to BatchSize
// due timers, oldest first, applies their effects (outbox rows, handler
// writes) and deletes them. On PostgreSQL the claim is SELECT ... FOR UPDATE
// SKIP LOCKED, so any number of schedulers share the work without
// coordination; the transaction is their lease, ended by the server if its
// holder dies (at once) or hangs (after LeaseTTL idle). On SQLite the
// database's write lock serializes the firing transactions. After downtime,
// overdue timers fire at once, in due order (with Config.FireConcurrency
// above 1, batches are claimed in due order but may commit out of it). A pending timer costs an index
// entry, not memory: a scheduler holds one batch at a time, and between
// batches waits until the next due time (read from the index), a Notify, or
// PollInterval, whichever comes first.
//
// # What is exactly once, and what is at least once
//
//   - Firing into the outbox or a local handler is exactly once. The
//     timer's deletion and its effect (the outbox row, the handler's
//     writes) commit in one transaction: either both happen or neither, and
//     a timer row can be deleted only once. A crash before the commit rolls
//     both back and the timer fires later; a crash after it leaves nothing
//     to fire again. What is exactly once is the handler's writes through
//     its tx, not its calls: a handler may run again for the same firing
//     (its batch rolled back because another timer failed), so it must not
//     act outside tx. A timer whose batch cannot commit (a deferred
//     constraint, a server that ended the transaction) is found by firing
//     the oldest due timer alone, and charged the attempt, so one poison
//     timer never stalls the others.
//   - What follows the outbox is at least once, made effectively once by
//     ids: the relay publishes the fired message until the broker
//     acknowledges it, possibly more than once, always with the same
//     message id; a consumer behind an inbox (package inbox) applies it
//     once.
//   - An HTTP call is at least once. The outcome is recorded after the
//     response, so a crash, a lost response, or a timeout after the
//     receiver acted repeats the call. Every attempt carries the same
//     Idempotency-Key header (the task's id), which the receiver must use
//     to apply the call once. With HTTPTask.OnDone, the call's outcome is
//     applied exactly once, by the named handler, in the transaction that
//     deletes the task.
//   - Each occurrence of a recurring schedule is one timer, with an id made
//     of the schedule's name and the occurrence time, inserted by the
//     transaction that fired the previous occurrence: so every occurrence
//     fires once across all instances, with the guarantee of its target.
//
// # Time
//
// Every time the package reads (what is due, retry delays, leases of HTTP
// tasks) comes from Config.Clock, so tests move time instead of sleeping.
// Due times are stored in UTC; cron expressions are read in the schedule's
// time zone.
package timer
