// Package saga implements sagas: a business transaction across services
// as a sequence of local transactions, each updating one service's
// database and sending the message that triggers the next, with
// compensating transactions when a step fails.
//
// This version holds the wire protocol and the participant side; the
// orchestrator (the persistent state machine in the owning service) builds
// on both.
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
