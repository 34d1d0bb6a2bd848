package flow

import (
	"cmp"
	"container/heap"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

const flowColumns = `id, name, status, reason, started_at, updated_at, ended_at, events`

// Get returns the flow of a correlation id, with Status Stalled if it runs
// past its definition's Deadline (a definition this tracker has defined).
// An unknown id gives an error matching ErrUnknownFlow.
func (t *Tracker) Get(ctx context.Context, correlationID string) (Flow, error) {
	rows, err := t.db.Query(ctx, `SELECT `+flowColumns+` FROM troupe_flows WHERE id = $1`, correlationID)
	if err != nil {
		return Flow{}, fmt.Errorf("flow: get %q: %w", correlationID, err)
	}
	flows, err := t.scanFlows(rows, t.now().UTC())
	if err != nil {
		return Flow{}, fmt.Errorf("flow: get %q: %w", correlationID, err)
	}
	if len(flows) == 0 {
		return Flow{}, fmt.Errorf("%w: %q", ErrUnknownFlow, correlationID)
	}
	if err := t.addServices(ctx, flows); err != nil {
		return Flow{}, fmt.Errorf("flow: get %q: %w", correlationID, err)
	}
	return flows[0], nil
}

// List returns the flows f selects, oldest start first (so the flows that
// have waited longest, stalled ones among them, come first), up to
// f.Limit. An invalid filter gives an error matching ErrInvalidFilter.
func (t *Tracker) List(ctx context.Context, f Filter) ([]Flow, error) {
	if err := f.validate(); err != nil {
		return nil, err
	}
	if f.Limit == 0 {
		f.Limit = defaultListLimit
	}
	now := t.now().UTC()
	var where []string
	var args []any
	arg := func(v any) string {
		args = append(args, v)
		return fmt.Sprintf("$%d", len(args))
	}
	if f.Name != "" {
		where = append(where, "name = "+arg(f.Name))
	}
	switch f.Status {
	case Completed, Failed:
		where = append(where, "status = "+arg(string(f.Status)))
	case Running, Stalled:
		where = append(where, "status = 'running'")
		// Stalled: past the deadline of its definition.
		var stalled []string
		for _, d := range t.defs.Load().byName {
			if d.Deadline > 0 && (f.Name == "" || f.Name == d.Name) {
				stalled = append(stalled, fmt.Sprintf("(name = %s AND started_at < %s)", arg(d.Name), arg(now.Add(-d.Deadline))))
			}
		}
		switch {
		case f.Status == Stalled && len(stalled) == 0:
			return nil, nil
		case f.Status == Stalled:
			where = append(where, "("+strings.Join(stalled, " OR ")+")")
		case len(stalled) > 0:
			where = append(where, "NOT ("+strings.Join(stalled, " OR ")+")")
		}
	}
	q := `SELECT ` + flowColumns + ` FROM troupe_flows`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY started_at, id LIMIT " + arg(f.Limit)
	rows, err := t.db.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("flow: list: %w", err)
	}
	flows, err := t.scanFlows(rows, now)
	if err != nil {
		return nil, fmt.Errorf("flow: list: %w", err)
	}
	if err := t.addServices(ctx, flows); err != nil {
		return nil, fmt.Errorf("flow: list: %w", err)
	}
	return flows, nil
}

// scanFlows reads flow rows, deriving Stalled at now, and closes rows.
func (t *Tracker) scanFlows(rows sqldb.Rows, now time.Time) ([]Flow, error) {
	defs := t.defs.Load().byName
	var out []Flow
	for rows.Next() {
		var f Flow
		var status string
		var ended *time.Time
		if err := rows.Scan(&f.ID, &f.Name, &status, &f.Reason, &f.StartedAt, &f.UpdatedAt, &ended, &f.Events); err != nil {
			rows.Close()
			return nil, err
		}
		f.Status = Status(status)
		f.StartedAt, f.UpdatedAt = f.StartedAt.UTC(), f.UpdatedAt.UTC()
		if ended != nil {
			f.EndedAt = ended.UTC()
		}
		if d := defs[f.Name]; f.Status == Running && d != nil && d.Deadline > 0 && now.Sub(f.StartedAt) > d.Deadline {
			f.Status = Stalled
		}
		out = append(out, f)
	}
	if err := rows.Close(); err != nil {
		return nil, err
	}
	return out, nil
}

// addServices fills in the Services of flows.
func (t *Tracker) addServices(ctx context.Context, flows []Flow) error {
	if len(flows) == 0 {
		return nil
	}
	index := make(map[string]int, len(flows))
	ids := make([]string, len(flows))
	for i, f := range flows {
		index[f.ID], ids[i] = i, f.ID
	}
	rows, err := t.db.Query(ctx, `SELECT flow_id, source FROM troupe_flow_events WHERE flow_id IN (`+sqldb.List(1, len(ids))+`)
		GROUP BY flow_id, source ORDER BY flow_id, MIN(msg_time), source`, anys(ids)...)
	if err != nil {
		return fmt.Errorf("read services: %w", err)
	}
	for rows.Next() {
		var id, source string
		if err := rows.Scan(&id, &source); err != nil {
			rows.Close()
			return fmt.Errorf("read services: %w", err)
		}
		f := &flows[index[id]]
		f.Services = append(f.Services, source)
	}
	if err := rows.Close(); err != nil {
		return fmt.Errorf("read services: %w", err)
	}
	return nil
}

// History returns the recorded messages of a flow in causal order: every
// message after the message that caused it (its CausationID) when that one
// was recorded too, and otherwise in the order of their times, then of
// their recording. So a completion recorded before its start still comes
// after it. An unknown id gives an error matching ErrUnknownFlow.
func (t *Tracker) History(ctx context.Context, correlationID string) ([]Event, error) {
	var status, name string
	err := t.db.QueryRow(ctx, `SELECT status, name FROM troupe_flows WHERE id = $1`, correlationID).Scan(&status, &name)
	if errors.Is(err, sqldb.ErrNoRows) {
		return nil, fmt.Errorf("%w: %q", ErrUnknownFlow, correlationID)
	}
	if err != nil {
		return nil, fmt.Errorf("flow: history of %q: %w", correlationID, err)
	}
	rows, err := t.db.Query(ctx, `SELECT message_id, source, type, subject, causation_id, role, definition, msg_time, recorded_at
		FROM troupe_flow_events WHERE flow_id = $1 ORDER BY msg_time, recorded_at, message_id, source`, correlationID)
	if err != nil {
		return nil, fmt.Errorf("flow: history of %q: %w", correlationID, err)
	}
	var events []Event
	for rows.Next() {
		var e Event
		var role, def string
		if err := rows.Scan(&e.MessageID, &e.Source, &e.Type, &e.Subject, &e.CausationID, &role, &def, &e.Time, &e.RecordedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("flow: history of %q: %w", correlationID, err)
		}
		e.Role, e.Time, e.RecordedAt = Role(role), e.Time.UTC(), e.RecordedAt.UTC()
		e.Contradicts = def == name &&
			(e.Role == RoleFail && Status(status) == Completed || e.Role == RoleComplete && Status(status) == Failed)
		events = append(events, e)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("flow: history of %q: %w", correlationID, err)
	}
	return causalOrder(events), nil
}

// causalOrder returns events, given in time order, reordered so that each
// comes after the event that caused it, keeping time order otherwise: of
// the events whose cause has been placed (or is not among events), the
// earliest goes next. A causation cycle, which well-formed messages cannot
// make, leaves the events on it in time order at the end.
func causalOrder(events []Event) []Event {
	byID := make(map[string]int, len(events))
	for i, e := range events {
		if _, dup := byID[e.MessageID]; !dup {
			byID[e.MessageID] = i
		}
	}
	effects := make([][]int, len(events))
	waiting := make([]bool, len(events))
	ready := &indexHeap{}
	for i, e := range events {
		if c, ok := byID[e.CausationID]; ok && c != i {
			effects[c] = append(effects[c], i)
			waiting[i] = true
			continue
		}
		heap.Push(ready, i)
	}
	out := make([]Event, 0, len(events))
	placed := make([]bool, len(events))
	for len(out) < len(events) {
		if ready.Len() == 0 {
			for i := range events { // a cycle: release its earliest event
				if !placed[i] {
					heap.Push(ready, i)
					break
				}
			}
		}
		i := heap.Pop(ready).(int)
		if placed[i] {
			continue
		}
		placed[i] = true
		out = append(out, events[i])
		for _, j := range effects[i] {
			if !placed[j] {
				heap.Push(ready, j)
			}
		}
	}
	return out
}

// indexHeap is a min-heap of event indexes.
type indexHeap []int

func (h indexHeap) Len() int           { return len(h) }
func (h indexHeap) Less(i, j int) bool { return cmp.Less(h[i], h[j]) }
func (h indexHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *indexHeap) Push(x any)        { *h = append(*h, x.(int)) }
func (h *indexHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// Prune deletes up to limit flows that ended before endedBefore, with
// their events, and returns how many flows it deleted. It deletes in
// transactions of at most 500 flows, so it never holds locks for long; call
// it periodically. Running flows are never deleted. Keep ended flows
// longer than the broker may redeliver their messages: a message of a
// pruned flow that arrives later records its flow again.
func (t *Tracker) Prune(ctx context.Context, endedBefore time.Time, limit int) (int, error) {
	if limit <= 0 {
		return 0, fmt.Errorf("flow: prune: limit %d is not positive", limit)
	}
	total := 0
	for total < limit {
		chunk := min(limit-total, lookupChunk)
		n, err := t.pruneOnce(ctx, endedBefore.UTC(), chunk)
		total += n
		if err != nil {
			return total, fmt.Errorf("flow: prune flows ended before %v: %w", endedBefore, err)
		}
		if n < chunk {
			break
		}
	}
	return total, nil
}

func (t *Tracker) pruneOnce(ctx context.Context, endedBefore time.Time, limit int) (int, error) {
	var n int
	err := t.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		rows, err := tx.Query(ctx, `SELECT id FROM troupe_flows WHERE ended_at < $1 ORDER BY ended_at, id LIMIT $2`, endedBefore, limit)
		if err != nil {
			return err
		}
		var ids []string
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return err
			}
			ids = append(ids, id)
		}
		if err := rows.Close(); err != nil || len(ids) == 0 {
			return err
		}
		in := sqldb.List(1, len(ids))
		if _, err := tx.Exec(ctx, `DELETE FROM troupe_flow_events WHERE flow_id IN (`+in+`)`, anys(ids)...); err != nil {
			return err
		}
		deleted, err := tx.Exec(ctx, `DELETE FROM troupe_flows WHERE id IN (`+in+`)`, anys(ids)...)
		n = int(deleted)
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}
