package inbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

// BarrierOp is the side of a saga step that a participant is asked to run.
// Its String is the name stored in troupe_barrier.
type BarrierOp int

const (
	// BarrierAction is the step's forward action, such as reserving credit.
	BarrierAction BarrierOp = iota + 1
	// BarrierCompensation undoes the step's action, such as releasing the
	// credit it reserved.
	BarrierCompensation
)

// String returns "action" or "compensation", the names stored in
// troupe_barrier's op and origin columns.
func (op BarrierOp) String() string {
	switch op {
	case BarrierAction:
		return "action"
	case BarrierCompensation:
		return "compensation"
	}
	return fmt.Sprintf("BarrierOp(%d)", int(op))
}

// BarrierOutcome is what BarrierTx did with one call. Every outcome comes
// with a nil error and is an answer the participant can commit and reply
// with; the zero value is returned only with an error.
type BarrierOutcome int

const (
	// BarrierApplied means fn ran: its writes and the barrier's row commit
	// together in the caller's transaction. Reply with fn's result.
	BarrierApplied BarrierOutcome = iota + 1

	// BarrierDuplicate means this side of the step was already done (or,
	// for a compensation, ruled out as a null compensation) by a committed
	// transaction, possibly one BarrierTx waited for; fn did not run, so
	// a redelivered or retried request has no second effect. Reply as the
	// first time: if that reply depended on what fn decided, fn must keep
	// its decision in the participant's tables to be read back here.
	BarrierDuplicate

	// BarrierNullCompensation means the compensation arrived before its
	// action, which has not run and now never will (a late action gets
	// BarrierRefused): there is nothing to undo, fn did not run, and the
	// step is compensated. Reply success.
	BarrierNullCompensation

	// BarrierRefused means the action arrived after its step's
	// compensation (a late or retried request the saga gave up on): fn
	// did not run, so nothing is reserved that no compensation would ever
	// release. Reply with a business refusal; the saga has moved on and
	// treats it as a failed step. Nothing was written: committing the
	// transaction is safe, and so is rolling it back.
	BarrierRefused
)

// String returns "applied", "duplicate", "null_compensation" or "refused",
// for logs and saga histories.
func (o BarrierOutcome) String() string {
	switch o {
	case BarrierApplied:
		return "applied"
	case BarrierDuplicate:
		return "duplicate"
	case BarrierNullCompensation:
		return "null_compensation"
	case BarrierRefused:
		return "refused"
	}
	return fmt.Sprintf("BarrierOutcome(%d)", int(o))
}

// BarrierTx runs one side (op) of step sagaID/step on a saga participant:
// fn, the action or the compensation, through tx, behind a barrier that
// makes the participant safe against the three anomalies of a saga whose
// requests are retried, duplicated and reordered:
//
//   - Duplicate request: the same action or compensation arrives twice (a
//     redelivery, a retry after a timeout whose first attempt had in fact
//     succeeded). The second call returns BarrierDuplicate without running
//     fn, so it has no second effect. The inbox already drops a message
//     delivered twice; the barrier also catches a retry sent as a new
//     message or as a new HTTP call with the same saga id and step.
//   - Null compensation: the saga compensates a step whose action never
//     ran here (the action was lost, or is still on its way, and the saga's
//     deadline passed). The compensation is recorded, fn does not run (there
//     is nothing to undo), and the call returns BarrierNullCompensation,
//     which the saga takes as success.
//   - Hanging (late) action: the action arrives after its compensation. It
//     returns BarrierRefused without running fn: run, it would reserve
//     something that no compensation will ever release.
//
// How: the table troupe_barrier has one row per (saga id, step, side). The
// action inserts the row (sagaID, step, action); if it was there already,
// the call is a duplicate, or the row was inserted by a compensation that
// came first and the action is refused. The compensation inserts the same
// action row and its own (sagaID, step, compensation) row in one
// statement: if the action row was new, the action never ran (null
// compensation); if only the compensation row was new, fn undoes the
// action; if neither, the call is a duplicate. Each row's insert uses the
// key's uniqueness, so on PostgreSQL an action and a compensation of one
// step running at once serialize: the second insert waits for the first
// transaction and then sees its row (or, if it rolled back, inserts its
// own). On SQLite write transactions are serialized anyway. The barrier
// expects transactions at READ COMMITTED, as DB.InTx begins them; at
// REPEATABLE READ or SERIALIZABLE, PostgreSQL fails a call that meets a row
// committed after its snapshot with a serialization error, and the
// transaction must be retried.
//
// The rows are written in tx, with fn's writes: they commit together or not
// at all. If fn returns an error, BarrierTx returns that error as is, and
// the caller must roll tx back (return the error from DB.InTx's function or
// the inbox's HandlerFunc): the barrier's rows go with it, so a retry of a
// failed action or compensation runs fn again. A participant that refuses
// an action for a business reason and wants the refusal to stand records
// it through tx and returns nil. Committing tx after fn failed would keep
// the barrier's row without fn's effect, and a retry would then be taken
// for a duplicate.
//
//	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
//		outcome, err := ib.BarrierTx(ctx, tx, sagaID, "reserve-credit", inbox.BarrierAction,
//			func(ctx context.Context, tx sqldb.Tx) error { return reserveCredit(ctx, tx, customer, total) })
//		if err != nil {
//			return err
//		}
//		return outbox.AddTx(ctx, tx, replyFor(outcome)) // BarrierRefused: a refusal
//	})
//
// sagaID and step must not be empty, op must be BarrierAction or
// BarrierCompensation, and tx and fn must not be nil; BarrierTx reports
// every such problem in one error and then writes nothing. A row's created_at is read
// from Config.Now. Prune does not delete barrier rows: a row deleted while
// its saga could still send the step would let a late action through.
//
// BarrierTx is a method, though it needs only the Inbox's clock, so that a
// participant's inbox and its barrier share one configuration and one set
// of migrations.
func (ib *Inbox) BarrierTx(ctx context.Context, tx sqldb.Tx, sagaID, step string, op BarrierOp,
	fn func(ctx context.Context, tx sqldb.Tx) error) (BarrierOutcome, error) {
	if err := checkBarrierArgs(tx, sagaID, step, op, fn); err != nil {
		return 0, err
	}
	now := ib.cfg.Now().UTC()
	var outcome BarrierOutcome
	var err error
	if op == BarrierAction {
		outcome, err = barrierAction(ctx, tx, sagaID, step, now)
	} else {
		outcome, err = barrierCompensation(ctx, tx, sagaID, step, now)
	}
	if err != nil {
		return 0, fmt.Errorf("inbox: barrier for the %s of saga %q step %q: %w", op, sagaID, step, err)
	}
	if outcome != BarrierApplied {
		return outcome, nil
	}
	if err := fn(ctx, tx); err != nil {
		return 0, err
	}
	return BarrierApplied, nil
}

// barrierAction claims the action row for the action. It returns
// BarrierApplied when fn is to run.
func barrierAction(ctx context.Context, tx sqldb.Tx, sagaID, step string, now time.Time) (BarrierOutcome, error) {
	n, err := tx.Exec(ctx, `INSERT INTO troupe_barrier (saga_id, step, op, origin, created_at)
		VALUES ($1, $2, 'action', 'action', $3) ON CONFLICT DO NOTHING`, sagaID, step, now)
	if err != nil {
		return 0, err
	}
	if n == 1 {
		return BarrierApplied, nil
	}
	var origin string
	err = tx.QueryRow(ctx, `SELECT origin FROM troupe_barrier WHERE saga_id = $1 AND step = $2 AND op = 'action'`,
		sagaID, step).Scan(&origin)
	if err != nil {
		return 0, fmt.Errorf("read the action row's origin: %w", err)
	}
	switch origin {
	case "action":
		return BarrierDuplicate, nil
	case "compensation":
		return BarrierRefused, nil
	}
	return 0, fmt.Errorf("action row has origin %q, want action or compensation", origin)
}

// barrierCompensation claims the action row (in case the action never ran)
// and the compensation row, in this order, in one statement. All calls
// insert a step's rows in the same order, so concurrent calls cannot
// deadlock on them. It returns BarrierApplied when fn is to run.
func barrierCompensation(ctx context.Context, tx sqldb.Tx, sagaID, step string, now time.Time) (BarrierOutcome, error) {
	rows, err := tx.Query(ctx, `INSERT INTO troupe_barrier (saga_id, step, op, origin, created_at)
		VALUES ($1, $2, 'action', 'compensation', $3), ($1, $2, 'compensation', 'compensation', $3)
		ON CONFLICT DO NOTHING RETURNING op`, sagaID, step, now)
	if err != nil {
		return 0, err
	}
	var actionRow, compensationRow bool
	for rows.Next() {
		var op string
		if err := rows.Scan(&op); err != nil {
			rows.Close()
			return 0, err
		}
		actionRow = actionRow || op == "action"
		compensationRow = compensationRow || op == "compensation"
	}
	if err := rows.Close(); err != nil {
		return 0, err
	}
	switch {
	case actionRow:
		// Ours is the step's first row: the action never ran.
		return BarrierNullCompensation, nil
	case compensationRow:
		return BarrierApplied, nil
	default:
		return BarrierDuplicate, nil
	}
}

func checkBarrierArgs(tx sqldb.Tx, sagaID, step string, op BarrierOp,
	fn func(context.Context, sqldb.Tx) error) error {
	var errs []error
	if tx == nil {
		errs = append(errs, errors.New("nil tx"))
	}
	if sagaID == "" {
		errs = append(errs, errors.New("empty saga id"))
	}
	if step == "" {
		errs = append(errs, errors.New("empty step"))
	}
	if op != BarrierAction && op != BarrierCompensation {
		errs = append(errs, fmt.Errorf("op %v: want BarrierAction or BarrierCompensation", op))
	}
	if fn == nil {
		errs = append(errs, errors.New("nil fn"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("inbox: barrier for saga %q step %q: %w", sagaID, step, err)
	}
	return nil
}

// BarrierRefusedTx records in tx that fn refused the side op of a step for
// a business reason, after BarrierTx returned BarrierApplied for it (fn
// returned nil, having decided to refuse). The refusal did nothing, and the
// barrier must not act as if it had:
//
//   - a refused action's compensation becomes a no-op: a later compensation
//     of the step gets BarrierDuplicate, without running (there is nothing
//     to release, and running it would release what was never reserved);
//   - a refused compensation is forgotten: a later compensation of the step
//     (an operator's retry) runs again.
func (ib *Inbox) BarrierRefusedTx(ctx context.Context, tx sqldb.Tx, sagaID, step string, op BarrierOp) error {
	var err error
	switch op {
	case BarrierAction:
		_, err = tx.Exec(ctx, `INSERT INTO troupe_barrier (saga_id, step, op, origin, created_at) VALUES ($1, $2, 'compensation', 'action', $3)
			ON CONFLICT DO NOTHING`, sagaID, step, ib.cfg.Now().UTC())
	case BarrierCompensation:
		_, err = tx.Exec(ctx, `DELETE FROM troupe_barrier WHERE saga_id = $1 AND step = $2 AND op = 'compensation'`, sagaID, step)
	default:
		return fmt.Errorf("inbox: BarrierRefusedTx: unknown op %d", int(op))
	}
	if err != nil {
		return fmt.Errorf("inbox: record the refusal of %s %s of saga %q: %w", step, op, sagaID, err)
	}
	return nil
}

// BarrierStep names the step of a saga whose action BarrierActionsTx
// claims.
type BarrierStep struct {
	SagaID, Step string
}

// barrierRows is the most barrier rows one SQLite statement claims, well
// below its limit on parameters.
const barrierRows = 500

// BarrierActionsTx claims, set-wise, the barrier rows of the actions of
// steps, for a participant handling many commands in one transaction:
// applied[i] reports that the action of steps[i] is to run now, as
// BarrierTx's BarrierApplied does, its row inserted in tx. For the others
// (a row is there already, or the step came earlier in steps), call
// BarrierTx, which finds the row and tells why: a duplicate, or an action
// refused because its compensation came first. Rows are inserted in the
// order of (saga, step), so that concurrent claims of overlapping steps
// wait for each other instead of deadlocking.
func (ib *Inbox) BarrierActionsTx(ctx context.Context, tx sqldb.Tx, steps []BarrierStep) (applied []bool, err error) {
	applied = make([]bool, len(steps))
	first := make(map[BarrierStep]int, len(steps))
	var keys []BarrierStep
	for i, s := range steps {
		if err := checkBarrierArgs(tx, s.SagaID, s.Step, BarrierAction, func(context.Context, sqldb.Tx) error { return nil }); err != nil {
			return nil, err
		}
		if _, ok := first[s]; !ok {
			first[s] = i
			keys = append(keys, s)
		}
	}
	if len(keys) == 0 {
		return applied, nil
	}
	slices.SortFunc(keys, func(a, b BarrierStep) int {
		return cmp.Or(strings.Compare(a.SagaID, b.SagaID), strings.Compare(a.Step, b.Step))
	})
	now := ib.cfg.Now().UTC()
	claim := func(keys []BarrierStep) (sqldb.Rows, error) {
		if tx.Dialect() == sqldb.Postgres {
			sagas, names := make([]string, len(keys)), make([]string, len(keys))
			for i, k := range keys {
				sagas[i], names[i] = k.SagaID, k.Step
			}
			return tx.Query(ctx, `INSERT INTO troupe_barrier (saga_id, step, op, origin, created_at)
				SELECT s, st, 'action', 'action', $3 FROM unnest($1::text[], $2::text[]) AS u(s, st)
				ON CONFLICT DO NOTHING RETURNING saga_id, step`, sagas, names, now)
		}
		var q strings.Builder
		q.WriteString(`INSERT INTO troupe_barrier (saga_id, step, op, origin, created_at) VALUES `)
		args := []any{now}
		for i, k := range keys {
			if i > 0 {
				q.WriteString(", ")
			}
			fmt.Fprintf(&q, "($%d, $%d, 'action', 'action', $1)", len(args)+1, len(args)+2)
			args = append(args, k.SagaID, k.Step)
		}
		q.WriteString(` ON CONFLICT DO NOTHING RETURNING saga_id, step`)
		return tx.Query(ctx, q.String(), args...)
	}
	// On PostgreSQL one statement takes any number of keys; on SQLite runs
	// of a few sizes keep the statements few and under its limit on
	// parameters.
	most := len(keys)
	if tx.Dialect() != sqldb.Postgres {
		most = barrierRows
	}
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(keys), max(most, 1)) {
		rows, err := claim(keys[lo:hi])
		if err != nil {
			return nil, fmt.Errorf("inbox: barrier for the actions of %d steps: %w", len(keys), err)
		}
		for rows.Next() {
			var s BarrierStep
			if err := rows.Scan(&s.SagaID, &s.Step); err != nil {
				rows.Close()
				return nil, fmt.Errorf("inbox: barrier for the actions of %d steps: %w", len(keys), err)
			}
			if i, ok := first[s]; ok {
				applied[i] = true
			}
		}
		if err := rows.Close(); err != nil {
			return nil, fmt.Errorf("inbox: barrier for the actions of %d steps: %w", len(keys), err)
		}
	}
	return applied, nil
}
