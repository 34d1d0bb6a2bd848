package saga

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

// Aborted is the status of a parked saga an operator gave up on
// (AbortTx): its remaining compensations will not be made by Troupe.
const Aborted Status = "aborted"

// ErrNotParked is returned by RetryTx and AbortTx for a saga that is not
// parked.
var ErrNotParked = errors.New("saga: the saga is not parked")

// HistoryEntry is one transition of a saga.
type HistoryEntry struct {
	// Seq orders a saga's entries, from 1.
	Seq int `json:"seq"`
	// Step and Op name the step and side, when the entry concerns one. An
	// entry of a parallel group's branch names the branch (names are
	// unique across a saga's steps and branches).
	Step string `json:"step,omitempty"`
	// Op is "action" or "compensation".
	Op string `json:"op,omitempty"`
	// Attempt is the command's send count, for command steps.
	Attempt int `json:"attempt,omitempty"`
	// Event is what happened: started, sent, done, refused, failed,
	// deadline, abandoned (a group's branch compensated without awaiting
	// its action's answer), ignored-reply, completed, compensated,
	// parked-retried, aborted.
	Event string `json:"event"`
	// Detail adds the reason or the command's message id.
	Detail string `json:"detail,omitempty"`
	// At is when, by the orchestrator's clock.
	At time.Time `json:"at"`
}

// History returns a saga's transitions in order.
func (o *Orchestrator) History(ctx context.Context, id string) ([]HistoryEntry, error) {
	rows, err := o.db.Query(ctx, `SELECT seq, step, op, attempt, event, detail, at FROM troupe_saga_history WHERE saga_id = $1 ORDER BY seq`, id)
	if err != nil {
		return nil, fmt.Errorf("saga: history of %q: %w", id, err)
	}
	var out []HistoryEntry
	for rows.Next() {
		var h HistoryEntry
		if err := rows.Scan(&h.Seq, &h.Step, &h.Op, &h.Attempt, &h.Event, &h.Detail, &h.At); err != nil {
			rows.Close()
			return nil, fmt.Errorf("saga: history of %q: %w", id, err)
		}
		h.At = h.At.UTC()
		out = append(out, h)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("saga: history of %q: %w", id, err)
	}
	return out, nil
}

// List returns up to limit sagas with the given status, least recently
// changed first (a parked or stuck saga shows at the top).
func (o *Orchestrator) List(ctx context.Context, status Status, limit int) ([]Info, error) {
	rows, err := o.db.Query(ctx, `SELECT id, name, version, status, reason, step, data FROM troupe_sagas WHERE status = $1 ORDER BY updated_at, id LIMIT $2`, string(status), limit)
	if err != nil {
		return nil, fmt.Errorf("saga: list %s sagas: %w", status, err)
	}
	var out []Info
	for rows.Next() {
		var in Info
		var st string
		if err := rows.Scan(&in.ID, &in.Name, &in.Version, &st, &in.Reason, &in.Step, &in.Data); err != nil {
			rows.Close()
			return nil, fmt.Errorf("saga: list %s sagas: %w", status, err)
		}
		in.Status = Status(st)
		out = append(out, in)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("saga: list %s sagas: %w", status, err)
	}
	return out, nil
}

// RetryTx resumes a parked saga's compensation in tx: the compensation that
// failed is tried again (a command is sent once more, with a new deadline;
// an HTTP compensation is called again; a local compensation runs again;
// in a parallel group, every branch compensation not yet done is sent
// again), then the saga goes on compensating.
func (o *Orchestrator) RetryTx(ctx context.Context, tx sqldb.Tx, id string) error {
	in, def, err := o.parked(ctx, tx, id)
	if err != nil {
		return err
	}
	in.status, in.awaiting = Compensating, ""
	for _, bs := range in.branches {
		if bs.Status == branchUndoing {
			bs.Status = branchDue // sent again, as the next attempt
		}
	}
	o.record(in, "", "", 0, "parked-retried", in.reason)
	return o.advance(ctx, tx, def, in)
}

// AbortTx ends a parked saga for good in tx, with the operator's reason:
// its remaining compensations are left to the operator.
func (o *Orchestrator) AbortTx(ctx context.Context, tx sqldb.Tx, id, reason string) error {
	in, def, err := o.parked(ctx, tx, id)
	if err != nil {
		return err
	}
	// Calls still pending (a group's branches, parked while another
	// branch's compensation failed) are the operator's now: withdraw them.
	// CancelTx, not TryCancelTx: skipping a call whose row the scheduler
	// holds at this moment (recording a 503, say) would leave it to be
	// made after the abort. The wait is short (the scheduler's row locks
	// are held for a write, not for a call); should it deadlock with a
	// call's outcome waiting for this saga's row, PostgreSQL ends one of
	// the two and the operator tries again.
	if in.step >= 0 && in.step < len(def.steps) {
		st := def.steps[in.step]
		for _, m := range append([]step{st}, st.branches...) {
			if !m.isHTTP() {
				continue
			}
			for _, op := range []Op{Action, Compensation} {
				if _, err := o.sched.CancelTx(ctx, tx, httpTaskID(in.id, m.name, op)); err != nil {
					return err
				}
			}
		}
	}
	in.status = Aborted
	in.reason = in.reason + "; aborted: " + reason
	o.record(in, "", "", 0, "aborted", reason)
	return o.save(ctx, tx, in)
}

func (o *Orchestrator) parked(ctx context.Context, tx sqldb.Tx, id string) (*instance, *definition, error) {
	in, err := o.load(ctx, tx, id)
	if err != nil {
		return nil, nil, fmt.Errorf("saga: %q: %w", id, err)
	}
	if in.status != Parked {
		return nil, nil, fmt.Errorf("%w: %q is %s", ErrNotParked, id, in.status)
	}
	def, err := o.definition(in.name, in.version)
	if err != nil {
		return nil, nil, err
	}
	return in, def, nil
}
