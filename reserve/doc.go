// Package reserve holds individual resources for a while: a specific food
// packet, a specific delivery agent, not a counter of stock. It is the
// participant's side of try / confirm / cancel, with expiry: Try holds a
// free resource until a deadline, Confirm assigns it to its owner, Cancel
// releases it, and a durable timer releases it at the deadline if neither
// came. So an order is placed only with every resource assigned, and
// nothing stays held forever because a coordinator died.
//
// # Resources and reservations
//
// A resource is a row of troupe_resources, named by its pool (the packets
// of one dish, the agents) and its id, and is free, held by one
// reservation, or assigned to a confirmed reservation's owner. Resources
// enter and leave a pool with Add and Remove. A reservation is a row of
// troupe_reservations, named by the caller's id, and moves through these
// states:
//
//	Try     → held (a resource is taken)  or  refused (none was free)
//	held    → confirmed (Confirm: the resource is assigned)
//	held    → expired (the timer, or a call finding it past its expiry)
//	held, confirmed → cancelled (Cancel: the resource is free again)
//	(none)  → cancelled (a Cancel before its Try)
//
// # No double holding
//
// Try takes a resource with a conditional write of its row, from free to
// held, so two transactions can never both take it: the second finds it
// taken. On PostgreSQL, a Try for any resource of a pool picks one with FOR
// UPDATE SKIP LOCKED, so concurrent Trys take different resources instead
// of queueing on the same one; when every free resource is being taken by
// another transaction, it waits for them, so a refusal (ErrUnavailable)
// means the pool had nothing free. The take deletes the free row and
// inserts it back held rather than update it: a Try that waited for a row
// being taken then skips it without locking it, so a Try locks only the
// resource it takes, and transactions that make one Try each never
// deadlock. On SQLite the write lock serializes Trys. The partial unique
// index on the holding reservation lets no reservation hold two
// resources.
//
// # Expiry
//
// Try schedules, in its transaction, a timer (package timer) due at the
// reservation's expiry, targeting the handler ExpireHandler, which New
// registers: it fires once, in a transaction that releases the resource if
// the reservation is still held (a confirmed one stays assigned). Confirm
// reads the clock (Config.Now) too: past the expiry, a held reservation is
// released on the spot and Confirm fails with ErrReservationExpired, even
// if the timer has not fired yet, so a released resource is never
// assigned. Until the timer (or such a call) releases it, a resource whose
// reservation expired is not free for other Trys: the delay is the
// scheduler's (at most its Config.PollInterval when it runs).
//
// # Idempotent, and safe against reordering
//
// A reservation's row is its own barrier, in the manner of inbox.BarrierTx
// for saga steps, so that retried, duplicated and reordered calls are safe
// over any transport:
//
//   - A repeated Try, Confirm or Cancel has no second effect, and answers
//     from the row: a repeated Try is not refused because the pool has
//     since run out, and a refused one is not granted because a resource
//     has since been freed.
//   - A Cancel that arrives before its Try records the reservation as
//     cancelled (there is nothing to release); the late Try is refused with
//     ErrCancelled, so it cannot hold what no Cancel would release.
//   - A Cancel after Confirm un-assigns the resource; a repeated Cancel
//     never releases a resource that another reservation has taken since.
//
// Every call takes the reservation's row first (concurrent calls for one
// id wait for each other), then the resource's: so calls for one
// reservation serialize, and a Confirm or Cancel racing with the expiry
// timer either goes first (the timer then finds nothing to do) or waits
// for it and answers from what it did.
//
// # Refusals, and transactions
//
// Every call has a transactional twin (TryTx, ConfirmTx, CancelTx), so a
// participant applies it in the transaction that records its inbox row and
// its reply. ErrUnavailable, ErrReservationExpired and ErrCancelled are
// business refusals and match ErrRefused: the transaction is unharmed, and
// committing it records the refusal, so a repeated call answers the same
// (Try, Confirm and Cancel without Tx commit it themselves). In a saga,
// answer a refusal with a failure reply: the saga compensates. Other
// errors call for a rollback and a retry.
//
// In an order saga (saga.Reservations; HandleSaga serves its commands),
// Try is a step's action and Cancel its compensation, with the
// reservation id derived from the saga id and the reservation's name
// (SagaReservationID), so that retries carry it; Confirm is a later step, once every
// resource is held. The customer sees "Order placed" only when every
// Confirm succeeded; a Confirm refused with ErrReservationExpired fails the
// saga, whose compensations Cancel the others.
package reserve
