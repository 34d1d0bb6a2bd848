package reserve

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Try asks to hold a resource until an expiry.
type Try struct {
	// ID identifies the reservation: a repeated Try with the same ID has
	// no second effect, and Confirm and Cancel name the reservation by it.
	// Derive it from the request (an order and its line, a saga and its
	// step), so that a retry carries the same ID. Required.
	ID string
	// Pool is the pool to reserve in, e.g. the packets of one dish.
	// Required.
	Pool string
	// Resource is the resource wanted. Default "": any free one (the first
	// by id that no concurrent Try is taking).
	Resource string
	// Owner is who the resource is for, e.g. an order id. Required.
	Owner string
	// ExpiresAt is when the hold ends unless Confirm came first. Required,
	// and after now.
	ExpiresAt time.Time
}

func (t Try) validate(now time.Time) error {
	var errs []error
	if t.ID == "" {
		errs = append(errs, errors.New("empty ID"))
	}
	if t.Pool == "" {
		errs = append(errs, errors.New("empty Pool"))
	}
	if t.Owner == "" {
		errs = append(errs, errors.New("empty Owner"))
	}
	if !t.ExpiresAt.After(now) {
		errs = append(errs, fmt.Errorf("ExpiresAt %s is not after now (%s)", t.ExpiresAt.UTC().Format(time.RFC3339Nano), now.Format(time.RFC3339Nano)))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: try %q: %w", ErrInvalid, t.ID, err)
	}
	return nil
}

// TryTx holds a free resource of t.Pool (or t.Resource) for reservation
// t.ID until t.ExpiresAt, and schedules, in tx, the timer that releases it
// then. Two reservations never hold the same resource: the resource is
// taken by a conditional write of its row (state free to held: an UPDATE
// on SQLite, a DELETE of the free row and an INSERT of the held one on
// PostgreSQL), which concurrent transactions cannot both make. On
// PostgreSQL, concurrent Trys for any resource skip the rows other
// transactions are taking (FOR UPDATE SKIP LOCKED), and wait for them only
// when no other is free, so a pool runs out exactly when it is empty.
// Transactions that make one Try each never deadlock. (Two transactions
// that each take several resources of a short pool can: PostgreSQL aborts
// one, whose error is transient: retry it.)
//
// When nothing is free (or t.Resource is not free, or not in the pool),
// the reservation is recorded as refused and TryTx returns it with an
// error matching ErrUnavailable. Commit tx anyway to keep the refusal: a
// repeated Try then answers the same.
//
// A Try whose ID is already recorded does nothing and answers from the
// record: nil while the reservation is held or confirmed, ErrUnavailable
// if it was refused, ErrCancelled if it was cancelled (also by a Cancel
// that arrived before this Try: the late Try must not hold what no Cancel
// will release), ErrReservationExpired past its expiry. A recorded ID with
// another pool or owner is ErrInvalid.
func (r *Reserver) TryTx(ctx context.Context, tx sqldb.Tx, t Try) (Reservation, error) {
	now := stamp(r.now())
	if err := t.validate(now); err != nil {
		return Reservation{}, err
	}
	exp := stamp(t.ExpiresAt)
	// The reservation's row first: a concurrent Try or Cancel of the same
	// ID waits here for this transaction, then finds the row.
	n, err := tx.Exec(ctx, `INSERT INTO troupe_reservations (id, pool, owner, state, expires_at, created_at, updated_at)
		VALUES ($1, $2, $3, 'held', $4, $5, $5) ON CONFLICT (id) DO NOTHING`, t.ID, t.Pool, t.Owner, exp, now)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: %w", t.ID, err)
	}
	if n == 0 {
		return r.repeatTry(ctx, tx, t, now)
	}

	res := Reservation{ID: t.ID, Pool: t.Pool, Owner: t.Owner, State: Held, ExpiresAt: exp, CreatedAt: now, UpdatedAt: now}
	res.Resource, err = take(ctx, tx, t, now)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: take a resource of pool %q: %w", t.ID, t.Pool, err)
	}
	if res.Resource == "" {
		res.State = Refused
		if err := sqldb.ExecLater(ctx, tx, `UPDATE troupe_reservations SET state = 'refused' WHERE id = $1`, t.ID); err != nil {
			return Reservation{}, fmt.Errorf("reserve: try %q: record the refusal: %w", t.ID, err)
		}
		return res, answer(res, now)
	}
	if err := sqldb.ExecLater(ctx, tx, `UPDATE troupe_reservations SET resource = $2 WHERE id = $1`, t.ID, res.Resource); err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: %w", t.ID, err)
	}
	m := message.New(source, expireType, nil)
	m.ID, m.Subject, m.Time = timerID(t.ID), t.ID, now
	if err := r.sched.ScheduleTx(ctx, tx, exp, timer.ToHandler(ExpireHandler), m); err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: schedule the expiry: %w", t.ID, err)
	}
	return res, nil
}

// take holds a free resource for t and returns its id, or "" if none is
// free.
func take(ctx context.Context, tx sqldb.Tx, t Try, now time.Time) (string, error) {
	if tx.Dialect() != sqldb.Postgres {
		// SQLite: the transaction holds the database's write lock, so a
		// conditional UPDATE takes the first free resource unopposed.
		const hold = `UPDATE troupe_resources SET state = 'held', reservation = $2, owner = $3, updated_at = $4
			WHERE pool = $1 AND state = 'free' AND id = %s RETURNING id`
		if t.Resource != "" {
			return returnedID(tx.QueryRow(ctx, fmt.Sprintf(hold, "$5"), t.Pool, t.ID, t.Owner, now, t.Resource))
		}
		return returnedID(tx.QueryRow(ctx, fmt.Sprintf(hold, firstFree("")), t.Pool, t.ID, t.Owner, now))
	}
	if t.Resource != "" {
		// The row's lock decides between concurrent Trys: the second one
		// waits for the first and finds the resource gone from the free
		// ones.
		return returnedID(tx.QueryRow(ctx, fmt.Sprintf(takePostgres, "$5"), t.Pool, t.ID, t.Owner, now, t.Resource))
	}
	// Take one that no other transaction is taking; if there is none,
	// wait for those transactions, one of which may roll back: a refusal
	// then means the pool has nothing free, not that it was busy.
	id, err := returnedID(tx.QueryRow(ctx, fmt.Sprintf(takePostgres, firstFree(" FOR UPDATE SKIP LOCKED")), t.Pool, t.ID, t.Owner, now))
	if id != "" || err != nil {
		return id, err
	}
	return returnedID(tx.QueryRow(ctx, fmt.Sprintf(takePostgres, firstFree(" FOR UPDATE")), t.Pool, t.ID, t.Owner, now))
}

// takePostgres takes, on PostgreSQL, the free resource of pool $1 that %s
// names, for reservation $2 of owner $3 at $4: it deletes the free row and
// inserts it back held, in one statement, where an UPDATE would let
// concurrent Trys deadlock.
//
// Under READ COMMITTED, a statement that locks a row updated since its
// snapshot (FOR UPDATE, or to update it) locks the newest version, then
// re-checks its WHERE clause; a version that no longer matches is skipped
// but stays locked until the transaction ends. When takes updated, a Try
// thus kept locks on packets taken under it, and the cycle came from that:
// Try C's SKIP LOCKED statement locked packet-1, just taken, and found
// nothing free; C's waiting statement, which starts from the lowest id,
// queued for packet-0 behind Try A; A had waited for packet-0's taker and
// then waited for Try B, which had locked packet-0's newest version the
// same way; and B's waiting statement waited for C's lock on packet-1.
// PostgreSQL broke the cycle by aborting one (SQLSTATE 40P01).
//
// A deleted row is skipped without being locked, and no free row is ever
// updated (a release updates a held or assigned row), so a Try locks only
// the resource it takes, and waits only for transactions taking (or
// removing) a free one: transactions that make one Try each never
// deadlock, and a refused Try keeps no lock for a Confirm to wait for. The
// write costs what the UPDATE did: an UPDATE of indexed columns writes a
// new row version and its index entries too. The INSERT names every column
// of troupe_resources: a migration that adds one must carry it over here.
const takePostgres = `WITH taken AS (
		DELETE FROM troupe_resources WHERE pool = $1 AND state = 'free' AND id = %s RETURNING pool, id)
	INSERT INTO troupe_resources (pool, id, state, reservation, owner, updated_at)
		SELECT pool, id, 'held', $2::text, $3::text, $4::timestamptz FROM taken
	RETURNING id`

// firstFree is the subquery that picks the first free resource of pool
// $1, by id, locked as lock says.
func firstFree(lock string) string {
	return `(SELECT id FROM troupe_resources WHERE pool = $1 AND state = 'free' ORDER BY id LIMIT 1` + lock + `)`
}

// returnedID reads the id a RETURNING clause returned, "" for no row.
func returnedID(row sqldb.Row) (string, error) {
	var id string
	err := row.Scan(&id)
	if errors.Is(err, sqldb.ErrNoRows) {
		return "", nil
	}
	return id, err
}

// repeatTry answers a Try whose reservation is recorded.
func (r *Reserver) repeatTry(ctx context.Context, tx sqldb.Tx, t Try, now time.Time) (Reservation, error) {
	res, err := lock(ctx, tx, t.ID)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: %w", t.ID, err)
	}
	if res.Pool != "" && (res.Pool != t.Pool || res.Owner != t.Owner) {
		return Reservation{}, fmt.Errorf("%w: try %q for owner %q in pool %q: the reservation id is taken by owner %q in pool %q",
			ErrInvalid, t.ID, t.Owner, t.Pool, res.Owner, res.Pool)
	}
	if err := r.expireIfDue(ctx, tx, &res, now); err != nil {
		return Reservation{}, fmt.Errorf("reserve: try %q: %w", t.ID, err)
	}
	return res, answer(res, now)
}

// ConfirmTx assigns the resource held by reservation id to its owner, for
// good, and cancels its expiry timer. Only a held reservation whose expiry
// has not passed (by Config.Now) is confirmed: past it, the resource is
// released (if the timer has not done so yet), never assigned, and
// ConfirmTx returns an error matching ErrReservationExpired; commit tx to
// release it at once.
//
// A confirmed reservation is confirmed again with no second effect (nil
// error). A cancelled one gives ErrCancelled, a refused one ErrUnavailable,
// an unknown id ErrNotFound.
func (r *Reserver) ConfirmTx(ctx context.Context, tx sqldb.Tx, id string) (Reservation, error) {
	if id == "" {
		return Reservation{}, fmt.Errorf("%w: confirm: empty id", ErrInvalid)
	}
	now := stamp(r.now())
	res, err := lock(ctx, tx, id)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: %w", id, err)
	}
	if err := r.expireIfDue(ctx, tx, &res, now); err != nil {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: %w", id, err)
	}
	if res.State != Held {
		return res, answer(res, now)
	}
	n, err := tx.Exec(ctx, `UPDATE troupe_resources SET state = 'assigned', updated_at = $4
		WHERE pool = $1 AND id = $2 AND reservation = $3 AND state = 'held'`, res.Pool, res.Resource, res.ID, now)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: assign resource %q: %w", id, res.Resource, err)
	}
	if n != 1 {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: resource %q of pool %q is not held by the reservation", id, res.Resource, res.Pool)
	}
	if err := sqldb.ExecLater(ctx, tx, `UPDATE troupe_reservations SET state = 'confirmed', updated_at = $2 WHERE id = $1`, id, now); err != nil {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: %w", id, err)
	}
	// Not waiting: a scheduler firing the timer waits for the row this
	// transaction holds, then finds the reservation confirmed.
	if _, err := r.sched.TryCancelTx(ctx, tx, timerID(id)); err != nil {
		return Reservation{}, fmt.Errorf("reserve: confirm %q: %w", id, err)
	}
	res.State, res.UpdatedAt = Confirmed, now
	return res, nil
}

// CancelTx releases the resource of reservation id, held or assigned, and
// records the reservation cancelled. It never refuses: an expired,
// refused or already cancelled reservation is left as it is, with no
// second effect, so a repeated Cancel never releases a resource that
// another reservation has taken since.
//
// A Cancel that arrives before its Try (the Try is late, or lost) records
// the reservation as cancelled, with nothing to release; the late Try is
// then refused with ErrCancelled, so nothing stays held that no Cancel
// would release.
func (r *Reserver) CancelTx(ctx context.Context, tx sqldb.Tx, id string) (Reservation, error) {
	if id == "" {
		return Reservation{}, fmt.Errorf("%w: cancel: empty id", ErrInvalid)
	}
	now := stamp(r.now())
	n, err := tx.Exec(ctx, `INSERT INTO troupe_reservations (id, pool, state, created_at, updated_at)
		VALUES ($1, '', 'cancelled', $2, $2) ON CONFLICT (id) DO NOTHING`, id, now)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: cancel %q: %w", id, err)
	}
	if n == 1 {
		return Reservation{ID: id, State: Cancelled, CreatedAt: now, UpdatedAt: now}, nil
	}
	res, err := lock(ctx, tx, id)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: cancel %q: %w", id, err)
	}
	if res.State == Held || res.State == Confirmed {
		if err := r.release(ctx, tx, &res, Cancelled, now, res.State == Held); err != nil {
			return Reservation{}, fmt.Errorf("reserve: cancel %q: %w", id, err)
		}
	}
	return res, nil
}

// Try is TryTx in a transaction of its own, committed on success and on a
// refusal.
func (r *Reserver) Try(ctx context.Context, t Try) (Reservation, error) {
	return r.inTx(ctx, func(ctx context.Context, tx sqldb.Tx) (Reservation, error) { return r.TryTx(ctx, tx, t) })
}

// Confirm is ConfirmTx in a transaction of its own, committed on success
// and on a refusal.
func (r *Reserver) Confirm(ctx context.Context, id string) (Reservation, error) {
	return r.inTx(ctx, func(ctx context.Context, tx sqldb.Tx) (Reservation, error) { return r.ConfirmTx(ctx, tx, id) })
}

// Cancel is CancelTx in a transaction of its own.
func (r *Reserver) Cancel(ctx context.Context, id string) (Reservation, error) {
	return r.inTx(ctx, func(ctx context.Context, tx sqldb.Tx) (Reservation, error) { return r.CancelTx(ctx, tx, id) })
}

// inTx runs call in a transaction that commits when it succeeds or
// refuses (the refusal is recorded), and rolls back on any other error.
func (r *Reserver) inTx(ctx context.Context, call func(context.Context, sqldb.Tx) (Reservation, error)) (Reservation, error) {
	var res Reservation
	var refusal error
	err := r.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		res, err = call(ctx, tx)
		if errors.Is(err, ErrRefused) {
			refusal = err
			return nil
		}
		return err
	})
	if err != nil {
		return Reservation{}, err
	}
	return res, refusal
}

// expire is the ExpireHandler: it releases the reservation its timer was
// set for, if it is still held. A confirmed, cancelled or already expired
// one is left alone: the timer may fire after a Confirm or Cancel that
// could not delete it (it was firing then).
func (r *Reserver) expire(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	id := f.Msg.Subject
	res, err := lock(ctx, tx, id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reserve: expire %q: %w", id, err)
	}
	if res.State != Held {
		return nil
	}
	if err := r.release(ctx, tx, &res, Expired, stamp(r.now()), false); err != nil {
		return fmt.Errorf("reserve: expire %q: %w", id, err)
	}
	return nil
}

// expireIfDue releases res, locked in tx, if it is held past its expiry:
// a call that finds it so does not wait for the timer.
func (r *Reserver) expireIfDue(ctx context.Context, tx sqldb.Tx, res *Reservation, now time.Time) error {
	if res.State != Held || now.Before(res.ExpiresAt) {
		return nil
	}
	return r.release(ctx, tx, res, Expired, now, true)
}

// release frees res's resource, if res still holds it, and moves res, locked
// in tx, to state to; with cancelTimer, it deletes the expiry timer unless
// a scheduler is firing it.
func (r *Reserver) release(ctx context.Context, tx sqldb.Tx, res *Reservation, to State, now time.Time, cancelTimer bool) error {
	if err := sqldb.ExecLater(ctx, tx, `UPDATE troupe_resources SET state = 'free', reservation = '', owner = '', updated_at = $4
		WHERE pool = $1 AND id = $2 AND reservation = $3`, res.Pool, res.Resource, res.ID, now); err != nil {
		return fmt.Errorf("release resource %q: %w", res.Resource, err)
	}
	if _, err := tx.Exec(ctx, `UPDATE troupe_reservations SET state = $2, updated_at = $3 WHERE id = $1`, res.ID, string(to), now); err != nil {
		return fmt.Errorf("record the reservation %s: %w", to, err)
	}
	if cancelTimer {
		if _, err := r.sched.TryCancelTx(ctx, tx, timerID(res.ID)); err != nil {
			return err
		}
	}
	res.State, res.UpdatedAt = to, now
	return nil
}

// answer is the error a Try or Confirm answers with for res as it stands:
// nil while it holds or has its resource, else the refusal.
func answer(res Reservation, now time.Time) error {
	switch res.State {
	case Held:
		if now.Before(res.ExpiresAt) {
			return nil
		}
		return fmt.Errorf("%w at %s (reservation %q)", ErrReservationExpired, res.ExpiresAt.Format(time.RFC3339Nano), res.ID)
	case Confirmed, Released:
		return nil // what was asked was done; Released came after
	case Expired:
		return fmt.Errorf("%w at %s (reservation %q)", ErrReservationExpired, res.ExpiresAt.Format(time.RFC3339Nano), res.ID)
	case Cancelled:
		return fmt.Errorf("%w (reservation %q)", ErrCancelled, res.ID)
	case Refused:
		return fmt.Errorf("%w in pool %q (reservation %q)", ErrUnavailable, res.Pool, res.ID)
	}
	return fmt.Errorf("reserve: reservation %q has unknown state %q", res.ID, res.State)
}

// timerID is the id of reservation id's expiry timer.
func timerID(id string) string { return "reserve-expiry/" + id }

// lock reads reservation id, locking its row on PostgreSQL (SQLite's
// transaction holds the write lock). ErrNotFound if there is none.
func lock(ctx context.Context, tx sqldb.Tx, id string) (Reservation, error) {
	q := selectReservation + ` WHERE id = $1`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	res, err := scanReservation(tx.QueryRow(ctx, q, id))
	if errors.Is(err, sqldb.ErrNoRows) {
		return Reservation{}, ErrNotFound
	}
	return res, err
}

const selectReservation = `SELECT id, pool, resource, owner, state, expires_at, created_at, updated_at FROM troupe_reservations`

// scanReservation reads a row of selectReservation.
func scanReservation(row sqldb.Row) (Reservation, error) {
	var res Reservation
	var state string
	var exp *time.Time
	if err := row.Scan(&res.ID, &res.Pool, &res.Resource, &res.Owner, &state, &exp, &res.CreatedAt, &res.UpdatedAt); err != nil {
		return Reservation{}, err
	}
	res.State = State(state)
	if exp != nil {
		res.ExpiresAt = exp.UTC()
	}
	res.CreatedAt, res.UpdatedAt = res.CreatedAt.UTC(), res.UpdatedAt.UTC()
	return res, nil
}
