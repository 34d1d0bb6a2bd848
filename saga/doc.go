// Package saga implements sagas: a business transaction across services
// as a sequence of local transactions, each updating one service's
// database and sending the message that triggers the next, with
// compensating transactions when a step fails.
//
// # Orchestration
//
// A Definition names a saga type and its steps, with typed data (a Go type
// stored as JSON with each instance). A step is local (a function run in
// the owner's database) or a command to a Participant over the broker,
// with a deadline and a number of attempts. An Orchestrator keeps each
// instance as a row in the owning service's database; every transition —
// StartTx, a reply (Orchestrator.Handler, through the inbox), a deadline
// (a timer, fired by the timer scheduler in its own transaction) — is one
// local transaction that records the new state, a history entry, the next
// command in the outbox and its deadline timer. No coordinator is needed.
//
// A refusal (a participant's Failure reply, or Refuse from a local step)
// compensates the completed steps in reverse order. A command unanswered
// by its deadline is sent again (a new message for the same barrier key,
// so it has no second effect); after MaxAttempts the action counts as
// failed and its own step is compensated too, since it may have run. A
// compensation that is refused, never answered, or (for a local step)
// fails parks the saga with the reason for an operator, who lists parked
// sagas (List), reads their history (History), and retries (RetryTx) or
// aborts (AbortTx) them.
//
// # Wiring a service
//
// The owning service runs, on its database: an outbox relay (its commands
// leave through it), a timer scheduler (deadlines), an inbox, and the
// orchestrator, whose Handler is subscribed to its ReplyTopic. For low
// latency, wake the relay after every commit that wrote commands: set the
// inbox's Config.AfterCommit and the scheduler's Config.OnFired to the
// relay's Notify, and call Notify after the transaction that ran StartTx.
// A participant service runs an outbox relay and an inbox, with its
// Participant's Handler subscribed to its command topic.
//
// Not yet here (see the project's issues): steps over HTTP, parallel
// groups, choreography tracking.
//
// # Protocol
//
// A command is a CloudEvents message whose type names what to do and whose
// extension attributes say which saga, step and side it serves: sagaid,
// sagastep, sagaop ("action" or "compensation") and sagareplyto (the topic
// of the reply). Its subject and correlation id are the saga id, so every
// message of one saga is partitioned together and can be listed as one
// flow. A reply has type "dev.troupe.saga.reply", the same sagaid, sagastep
// and sagaop, sagaoutcome ("success" or "failure") and, for a failure,
// sagareason; its data is the step's result. A failure is a business
// refusal, final for that command: the saga compensates rather than retry.
// Transient errors never cross the wire: the participant's transaction
// rolls back and the broker redelivers the command.
//
// # Participants
//
// A Participant runs each command in one transaction of its own database:
// the inbox claim, the barrier (inbox.BarrierTx), the step's writes, and
// the reply into its outbox. So a redelivered command does nothing, a
// command repeated by the saga (a retry after a deadline) has no second
// effect, a compensation that overtakes its action succeeds without doing
// anything (null compensation), and the action arriving after it is
// refused, so nothing stays reserved that no compensation would release.
package saga
