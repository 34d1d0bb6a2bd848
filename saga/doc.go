// Package saga implements sagas: a business transaction across services
// as a sequence of local transactions, each updating one service's
// database and sending the message that triggers the next, with
// compensating transactions when a step fails.
//
// # Orchestration
//
// A Definition names a saga type and its steps, with typed data (a Go type
// stored as JSON with each instance). A step is local (a function run in
// the owner's database), a command to a Participant over the broker, or an
// HTTP call to a participant in any language, each remote one with a
// deadline and a number of attempts; or it is a parallel group of such
// steps. An Orchestrator keeps each
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
// failed and its own step is compensated too, since it may have run.
//
// A compensation must succeed in the end: a participant, the broker or a
// database down for a while is no reason to give up on it, nor to wake an
// operator. So a compensation unanswered is sent again for as long as the
// step's CompensationTimeout (default 10 minutes): over the broker at each
// of its deadlines, each wait twice the last (Deadline, 2×Deadline,
// 4×Deadline..., up to a minute, or Deadline if longer); over HTTP after
// the scheduler's backoff (see Steps over HTTP). A compensation that is
// refused (a Failure reply, an HTTP refusal) or, for a local step, fails,
// or one still unanswered when its CompensationTimeout has passed, parks
// the saga with the reason for an operator, who lists parked sagas (List),
// reads their history (History), and retries (RetryTx, which gives the
// compensation a new CompensationTimeout) or aborts (AbortTx) them.
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
// Participant's Handler subscribed to its command topic, or serves its
// HTTPHandler for steps called over HTTP.
//
// With HTTP steps, the scheduler makes the calls: wake it too after those
// commits (its Notify, from the same hooks and after StartTx), or a call
// starts only at the scheduler's next poll (Config.PollInterval).
//
// A choreography (services reacting to each other's events, with no
// orchestrator) is tracked as one flow by correlation id with package flow.
//
// # Parallel groups
//
// A step with Parallel set is a group of branches that run at once (fork)
// and complete together (join):
//
//	{Name: "reserve", Parallel: []saga.Step[Order]{
//		{Name: "reserve-credit", Topic: "customer.commands", Command: "shop.customer.reserve-credit", Input: credit},
//		{Name: "reserve-stock", URL: "http://inventory/reserve", Input: stock},
//	}},
//
// The transition that enters the group runs its local branches and sends
// every other branch's command or call, each with its own deadline and
// attempts, in one transaction. Each answer updates its branch, and its
// OnReply the saga's data: concurrent branches' replies are applied one
// at a time, since every transition holds the saga's row lock, so no
// update is lost. When every branch has succeeded, the saga moves on.
//
// When a branch is refused (or its attempts all pass unanswered), the saga
// compensates the group at once, in parallel: every branch that may have
// run — done, unanswered, or still in flight — gets its compensation,
// then the steps before the group are undone in reverse order, as usual. A
// branch in flight is not awaited: its participant's barrier makes the
// compensation a no-op if the action has not run there yet and refuses the
// action when it arrives, and if the action ran first, the compensation
// undoes it. This is the standard answer (null compensation and hanging
// action, handled by the barrier); it keeps a saga from waiting on its
// slowest participant to release what the others hold. A late answer to
// an abandoned action is recorded as ignored.
//
// A group has two or more branches, each local, a command or an HTTP step
// (groups do not nest), and nothing of its own; names are unique across a
// saga's steps and branches, so a branch's name is its barrier key and
// its step name in commands and in the history. The state of each branch
// (its status and attempt) is kept with the saga's row, so a restarted
// orchestrator carries on where the last one stopped.
//
// # Steps over HTTP
//
// A step with URL set is called over HTTP, so that participants in any
// language take part. Each side is a POST of the JSON of Input(data) to
// URL (a compensation to CompensationURL, when set), with the headers
//
//	Idempotency-Key     the same on every call of one side of one step of one saga
//	Troupe-Saga-Id      the saga instance
//	Troupe-Saga-Step    the step (or branch) name
//	Troupe-Saga-Op      action or compensation
//	Troupe-Saga-Source  the orchestrating service (Config.Source)
//	Troupe-Attempt      the call's number, from 1
//
// A 2xx response is success, its body the reply's data for OnReply; a 2xx
// to an action whose body could not be read whole (cut off, or over
// timer.MaxDoneBody) counts as no answer, never as a success with part of
// its data. A 409
// or 422 is a business refusal, its body the reason; any other 4xx (and a
// 3xx, which is not followed) is a refusal too. A network error, 408, 425,
// 429 and 5xx are transient: the call is made again after the scheduler's
// backoff (or the response's Retry-After). An action is called up to
// MaxAttempts times within Deadline; after that it counts as failed (the
// saga compensates it too, since it may have run). A compensation is
// called for as long as its CompensationTimeout, however many calls that
// takes, and only then parks the saga; a refusal parks it at once.
//
// No call runs inside a database transaction, yet its outcome is applied
// exactly once: the transition that sends a step stores the call as an
// HTTP task of the timer scheduler (timer.HTTPTask), whose OnDone handler
// applies the outcome like a reply, in the transaction that deletes the
// task. An orchestrator killed mid-call leaves the task to be called again
// with the same Idempotency-Key, by itself once restarted or by another
// instance; the participant answers the repeated call as the first.
// Participant.HTTPHandler serves this protocol for a Go participant, with
// the same barrier as over the broker.
//
// # Reservations
//
// Reservations builds the steps of a try / confirm / cancel business
// transaction over resources that expire (package reserve holds them at
// the participants): a parallel group of Trys, each compensated by its
// Cancel, then a parallel group of Confirms, each compensated by a Cancel
// that un-assigns. A refused Try cancels the holds taken; a Confirm is
// retried for as long as the expiry leaves time, and when it cannot
// succeed any more the confirmed resources are un-assigned and the rest
// cancelled or left to expire. So the saga completes ("order placed") only
// with every resource assigned. The expiry must cover the deadlines and
// attempts of both phases: Steps checks it when the saga is defined and
// names the numbers that conflict.
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
//
// Over HTTP (Participant.HTTPHandler) the transaction is the same but for
// the inbox and the outbox: the barrier recognizes a repeated call, the
// answer to an action is kept with the barrier's row to be given again,
// data included, and the response is the reply.
package saga
