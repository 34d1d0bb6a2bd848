package flow

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/retry"
	"github.com/troupedev/troupe/sqldb"
)

// Config tunes a Tracker.
type Config struct {
	// Now is the clock: it stamps recordings and decides which flows are
	// stalled. Default time.Now.
	Now func() time.Time
	// Logger receives batches that failed to record (Error) and ignored
	// messages (Debug). Default: discard.
	Logger *slog.Logger
	// Backoff returns how long the broker waits before redelivering a
	// batch that could not be recorded (the database is down, say), by
	// attempt (1 for the first delivery). Default:
	// retry.Exponential{}.Delay, which doubles from 1 s up to 5 min with
	// jitter.
	Backoff func(attempt int) time.Duration
}

// A Tracker records the messages of choreographed business transactions in
// its database and reads them back as flows. It is safe for concurrent use;
// several trackers (instances of one service) may record into one database
// at once.
type Tracker struct {
	db      *sqldb.DB
	now     func() time.Time
	log     *slog.Logger
	backoff func(attempt int) time.Duration

	mu   sync.Mutex               // serializes Define
	defs atomic.Pointer[registry] // replaced, never changed, by Define

	recorded, duplicates, ignored, deadLettered atomic.Uint64
}

// registry is the tracker's definitions, indexed by name and by type.
type registry struct {
	byName map[string]*Definition
	byType map[string]declared
}

// declared is what a type's definition says of it.
type declared struct {
	def  *Definition
	role Role
}

// New returns a tracker that records into db, which needs the flow tables
// (Migrate). Define the flow kinds before the tracker records messages.
func New(db *sqldb.DB, cfg Config) (*Tracker, error) {
	if db == nil {
		return nil, errors.New("flow: New needs a database")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Backoff == nil {
		cfg.Backoff = retry.Exponential{}.Delay
	}
	t := &Tracker{db: db, now: cfg.Now, log: cfg.Logger, backoff: cfg.Backoff}
	t.defs.Store(&registry{byName: map[string]*Definition{}, byType: map[string]declared{}})
	return t, nil
}

// Define adds a kind of flow. A name is defined once, and a message type
// belongs to one definition and has one role in it. The error matches
// ErrInvalidDefinition and lists every problem. d is copied.
func (t *Tracker) Define(d Definition) error {
	d.Starts, d.Steps = slices.Clone(d.Starts), slices.Clone(d.Steps)
	d.Completes, d.Fails = slices.Clone(d.Completes), slices.Clone(d.Fails)
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.defs.Load()
	taken := make(map[string]string, len(old.byType))
	for typ, dc := range old.byType {
		taken[typ] = dc.def.Name
	}
	names := make(map[string]bool, len(old.byName))
	for name := range old.byName {
		names[name] = true
	}
	if err := d.validate(taken, names); err != nil {
		return fmt.Errorf("%w %q: %w", ErrInvalidDefinition, d.Name, err)
	}
	next := &registry{byName: maps.Clone(old.byName), byType: maps.Clone(old.byType)}
	next.byName[d.Name] = &d
	for role, types := range map[Role][]string{RoleStart: d.Starts, RoleStep: d.Steps, RoleComplete: d.Completes, RoleFail: d.Fails} {
		for _, typ := range types {
			next.byType[typ] = declared{def: &d, role: role}
		}
	}
	t.defs.Store(next)
	return nil
}

// Stats returns what the tracker's Handler has done so far.
func (t *Tracker) Stats() Stats {
	return Stats{
		Recorded:     t.recorded.Load(),
		Duplicates:   t.duplicates.Load(),
		Ignored:      t.ignored.Load(),
		DeadLettered: t.deadLettered.Load(),
	}
}

// Handler returns the broker handler that records the messages it is
// delivered. Subscribe it, with a consumer group of its own (such as
// "flows"), to every topic the choreography's services publish on.
//
// Each batch is recorded in one transaction, in a few statements: one
// multi-row INSERT ... ON CONFLICT DO NOTHING for the messages, and one
// upsert per flow they belong to. A message already recorded (a
// redelivery, a duplicate publish, the same message on two topics) is a
// duplicate and changes nothing. Messages that belong to no flow are
// acknowledged and counted in Stats.Ignored. A delivery without a message,
// or whose message has no id or no source, is dead-lettered with the
// reason. If the transaction fails, every delivery of the batch is Nak'ed
// with Config.Backoff's delay, to be recorded on redelivery; give the
// subscription a MaxDeliver high enough to outlast a database outage, or
// the broker dead-letters the messages and their flows miss them.
//
// The tracker needs no inbox: its own rows, keyed by (source, id), make
// recording idempotent for every consumer.
func (t *Tracker) Handler() broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		msgs := make([]*message.Message, 0, len(batch))
		kept := make([]*broker.Delivery, 0, len(batch))
		for _, d := range batch {
			if err := checkMessage(d.Msg); err != nil {
				d.DeadLetter("flow: " + err.Error())
				t.deadLettered.Add(1)
				continue
			}
			msgs = append(msgs, d.Msg)
			kept = append(kept, d)
		}
		if len(msgs) == 0 {
			return
		}
		var res result
		err := t.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			var err error
			res, err = t.record(ctx, tx, msgs)
			return err
		})
		if err != nil {
			t.log.Error("flow: batch not recorded; its messages will be redelivered",
				"messages", len(msgs), "err", err)
			for _, d := range kept {
				d.Nak(t.backoff(d.Attempt))
			}
			return
		}
		for _, d := range kept {
			d.Ack()
		}
		t.recorded.Add(uint64(res.recorded))
		t.duplicates.Add(uint64(res.duplicates))
		t.ignored.Add(uint64(res.ignored))
	}
}

// RecordTx records msgs in tx, the caller's transaction: a service can
// record the messages it publishes (with outbox.Add) or handles in the
// transaction that writes them, and needs no subscription for them. The
// rules are the Handler's: a message already recorded changes nothing, and
// messages that belong to no flow are skipped. A nil message, or one
// without an id or a source, fails the call with ErrInvalidMessage and
// records nothing.
func (t *Tracker) RecordTx(ctx context.Context, tx sqldb.Tx, msgs ...*message.Message) error {
	for i, m := range msgs {
		if err := checkMessage(m); err != nil {
			return fmt.Errorf("%w: message %d: %w", ErrInvalidMessage, i, err)
		}
	}
	_, err := t.record(ctx, tx, msgs)
	return err
}

func checkMessage(m *message.Message) error {
	switch {
	case m == nil:
		return errors.New("no message")
	case m.ID == "":
		return errors.New("message has no id")
	case m.Source == "":
		return fmt.Errorf("message %q has no source", m.ID)
	}
	return nil
}

// result counts what record did with its messages.
type result struct{ recorded, duplicates, ignored int }

// entry is a message about to be recorded.
type entry struct {
	m      *message.Message
	flow   string // correlation id
	def    *Definition
	role   Role
	at     time.Time
	reason string // of a Fails message
}

func (e *entry) defName() string {
	if e.def == nil {
		return ""
	}
	return e.def.Name
}

// record writes msgs (checked already) into tx.
func (t *Tracker) record(ctx context.Context, tx sqldb.Tx, msgs []*message.Message) (result, error) {
	var res result
	now := t.now().UTC()
	reg := t.defs.Load()

	// Classify, dropping what has no flow and copies within msgs.
	entries := make([]*entry, 0, len(msgs))
	seen := make(map[msgKey]bool, len(msgs))
	declaredFlows := map[string]bool{}
	var undeclared []string // flows of undeclared messages, to look up
	for _, m := range msgs {
		k := msgKey{m.Source, m.ID}
		if seen[k] {
			res.duplicates++
			continue
		}
		seen[k] = true
		e := &entry{m: m, flow: m.CorrelationID, at: m.Time.UTC()}
		if e.at.IsZero() {
			e.at = now
		}
		if dc, ok := reg.byType[m.Type]; ok {
			e.def, e.role = dc.def, dc.role
		}
		if e.flow == "" && e.role == RoleStart {
			e.flow = m.ID // as message.CausedBy gives the messages it causes
		}
		if e.flow == "" {
			res.ignored++
			t.log.Debug("flow: message without correlation id ignored", "id", m.ID, "source", m.Source, "type", m.Type)
			continue
		}
		if e.role == RoleFail {
			e.reason = reason(e.def, m)
		}
		if e.def != nil {
			declaredFlows[e.flow] = true
		} else {
			undeclared = append(undeclared, e.flow)
		}
		entries = append(entries, e)
	}

	// An undeclared message is kept if its flow is known already, or is
	// made known by a declared message of this call.
	var known map[string]bool
	if len(undeclared) > 0 {
		var lookup []string
		for _, id := range undeclared {
			if !declaredFlows[id] {
				lookup = append(lookup, id)
			}
		}
		slices.Sort(lookup)
		lookup = slices.Compact(lookup)
		var err error
		if known, err = knownFlows(ctx, tx, lookup); err != nil {
			return result{}, err
		}
		entries = slices.DeleteFunc(entries, func(e *entry) bool {
			if e.def != nil || declaredFlows[e.flow] || known[e.flow] {
				return false
			}
			res.ignored++
			t.log.Debug("flow: message of an undeclared type and unknown flow ignored",
				"id", e.m.ID, "source", e.m.Source, "type", e.m.Type, "flow", e.flow)
			return true
		})
	}

	inserted, err := insertEvents(ctx, tx, now, entries)
	if err != nil {
		return result{}, err
	}
	res.duplicates += len(entries) - len(inserted)
	res.recorded = len(inserted)
	entries = slices.DeleteFunc(entries, func(e *entry) bool { return !inserted[msgKey{e.m.Source, e.m.ID}] })

	for _, u := range flowUpdates(entries, now) {
		if err := u.write(ctx, tx); err != nil {
			return result{}, err
		}
	}
	return res, nil
}

// msgKey identifies a message, as CloudEvents does.
type msgKey struct{ source, id string }

// lookupChunk is the most ids one query looks up, well below SQLite's limit
// on parameters.
const lookupChunk = 500

// knownFlows returns which of ids are recorded flows.
func knownFlows(ctx context.Context, tx sqldb.Tx, ids []string) (map[string]bool, error) {
	known := map[string]bool{}
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(ids), lookupChunk) {
		chunk := ids[lo:hi]
		rows, err := tx.Query(ctx, "SELECT id FROM troupe_flows WHERE id IN ("+sqldb.List(1, len(chunk))+")", anys(chunk)...)
		if err != nil {
			return nil, fmt.Errorf("flow: look up %d flows: %w", len(chunk), err)
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return nil, fmt.Errorf("flow: look up flows: %w", err)
			}
			known[id] = true
		}
		if err := rows.Close(); err != nil {
			return nil, fmt.Errorf("flow: look up %d flows: %w", len(chunk), err)
		}
	}
	return known, nil
}

// insertChunk is the most events one INSERT writes (9 parameters each).
const insertChunk = 200

// insertEvents inserts the events of entries that are not recorded yet and
// returns the keys it inserted. Rows go in in key order, so two
// transactions inserting overlapping messages on PostgreSQL wait for each
// other instead of deadlocking.
func insertEvents(ctx context.Context, tx sqldb.Tx, now time.Time, entries []*entry) (map[msgKey]bool, error) {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b *entry) int {
		return cmp.Or(strings.Compare(a.m.Source, b.m.Source), strings.Compare(a.m.ID, b.m.ID))
	})
	inserted := make(map[msgKey]bool, len(entries))
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(sorted), insertChunk) {
		chunk := sorted[lo:hi]
		var q strings.Builder
		q.WriteString(`INSERT INTO troupe_flow_events (source, message_id, flow_id, definition, role, type, subject, causation_id, msg_time, recorded_at) VALUES `)
		args := make([]any, 0, 1+9*len(chunk))
		args = append(args, now)
		for i, e := range chunk {
			if i > 0 {
				q.WriteString(", ")
			}
			n := len(args)
			fmt.Fprintf(&q, "($%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $1)", n+1, n+2, n+3, n+4, n+5, n+6, n+7, n+8, n+9)
			args = append(args, e.m.Source, e.m.ID, e.flow, e.defName(), string(e.role), e.m.Type, e.m.Subject, e.m.CausationID, e.at)
		}
		q.WriteString(" ON CONFLICT DO NOTHING RETURNING source, message_id")
		rows, err := tx.Query(ctx, q.String(), args...)
		if err != nil {
			return nil, fmt.Errorf("flow: record %d messages: %w", len(chunk), err)
		}
		for rows.Next() {
			var k msgKey
			if err := rows.Scan(&k.source, &k.id); err != nil {
				rows.Close()
				return nil, fmt.Errorf("flow: record messages: %w", err)
			}
			inserted[k] = true
		}
		if err := rows.Close(); err != nil {
			return nil, fmt.Errorf("flow: record %d messages: %w", len(chunk), err)
		}
	}
	return inserted, nil
}

// update is what the newly recorded messages of one definition change in
// one flow.
type update struct {
	flow, name string // name "" for undeclared messages only
	events     int
	startedAt  time.Time // earliest message time
	updatedAt  time.Time
	status     Status     // Running, or the outcome of the first terminal message
	endedAt    *time.Time // time of that message
	reason     string     // the flow's reason if these messages end it
	// Notes for a flow that had ended already: alsoFailed applies to a
	// completed flow, alsoCompleted to a failed one.
	alsoFailed, alsoCompleted []string
}

// flowUpdates folds entries, in their order, into one update per flow and
// definition, ordered by flow id (the order in which the flows' rows are
// locked, so two transactions do not deadlock). The messages of
// undeclared types count with the flow's first definition.
func flowUpdates(entries []*entry, now time.Time) []*update {
	byFlow := map[string][]*update{}
	for _, e := range entries {
		us := byFlow[e.flow]
		var u *update
		for _, c := range us {
			if c.name == e.defName() || e.def == nil {
				u = c
				break
			}
		}
		if u == nil && len(us) > 0 && us[0].name == "" {
			u = us[0] // undeclared messages came first; this definition takes them
			u.name = e.defName()
		}
		if u == nil {
			u = &update{flow: e.flow, name: e.defName(), startedAt: e.at, updatedAt: now, status: Running}
			byFlow[e.flow] = append(us, u)
		}
		u.events++
		if e.at.Before(u.startedAt) {
			u.startedAt = e.at
		}
		var outcome Status
		switch e.role {
		case RoleComplete:
			outcome = Completed
			u.alsoCompleted = append(u.alsoCompleted, note(e))
		case RoleFail:
			outcome = Failed
			u.alsoFailed = append(u.alsoFailed, note(e))
		default:
			continue
		}
		switch {
		case u.status == Running:
			u.status, u.endedAt, u.reason = outcome, &e.at, e.reason
		case u.status != outcome:
			u.reason = joinNotes(u.reason, note(e))
		}
	}
	ids := slices.Sorted(maps.Keys(byFlow))
	var out []*update
	for _, id := range ids {
		out = append(out, byFlow[id]...)
	}
	return out
}

// note describes a terminal message that came after the flow had ended
// with the other outcome.
func note(e *entry) string {
	if e.role == RoleComplete {
		return "also completed by " + e.m.Type
	}
	if e.reason == "" {
		return "also failed by " + e.m.Type
	}
	return "also failed by " + e.m.Type + ": " + e.reason
}

func joinNotes(reason string, notes ...string) string {
	parts := slices.DeleteFunc(append([]string{reason}, notes...), func(s string) bool { return s == "" })
	return strings.Join(parts, "; ")
}

// write applies u to its flow's row in one statement. A new flow's row is
// inserted; an existing one is merged under its row lock, so concurrent
// trackers lose no update: counts add up, the start time is the earliest,
// and the first terminal message to be written decides the status, while
// later ones with the other outcome only add a note. Messages of another
// definition than the flow's count as events but change no status.
func (u *update) write(ctx context.Context, tx sqldb.Tx) error {
	var err error
	if u.name == "" {
		// Undeclared messages only: the flow is known, so its row exists.
		least := "MIN"
		if tx.Dialect() == sqldb.Postgres {
			least = "LEAST"
		}
		_, err = tx.Exec(ctx, `UPDATE troupe_flows SET events = events + $2, started_at = `+least+`(started_at, $3), updated_at = $4 WHERE id = $1`,
			u.flow, u.events, u.startedAt, u.updatedAt)
	} else {
		var ended any
		if u.endedAt != nil {
			ended = *u.endedAt
		}
		_, err = tx.Exec(ctx, upsertSQL(tx.Dialect()),
			u.flow, u.name, string(u.status), u.reason, u.startedAt, u.updatedAt, ended, u.events,
			strings.Join(u.alsoFailed, "; "), strings.Join(u.alsoCompleted, "; "))
	}
	if err != nil {
		return fmt.Errorf("flow: update flow %q: %w", u.flow, err)
	}
	return nil
}

// upsertSQL returns the statement that inserts or merges a flow's row:
// $1 id, $2 name, $3 status, $4 reason, $5 started_at, $6 updated_at,
// $7 ended_at, $8 events, $9 the "also failed" notes, $10 the "also
// completed" notes.
func upsertSQL(d sqldb.Dialect) string {
	least, greatest := "MIN", "MAX"
	if d == sqldb.Postgres {
		least, greatest = "LEAST", "GREATEST"
	}
	return `INSERT INTO troupe_flows AS f (id, name, status, reason, started_at, updated_at, ended_at, events)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (id) DO UPDATE SET
	status = CASE WHEN f.status = 'running' AND f.name = excluded.name THEN excluded.status ELSE f.status END,
	ended_at = CASE WHEN f.status = 'running' AND f.name = excluded.name THEN excluded.ended_at ELSE f.ended_at END,
	reason = CASE
		WHEN f.name <> excluded.name THEN f.reason
		WHEN f.status = 'running' THEN excluded.reason
		WHEN f.status = 'completed' AND $9 <> '' THEN f.reason || CASE WHEN f.reason = '' THEN '' ELSE '; ' END || $9
		WHEN f.status = 'failed' AND $10 <> '' THEN f.reason || CASE WHEN f.reason = '' THEN '' ELSE '; ' END || $10
		ELSE f.reason END,
	started_at = ` + least + `(f.started_at, excluded.started_at),
	updated_at = ` + greatest + `(f.updated_at, excluded.updated_at),
	events = f.events + excluded.events`
}

// maxReason is the most bytes of a reason kept from one message.
const maxReason = 1024

// reason returns why m failed its flow, cut to maxReason bytes.
func reason(d *Definition, m *message.Message) string {
	var r string
	if d.Reason != nil {
		r = d.Reason(m)
	} else {
		r = defaultReason(m)
	}
	if len(r) <= maxReason {
		return r
	}
	r = r[:maxReason]
	for len(r) > 0 && !utf8.ValidString(r) {
		r = r[:len(r)-1]
	}
	return r
}

func defaultReason(m *message.Message) string {
	if r := m.Extensions[ExtReason]; r != "" {
		return r
	}
	if len(m.Data) == 0 || (m.DataContentType != "" && !strings.Contains(m.DataContentType, "json")) {
		return ""
	}
	var v struct {
		Reason string `json:"reason"`
	}
	if json.Unmarshal(m.Data, &v) != nil {
		return ""
	}
	return v.Reason
}

func anys[T any](s []T) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}
