package saga

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

//go:embed migrations
var migrationFS embed.FS

// Component is the name under which the sagas' migrations are recorded.
const Component = "saga"

// Migrate creates or updates the saga tables in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("saga: %w", err)
	}
	return db.Migrate(ctx, Component, migs)
}

// Status is a saga instance's state.
type Status string

// The statuses. Their values are stored.
const (
	// Running: steps go forward.
	Running Status = "running"
	// Compensating: a step failed; completed steps are undone in reverse.
	Compensating Status = "compensating"
	// Completed: every step succeeded.
	Completed Status = "completed"
	// Compensated: a step failed and every completed step was undone.
	Compensated Status = "compensated"
	// Parked: a compensation could not be done; an operator decides.
	Parked Status = "parked"
)

// DeadlineHandler is the timer handler name under which an orchestrator
// receives its steps' deadlines.
const DeadlineHandler = "troupe.saga.deadline"

// deadlineType is the type of deadline timers' messages.
const deadlineType = "dev.troupe.saga.deadline"

// extAttempt carries a deadline's attempt number.
const extAttempt = "sagaattempt"

// extFirstAttempt carries, on a compensation's deadline, the attempt that
// began its sends: the first, or the first after an operator's RetryTx.
// The waits of the compensation's deadlines are counted from it.
const extFirstAttempt = "sagafirstattempt"

// Errors callers test with errors.Is.
var (
	// ErrUnknownSaga is returned for a saga name and version no definition
	// registered.
	ErrUnknownSaga = errors.New("saga: no such saga definition")
	// ErrExists is returned by StartTx for a saga id already used; the
	// caller's transaction holds the new saga's first steps and must be
	// rolled back.
	ErrExists = errors.New("saga: a saga with this id exists")
)

// Config tunes an Orchestrator.
type Config struct {
	// Source is the owning service's CloudEvents source, e.g.
	// "/services/order". Required.
	Source string
	// ReplyTopic is the topic participants reply to; subscribe Handler to
	// it. Required.
	ReplyTopic string
	// Logger receives transitions that were ignored or failed. Default:
	// discard.
	Logger *slog.Logger
	// Now is the clock of history entries and deadlines. Default: the
	// scheduler's clock.
	Now func() time.Time
}

// An Orchestrator runs sagas whose state lives in its service's database:
// every transition (start, reply, deadline) is one local transaction that
// records the new state, the history entry, and the next commands in the
// outbox. It needs no coordinator: several instances of the service share
// the replies (the broker's group) and the deadlines (the timer
// scheduler), and each transition locks its saga's row.
type Orchestrator struct {
	db    *sqldb.DB
	sched *timer.Scheduler
	ib    *inbox.Inbox
	cfg   Config
	log   *slog.Logger

	mu   sync.RWMutex
	defs map[string]*definition // by name and version
}

// New returns an orchestrator on db. sched must be a timer scheduler on the
// same database (deadlines fire in its transactions), ib an inbox on it
// (replies are handled once). db needs the saga, outbox, inbox and timer
// tables. New registers the deadline handler and the HTTP steps' outcome
// handler with sched (DeadlineHandler, HTTPDoneHandler).
func New(db *sqldb.DB, sched *timer.Scheduler, ib *inbox.Inbox, cfg Config) (*Orchestrator, error) {
	var errs []error
	if db == nil || sched == nil || ib == nil {
		errs = append(errs, errors.New("New needs a database, a timer scheduler and an inbox"))
	}
	if cfg.Source == "" {
		errs = append(errs, errors.New("empty Source"))
	}
	if cfg.ReplyTopic == "" {
		errs = append(errs, errors.New("empty ReplyTopic"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("saga: invalid config: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = sched.Now
	}
	o := &Orchestrator{db: db, sched: sched, ib: ib, cfg: cfg, log: cfg.Logger, defs: map[string]*definition{}}
	if err := sched.Handle(DeadlineHandler, o.onDeadline); err != nil {
		return nil, err
	}
	if err := sched.Handle(HTTPDoneHandler, o.onHTTPDone); err != nil {
		return nil, err
	}
	return o, nil
}

func defKey(name string, version int) string { return name + "@" + strconv.Itoa(version) }

// Register adds a definition (a *Definition[D] of any D). A name and
// version can be registered once.
func (o *Orchestrator) Register(def registration) error {
	d, err := def.erase()
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	key := defKey(d.name, d.version)
	if o.defs[key] != nil {
		return fmt.Errorf("%w %q: version %d is registered already (give a changed definition a new Version)", ErrInvalidDefinition, d.name, d.version)
	}
	o.defs[key] = d
	return nil
}

func (o *Orchestrator) definition(name string, version int) (*definition, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	d := o.defs[defKey(name, version)]
	if d == nil {
		return nil, fmt.Errorf("%w: %q version %d", ErrUnknownSaga, name, version)
	}
	return d, nil
}

// Handler returns the broker handler for ReplyTopic; consumer names the
// subscription's group. Each batch is handled in the order of its sagas'
// ids (each saga's replies keep their order), so that several
// subscriptions of the group, whose batches may concern the same sagas,
// lock their rows in the same order instead of deadlocking. A batch is
// handled set-wise by HandleRepliesTx, or reply by reply by HandleReplyTx
// when that fails (see inbox.BatchHandler).
func (o *Orchestrator) Handler(consumer string) broker.Handler {
	h := o.ib.BatchHandler(consumer, o.HandleRepliesTx, o.HandleReplyTx)
	return func(ctx context.Context, batch []*broker.Delivery) {
		slices.SortStableFunc(batch, func(a, b *broker.Delivery) int {
			return strings.Compare(replySaga(a), replySaga(b))
		})
		h(ctx, batch)
	}
}

func replySaga(d *broker.Delivery) string {
	if d.Msg == nil {
		return ""
	}
	return d.Msg.Extensions[ExtSagaID]
}

// instance is a saga's row.
type instance struct {
	id, name   string
	version    int
	status     Status
	step       int
	awaiting   string
	attempt    int
	branches   map[string]*branchState // the branches of the group at step, nil when none
	data       []byte
	reason     string
	historySeq int
	pending    []any // history rows recorded, not yet written: 8 values each
	created    time.Time
	// unsaved: the row is not stored yet (a saga being started); save
	// INSERTs it instead of updating it.
	unsaved bool
	// batch, when not nil, gathers what save, sendMember and conclude
	// would write, to be written for a whole batch of sagas at its end.
	batch *batch
}

func (o *Orchestrator) startTx(ctx context.Context, tx sqldb.Tx, name string, version int, id string, data []byte) error {
	def, err := o.definition(name, version)
	if err != nil {
		return err
	}
	// The row is written once, by advance's save, with the state the
	// first steps lead to: ErrExists comes from that INSERT.
	in := &instance{id: id, name: name, version: version, status: Running, data: data, created: o.cfg.Now().UTC(), unsaved: true}
	o.record(in, "", "", 0, "started", "")
	return o.advance(ctx, tx, def, in)
}

// load reads and locks a saga's row.
func (o *Orchestrator) load(ctx context.Context, tx sqldb.Tx, id string) (*instance, error) {
	q := `SELECT id, name, version, status, step, awaiting, attempt, branches, data, reason, history_seq, created_at FROM troupe_sagas WHERE id = $1`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	in := &instance{}
	var status, branches string
	err := tx.QueryRow(ctx, q, id).Scan(&in.id, &in.name, &in.version, &status, &in.step, &in.awaiting, &in.attempt, &branches, &in.data, &in.reason, &in.historySeq, &in.created)
	if err != nil {
		return nil, err
	}
	in.status = Status(status)
	if in.branches, err = decodeBranches(branches); err != nil {
		return nil, fmt.Errorf("saga: %q: %w", id, err)
	}
	return in, nil
}

// save writes the saga's row and the history recorded since the last
// save (one statement each). A saga being started (unsaved) has its row
// INSERTed, first: its id may be taken (ErrExists), and its history rows
// would then collide with the other saga's. In a batch (in.batch), both
// are left to the batch, written for all its sagas at its end.
func (o *Orchestrator) save(ctx context.Context, tx sqldb.Tx, in *instance) error {
	if b := in.batch; b != nil {
		b.history = append(b.history, in.pending...)
		in.pending = in.pending[:0]
		rows := &b.sagas
		if in.unsaved {
			rows = &b.inserts
		}
		if !slices.Contains(*rows, in) {
			*rows = append(*rows, in)
		}
		return nil
	}
	branches, err := encodeBranches(in.branches)
	if err != nil {
		return fmt.Errorf("saga: save %q: %w", in.id, err)
	}
	now := o.cfg.Now().UTC()
	inserted := in.unsaved
	if inserted {
		// tx.Exec, not ExecLater: the row count tells whether the id was
		// free.
		n, err := tx.Exec(ctx, `INSERT INTO troupe_sagas (id, name, version, status, step, awaiting, attempt, branches, data, reason,
			history_seq, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING`,
			in.id, in.name, in.version, string(in.status), in.step, in.awaiting, in.attempt, branches, in.data, in.reason,
			in.historySeq, in.created, now)
		if err != nil {
			return fmt.Errorf("saga: start %q: %w", in.id, err)
		}
		if n == 0 {
			return fmt.Errorf("%w: %q", ErrExists, in.id)
		}
		in.unsaved = false
	}
	if err := o.writeHistory(ctx, tx, in); err != nil {
		return err
	}
	if inserted {
		return nil // the row has the state already
	}
	err = sqldb.ExecLater(ctx, tx, `UPDATE troupe_sagas SET status = $1, step = $2, awaiting = $3, attempt = $4, branches = $5, data = $6, reason = $7,
		history_seq = $8, updated_at = $9 WHERE id = $10`,
		string(in.status), in.step, in.awaiting, in.attempt, branches, in.data, in.reason, in.historySeq, now, in.id)
	if err != nil {
		return fmt.Errorf("saga: save %q: %w", in.id, err)
	}
	return nil
}

// writeHistory writes the history rows in.pending holds, in statements of
// at most maxHistoryRows rows (the queries' arguments stay under SQLite's
// limit), and empties it. Nothing waits for their result: on PostgreSQL
// they travel with the transaction's next statement or its commit.
func (o *Orchestrator) writeHistory(ctx context.Context, tx sqldb.Tx, in *instance) error {
	for len(in.pending) > 0 {
		rows := in.pending[:min(len(in.pending), maxHistoryRows*8)]
		in.pending = in.pending[len(rows):]
		var b strings.Builder
		b.WriteString(`INSERT INTO troupe_saga_history (saga_id, seq, step, op, attempt, event, detail, at) VALUES `)
		for i := range len(rows) / 8 {
			if i > 0 {
				b.WriteString(", ")
			}
			b.WriteByte('(')
			for c := range 8 {
				if c > 0 {
					b.WriteString(", ")
				}
				b.WriteString("$" + strconv.Itoa(i*8+c+1))
			}
			b.WriteByte(')')
		}
		if err := sqldb.ExecLater(ctx, tx, b.String(), rows...); err != nil {
			return fmt.Errorf("saga: record history of %q: %w", in.id, err)
		}
	}
	in.pending = in.pending[:0]
	return nil
}

// maxHistoryRows is the most history rows one INSERT writes.
const maxHistoryRows = 500

// record adds a history entry, written by the next save (every transition
// ends with one).
func (o *Orchestrator) record(in *instance, step, op string, attempt int, event, detail string) {
	in.historySeq++
	in.pending = append(in.pending, in.id, in.historySeq, step, op, attempt, event, detail, o.cfg.Now().UTC())
}

// park stops the saga for an operator, with the reason.
func (o *Orchestrator) park(in *instance, reason string) {
	in.status, in.reason, in.awaiting = Parked, reason, ""
	o.log.Error("saga: parked for an operator", "saga", in.id, "reason", reason)
}

// advance runs the saga forward (or backward, compensating) from its
// current step until it awaits a reply or ends, then saves it.
func (o *Orchestrator) advance(ctx context.Context, tx sqldb.Tx, def *definition, in *instance) error {
	for {
		switch in.status {
		case Running:
			if in.step >= len(def.steps) {
				if def.onCompleted != nil {
					if err := def.onCompleted(ctx, tx, in.id, in.data); err != nil {
						return err
					}
				}
				in.status = Completed
				o.record(in, "", "", 0, "completed", "")
				return o.save(ctx, tx, in)
			}
			st := def.steps[in.step]
			if st.isGroup() {
				if in.branches == nil {
					if err := o.fork(ctx, tx, in, st); err != nil {
						return err
					}
					continue // a local branch may have refused
				}
				if !joined(st, in.branches) {
					return o.save(ctx, tx, in)
				}
				in.branches = nil
				in.step++
				continue
			}
			if !st.isLocal() {
				return o.send(ctx, tx, in, st, Action, in.attempt+1)
			}
			data, refused, err := o.runLocal(ctx, tx, in, st.local, false)
			if err != nil {
				return err
			}
			if refused != nil {
				o.record(in, st.name, Action.String(), 1, "refused", refused.Error())
				o.startCompensating(in, refused.Error())
				continue
			}
			in.data = data
			o.record(in, st.name, Action.String(), 1, "done", "")
			in.step++
		case Compensating:
			if in.step < 0 {
				if def.onCompensated != nil {
					if err := def.onCompensated(ctx, tx, in.id, in.data, in.reason); err != nil {
						return err
					}
				}
				in.status = Compensated
				o.record(in, "", "", 0, "compensated", in.reason)
				return o.save(ctx, tx, in)
			}
			st := def.steps[in.step]
			if st.isGroup() {
				settled, err := o.undoGroup(ctx, tx, in, st)
				if err != nil {
					return err
				}
				if !settled {
					return o.save(ctx, tx, in) // awaiting compensations, or parked
				}
				in.branches = nil
				in.step--
				continue
			}
			if !st.isLocal() {
				// The first send of the compensation, or the first after
				// an operator's RetryTx: its waits start anew.
				return o.send(ctx, tx, in, st, Compensation, in.attempt+1)
			}
			if ok, err := o.undoLocal(ctx, tx, in, st); err != nil || !ok {
				if err != nil {
					return err
				}
				return o.save(ctx, tx, in)
			}
			in.step--
		default:
			return o.save(ctx, tx, in)
		}
	}
}

// undoLocal compensates a completed local step (or branch) st. A
// compensation that fails is not retried blindly: it parks the saga (ok
// false) for an operator (RetryTx, AbortTx).
func (o *Orchestrator) undoLocal(ctx context.Context, tx sqldb.Tx, in *instance, st step) (ok bool, err error) {
	if st.undoLocal != nil {
		data, failed, err := o.runLocal(ctx, tx, in, st.undoLocal, true)
		if err != nil {
			return false, err
		}
		if failed != nil {
			o.record(in, st.name, Compensation.String(), 1, "failed", failed.Error())
			o.park(in, fmt.Sprintf("compensation of step %q failed: %v", st.name, failed))
			return false, nil
		}
		in.data = data
	}
	o.record(in, st.name, Compensation.String(), 1, "done", "")
	return true, nil
}

// startCompensating turns the saga around at its current step, which
// failed: the steps before it are undone.
func (o *Orchestrator) startCompensating(in *instance, reason string) {
	in.status, in.reason, in.awaiting, in.attempt = Compensating, reason, "", 0
	in.step--
}

// runLocal runs a local step under a savepoint, so that a refusal undoes
// its writes. With anyError, every error of f counts as its refusal
// (compensations, which have no refusal of their own).
func (o *Orchestrator) runLocal(ctx context.Context, tx sqldb.Tx, in *instance,
	f func(context.Context, sqldb.Tx, string, []byte) ([]byte, error), anyError bool) (data []byte, refused error, err error) {
	// Nothing waits for the savepoint either: on PostgreSQL it travels
	// with f's first statement, or with the rollback or release.
	if err := sqldb.ExecLater(ctx, tx, "SAVEPOINT troupe_saga_step"); err != nil {
		return nil, nil, fmt.Errorf("saga: savepoint: %w", err)
	}
	// The messages that outbox.Add keeps for later in this transaction (a
	// batch's, this saga's or one that started it) before f's: a refusal
	// drops f's with its other writes.
	deferred := outbox.DeferredFrom(ctx, tx)
	held := 0
	if deferred != nil {
		held = deferred.Len()
	}
	data, ferr := f(ctx, tx, in.id, in.data)
	var r *refusal
	if errors.As(ferr, &r) || (anyError && ferr != nil) {
		if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_saga_step"); err != nil {
			return nil, nil, fmt.Errorf("saga: roll back a refused step: %w", err)
		}
		if deferred != nil {
			deferred.Truncate(held)
		}
		if r != nil {
			return nil, r.err, nil
		}
		return nil, ferr, nil
	}
	if ferr != nil {
		return nil, nil, ferr
	}
	// Nothing waits for the release: on PostgreSQL it travels with the
	// transaction's next statement.
	if err := sqldb.ExecLater(ctx, tx, "RELEASE SAVEPOINT troupe_saga_step"); err != nil {
		return nil, nil, fmt.Errorf("saga: release savepoint: %w", err)
	}
	return data, nil, nil
}

// deadlineID is the timer id of a sent command's deadline.
func deadlineID(sagaID string, step int, op Op, attempt int) string {
	return "saga-deadline/" + sagaID + "/" + strconv.Itoa(step) + "/" + op.String() + "/" + strconv.Itoa(attempt)
}

// branchDeadlineID is the timer id of the deadline of a command sent for a
// group's branch.
func branchDeadlineID(sagaID string, group int, branch string, op Op, attempt int) string {
	return "saga-deadline/" + sagaID + "/" + strconv.Itoa(group) + "." + branch + "/" + op.String() + "/" + strconv.Itoa(attempt)
}

// deadlineOf returns the timer id of the deadline of m's side op, attempt:
// m is the current step, or a branch (inGroup) of the current group.
func deadlineOf(in *instance, m step, inGroup bool, op Op, attempt int) string {
	if inGroup {
		return branchDeadlineID(in.id, in.step, m.name, op, attempt)
	}
	return deadlineID(in.id, in.step, op, attempt)
}

// send sends side op of the current step st, as attempt and the first of
// a round of sends, and saves the saga awaiting its reply.
func (o *Orchestrator) send(ctx context.Context, tx sqldb.Tx, in *instance, st step, op Op, attempt int) error {
	if err := o.sendMember(ctx, tx, in, st, false, op, attempt, attempt); err != nil {
		return err
	}
	in.awaiting, in.attempt = op.String(), attempt
	return o.save(ctx, tx, in)
}

// sendMember sends side op of m, the current step or a branch (inGroup) of
// the current group: its command into the outbox, or its HTTP call as a
// timer task; then it schedules the deadline and records the sending.
// first is the attempt that began this round of sends (the first, or the
// first after an operator's RetryTx), from which a compensation's waits
// are counted.
func (o *Orchestrator) sendMember(ctx context.Context, tx sqldb.Tx, in *instance, m step, inGroup bool, op Op, attempt, first int) error {
	input, err := m.input(in.data)
	if err != nil {
		return err
	}
	var detail string
	if m.isHTTP() {
		if detail, err = o.callHTTP(ctx, tx, in, m, op, attempt, input); err != nil {
			return err
		}
	} else {
		cmd, err := NewCommand(o.cfg.Source, m.command, in.id, m.name, op, o.cfg.ReplyTopic, input)
		if err != nil {
			return err
		}
		// In a batch, ctx defers the insert to the batch's end (newBatch).
		if err := outbox.Add(ctx, tx, m.topic, cmd); err != nil {
			return err
		}
		detail = cmd.ID
	}
	dl := message.New(o.cfg.Source, deadlineType, nil)
	dl.ID = deadlineOf(in, m, inGroup, op, attempt)
	dl.Subject, dl.CorrelationID = in.id, in.id
	dl.Extensions = map[string]string{ExtSagaID: in.id, ExtStep: m.name, ExtOp: op.String(), extAttempt: strconv.Itoa(attempt)}
	if op == Compensation {
		dl.Extensions[extFirstAttempt] = strconv.Itoa(first)
	}
	wait, _ := m.wait(op, attempt-first)
	// A deadline of this id that exists already (this send repeated) is
	// kept.
	if in.batch != nil {
		message.InheritCause(ctx, dl)
		in.batch.timers = append(in.batch.timers, timer.Timer{At: o.cfg.Now().Add(wait), Target: timer.ToHandler(DeadlineHandler), Msg: dl})
	} else if err := o.sched.ScheduleLaterTx(ctx, tx, o.cfg.Now().Add(wait), timer.ToHandler(DeadlineHandler), dl); err != nil {
		return err
	}
	o.record(in, m.name, op.String(), attempt, "sent", detail)
	return nil
}

// awaited finds what awaits an answer to side op of the step or branch
// named name: the current step (branch nil), or a branch of the current
// group with its state, and the attempt the answer is for.
func awaited(def *definition, in *instance, name string, op Op) (m step, branch *branchState, attempt int, ok bool) {
	if in.step < 0 || in.step >= len(def.steps) {
		return step{}, nil, 0, false
	}
	st := def.steps[in.step]
	if !st.isGroup() {
		if st.name != name || in.awaiting != op.String() {
			return step{}, nil, 0, false
		}
		return st, nil, in.attempt, true
	}
	b, found := st.branch(name)
	bs := in.branches[name]
	want, status := branchSent, Running
	if op == Compensation {
		want, status = branchUndoing, Compensating
	}
	if !found || bs == nil || bs.Status != want || in.status != status {
		return step{}, nil, 0, false
	}
	return b, bs, bs.Attempt, true
}

// verdictKind is how one side of a step or branch ended.
type verdictKind int

const (
	// succeeded: the participant did it.
	succeeded verdictKind = iota + 1
	// refused: a business refusal; a refused action did nothing.
	refused
	// lost: no answer came in time (every attempt's deadline passed, or an
	// HTTP call failed on its last attempt); an action may have run.
	lost
)

// verdict is the end of one side of a step or branch.
type verdict struct {
	kind verdictKind
	// reason is the participant's reason of a refusal, or why the side
	// counts as lost.
	reason string
	// reply is a successful action's reply, for OnReply.
	reply *ReplyMsg
	// atDeadline: the side's deadline timer is the one firing (it records
	// the deadline and deletes itself).
	atDeadline bool
}

// conclude applies the end of side op of m (the current step, or the
// branch bs of the current group), then advances the saga.
func (o *Orchestrator) conclude(ctx context.Context, tx sqldb.Tx, def *definition, in *instance, m step, bs *branchState, op Op, attempt int, v verdict) error {
	inGroup := bs != nil
	if !v.atDeadline {
		// Not CancelTx: a scheduler firing this deadline holds the timer's
		// row and waits for the saga's, which this transaction holds. It
		// then finds the side answered and does nothing.
		if err := o.cancelDeadline(ctx, tx, in, deadlineOf(in, m, inGroup, op, attempt)); err != nil {
			return err
		}
	}
	if m.isHTTP() && v.kind == lost {
		// A call still being retried: its outcome no longer matters.
		if err := o.sched.TryCancelLaterTx(ctx, tx, httpTaskID(in.id, m.name, op)); err != nil {
			return err
		}
	}
	if !inGroup {
		in.awaiting = ""
	}
	switch {
	case op == Action && v.kind == succeeded:
		if m.onReply != nil && v.reply != nil {
			data, err := m.onReply(in.data, v.reply)
			if err != nil {
				return err
			}
			in.data = data
		}
		o.record(in, m.name, op.String(), attempt, "done", "")
		if inGroup {
			bs.Status, bs.Attempt = branchDone, 0
		} else {
			in.step, in.attempt = in.step+1, 0
		}
	case op == Action && v.kind == refused:
		o.record(in, m.name, op.String(), attempt, "refused", v.reason)
		if inGroup {
			bs.Status, bs.Attempt = branchRefused, 0
			in.status, in.reason = Compensating, v.reason
		} else {
			o.startCompensating(in, v.reason)
		}
	case op == Action:
		// The action may have been applied with its answer lost or late:
		// compensate this step too. If it never ran, its participant's
		// barrier makes the compensation a no-op and refuses the action
		// should it still arrive.
		if !v.atDeadline {
			o.record(in, m.name, op.String(), attempt, "failed", v.reason)
		}
		if inGroup {
			bs.Status, bs.Attempt = branchDue, 0
			in.status, in.reason = Compensating, v.reason
		} else {
			o.startCompensating(in, v.reason)
			in.step++
		}
	case v.kind == succeeded:
		o.record(in, m.name, op.String(), attempt, "done", "")
		if inGroup {
			bs.Status, bs.Attempt = branchUndone, 0
		} else {
			in.step, in.attempt = in.step-1, 0
		}
	case v.kind == refused:
		o.record(in, m.name, op.String(), attempt, "refused", v.reason)
		o.park(in, fmt.Sprintf("compensation of step %q refused: %s", m.name, v.reason))
	default:
		if !v.atDeadline {
			o.record(in, m.name, op.String(), attempt, "failed", v.reason)
		}
		o.park(in, v.reason)
	}
	return o.advance(ctx, tx, def, in)
}

// HandleReplyTx applies a participant's reply in tx (Handler calls it in the
// inbox's transaction). A reply the saga no longer awaits (a late or
// repeated one) is recorded in the history and otherwise ignored.
func (o *Orchestrator) HandleReplyTx(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	r, err := ParseReply(m)
	if err != nil {
		return inbox.Permanent(err)
	}
	in, err := o.load(ctx, tx, r.SagaID)
	if errors.Is(err, sqldb.ErrNoRows) {
		return inbox.Permanent(fmt.Errorf("saga: reply for unknown saga %q", r.SagaID))
	}
	if err != nil {
		return fmt.Errorf("saga: load %q: %w", r.SagaID, err)
	}
	return o.apply(ctx, tx, in, r)
}

// apply applies reply r to in, loaded and locked in tx.
func (o *Orchestrator) apply(ctx context.Context, tx sqldb.Tx, in *instance, r *ReplyMsg) error {
	def, err := o.definition(in.name, in.version)
	if err != nil {
		return err
	}
	st, bs, attempt, ok := awaited(def, in, r.Step, r.Op)
	if !ok {
		o.log.Info("saga: ignoring a reply the saga does not await", "saga", in.id, "step", r.Step, "op", r.Op, "status", in.status)
		o.record(in, r.Step, r.Op.String(), 0, "ignored-reply", r.Outcome.String())
		return o.save(ctx, tx, in)
	}
	v := verdict{kind: succeeded, reply: r}
	if r.Outcome != Succeeded {
		v = verdict{kind: refused, reason: r.Reason}
	}
	return o.conclude(ctx, tx, def, in, st, bs, r.Op, attempt, v)
}

// batch gathers the writes of a batch of sagas (HandleRepliesTx,
// startManyTx) that are made once for the lot, at its end.
type batch struct {
	inserts []*instance      // the new sagas, whose rows to insert
	sagas   []*instance      // the sagas whose rows to update, in the order first saved
	history []any            // the history rows, 8 values each, in the order recorded
	cancels []string         // the deadline timers to cancel
	outbox  *outbox.Deferred // the messages sent: commands, and local steps' own
	timers  []timer.Timer    // their deadlines
}

// newBatch starts a batch of sagas in tx, and returns it with ctx, in which
// outbox.Add given tx defers its messages to the batch (see
// outbox.Defer): the commands the sagas send, and the messages their local
// steps add, are written by a few statements at the batch's end
// (writeBatch) instead of one each.
func newBatch(ctx context.Context, tx sqldb.Tx) (context.Context, *batch) {
	ctx, d := outbox.Defer(ctx, tx)
	return ctx, &batch{outbox: d}
}

// cancelDeadline withdraws the deadline timer id of in, answered or
// abandoned: in a batch, with the batch's cancellations (or, if the batch
// scheduled it, by not scheduling it); alone, at once.
func (o *Orchestrator) cancelDeadline(ctx context.Context, tx sqldb.Tx, in *instance, id string) error {
	if b := in.batch; b != nil {
		b.timers = slices.DeleteFunc(b.timers, func(t timer.Timer) bool { return t.Msg.ID == id })
		b.cancels = append(b.cancels, id)
		return nil
	}
	return o.sched.TryCancelLaterTx(ctx, tx, id)
}

// HandleRepliesTx applies participants' replies in tx, as HandleReplyTx
// applies each in turn, but set-wise where it can: the sagas are loaded and
// locked by one statement, and their rows, their history and the
// cancellation of their answered deadlines are written by one statement
// each at the end (on PostgreSQL; on SQLite, whose statements cost no round
// trip, a statement per saga). What the steps do in between (a local step,
// a command sent) runs as for a single reply, in the order of the replies,
// except that the messages they add to the outbox (the commands, and those
// a local step adds with outbox.Add and the ctx it is given) are inserted
// together at the end, in the order added (see outbox.Defer); a local
// step that refuses takes its messages back with its other writes (not a
// rollback to a savepoint of the step's own).
// Several replies to one saga are applied in turn to the one row.
//
// It fails, and writes nothing, when one of the replies is malformed or is
// for an unknown saga: Handler then applies them one by one with
// HandleReplyTx, which dead-letters those.
func (o *Orchestrator) HandleRepliesTx(ctx context.Context, tx sqldb.Tx, msgs []*message.Message) error {
	replies := make([]*ReplyMsg, len(msgs))
	ids := make([]string, 0, len(msgs))
	for i, m := range msgs {
		r, err := ParseReply(m)
		if err != nil {
			return err
		}
		replies[i] = r
		ids = append(ids, r.SagaID)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	sagas, err := o.loadMany(ctx, tx, ids)
	if err != nil {
		return err
	}
	ctx, b := newBatch(ctx, tx)
	for i, r := range replies {
		in := sagas[r.SagaID]
		if in == nil {
			return fmt.Errorf("saga: reply for unknown saga %q", r.SagaID)
		}
		in.batch = b
		if err := o.apply(message.WithCause(ctx, msgs[i]), tx, in, r); err != nil {
			return err
		}
	}
	return o.writeBatch(ctx, tx, b)
}

// insertBatch inserts the rows of new sagas, as save does for one: ErrExists
// when an id is taken (or given twice).
func (o *Orchestrator) insertBatch(ctx context.Context, tx sqldb.Tx, sagas []*instance) error {
	if len(sagas) == 0 {
		return nil
	}
	if tx.Dialect() != sqldb.Postgres {
		for _, in := range sagas {
			in.batch = nil
			if err := o.save(ctx, tx, in); err != nil {
				return err
			}
		}
		return nil
	}
	now := o.cfg.Now().UTC()
	n := len(sagas)
	id, name, status, awaiting, branches, reason := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	version, step, attempt, seq := make([]int32, n), make([]int32, n), make([]int32, n), make([]int32, n)
	data := make([][]byte, n)
	created := make([]time.Time, n)
	for i, in := range sagas {
		br, err := encodeBranches(in.branches)
		if err != nil {
			return fmt.Errorf("saga: start %q: %w", in.id, err)
		}
		id[i], name[i], status[i], awaiting[i], branches[i], reason[i] = in.id, in.name, string(in.status), in.awaiting, br, in.reason
		version[i], step[i], attempt[i], seq[i], data[i], created[i] = int32(in.version), int32(in.step), int32(in.attempt), int32(in.historySeq), in.data, in.created
	}
	rows, err := tx.Query(ctx, `INSERT INTO troupe_sagas (id, name, version, status, step, awaiting, attempt, branches, data, reason, history_seq, created_at, updated_at)
		SELECT v.*, $13::timestamptz FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[], $6::text[], $7::int[], $8::text[], $9::bytea[],
			$10::text[], $11::int[], $12::timestamptz[]) AS v
		ON CONFLICT (id) DO NOTHING RETURNING id`, id, name, version, status, step, awaiting, attempt, branches, data, reason, seq, created, now)
	if err != nil {
		return fmt.Errorf("saga: start %d sagas: %w", n, err)
	}
	inserted := make(map[string]bool, n)
	for rows.Next() {
		var got string
		if err := rows.Scan(&got); err != nil {
			rows.Close()
			return fmt.Errorf("saga: start %d sagas: %w", n, err)
		}
		inserted[got] = true
	}
	if err := rows.Close(); err != nil {
		return fmt.Errorf("saga: start %d sagas: %w", n, err)
	}
	for _, in := range sagas {
		if !inserted[in.id] {
			return fmt.Errorf("%w: %q", ErrExists, in.id)
		}
		in.unsaved = false
	}
	if len(inserted) < n {
		return fmt.Errorf("%w: an id is given twice", ErrExists)
	}
	return nil
}

// startManyTx starts instances of one definition in tx, set-wise (see
// Definition.StartManyTx).
func (o *Orchestrator) startManyTx(ctx context.Context, tx sqldb.Tx, name string, version int, ids []string, data [][]byte, causes []*message.Message) error {
	def, err := o.definition(name, version)
	if err != nil {
		return err
	}
	ctx, b := newBatch(ctx, tx)
	now := o.cfg.Now().UTC()
	for i, id := range ids {
		in := &instance{id: id, name: name, version: version, status: Running, data: data[i], created: now, unsaved: true, batch: b}
		o.record(in, "", "", 0, "started", "")
		sctx := ctx
		if causes[i] != nil {
			sctx = message.WithCause(ctx, causes[i])
		}
		if err := o.advance(sctx, tx, def, in); err != nil {
			return err
		}
	}
	return o.writeBatch(ctx, tx, b)
}

// loadMany reads and locks the sagas of ids (sorted: on PostgreSQL their
// rows are locked in that order), by id; an unknown id is left out.
func (o *Orchestrator) loadMany(ctx context.Context, tx sqldb.Tx, ids []string) (map[string]*instance, error) {
	out := make(map[string]*instance, len(ids))
	if tx.Dialect() != sqldb.Postgres {
		for _, id := range ids {
			in, err := o.load(ctx, tx, id)
			if errors.Is(err, sqldb.ErrNoRows) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("saga: load %q: %w", id, err)
			}
			out[id] = in
		}
		return out, nil
	}
	rows, err := tx.Query(ctx, `SELECT id, name, version, status, step, awaiting, attempt, branches, data, reason, history_seq, created_at
		FROM troupe_sagas WHERE id = ANY($1) ORDER BY id FOR UPDATE`, ids)
	if err != nil {
		return nil, fmt.Errorf("saga: load %d sagas: %w", len(ids), err)
	}
	defer rows.Close()
	for rows.Next() {
		in := &instance{}
		var status, branches string
		if err := rows.Scan(&in.id, &in.name, &in.version, &status, &in.step, &in.awaiting, &in.attempt, &branches, &in.data, &in.reason, &in.historySeq, &in.created); err != nil {
			return nil, fmt.Errorf("saga: load %d sagas: %w", len(ids), err)
		}
		in.status = Status(status)
		if in.branches, err = decodeBranches(branches); err != nil {
			return nil, fmt.Errorf("saga: %q: %w", in.id, err)
		}
		out[in.id] = in
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("saga: load %d sagas: %w", len(ids), err)
	}
	return out, nil
}

// writeBatch writes what a batch of sagas gathered: the new sagas' rows
// first (ErrExists when an id is taken), then the commands sent, the
// answered deadlines' cancellation, the new deadlines, the history and the
// other sagas' rows.
func (o *Orchestrator) writeBatch(ctx context.Context, tx sqldb.Tx, b *batch) error {
	if err := o.insertBatch(ctx, tx, b.inserts); err != nil {
		return err
	}
	if err := b.outbox.Flush(ctx); err != nil {
		return err
	}
	// The answered deadlines first, as a saga applying its replies one
	// by one cancels a deadline before it sends anything new.
	if err := o.sched.TryCancelLaterTx(ctx, tx, b.cancels...); err != nil {
		return err
	}
	if err := o.sched.ScheduleAllLaterTx(ctx, tx, b.timers...); err != nil {
		return err
	}
	if tx.Dialect() != sqldb.Postgres {
		for _, in := range b.sagas {
			in.batch = nil
			if err := o.save(ctx, tx, in); err != nil {
				return err
			}
		}
		if len(b.history) > 0 {
			in := &instance{pending: b.history}
			return o.writeHistory(ctx, tx, in)
		}
		return nil
	}
	now := o.cfg.Now().UTC()
	n := len(b.sagas)
	id, status, awaiting, branches, reason := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	step, attempt, seq := make([]int32, n), make([]int32, n), make([]int32, n)
	data := make([][]byte, n)
	for i, in := range b.sagas {
		br, err := encodeBranches(in.branches)
		if err != nil {
			return fmt.Errorf("saga: save %q: %w", in.id, err)
		}
		id[i], status[i], awaiting[i], branches[i], reason[i] = in.id, string(in.status), in.awaiting, br, in.reason
		step[i], attempt[i], seq[i], data[i] = int32(in.step), int32(in.attempt), int32(in.historySeq), in.data
	}
	if n > 0 {
		err := sqldb.ExecLater(ctx, tx, `UPDATE troupe_sagas AS s SET status = v.status, step = v.step, awaiting = v.awaiting, attempt = v.attempt,
			branches = v.branches, data = v.data, reason = v.reason, history_seq = v.history_seq, updated_at = $10
			FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::int[], $6::text[], $7::bytea[], $8::text[], $9::int[])
				AS v(id, status, step, awaiting, attempt, branches, data, reason, history_seq)
			WHERE s.id = v.id`, id, status, step, awaiting, attempt, branches, data, reason, seq, now)
		if err != nil {
			return fmt.Errorf("saga: save %d sagas: %w", n, err)
		}
	}
	h := len(b.history) / 8
	if h == 0 {
		return nil
	}
	sagaID, hstep, op, event, detail := make([]string, h), make([]string, h), make([]string, h), make([]string, h), make([]string, h)
	hseq, hattempt := make([]int32, h), make([]int32, h)
	at := make([]time.Time, h)
	for i := range h {
		r := b.history[i*8 : i*8+8]
		sagaID[i], hseq[i], hstep[i], op[i] = r[0].(string), int32(r[1].(int)), r[2].(string), r[3].(string)
		hattempt[i], event[i], detail[i], at[i] = int32(r[4].(int)), r[5].(string), r[6].(string), r[7].(time.Time)
	}
	err := sqldb.ExecLater(ctx, tx, `INSERT INTO troupe_saga_history (saga_id, seq, step, op, attempt, event, detail, at)
		SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::timestamptz[])`,
		sagaID, hseq, hstep, op, hattempt, event, detail, at)
	if err != nil {
		return fmt.Errorf("saga: record the history of %d sagas: %w", n, err)
	}
	return nil
}

// deadlineFailuresBeforeParking is how many times handling one deadline may
// fail (an unregistered definition version, a step's Input that panics, the
// database refusing) before the saga is parked instead: a saga whose
// deadline timer gave up would otherwise wait forever.
const deadlineFailuresBeforeParking = 3

// onDeadline handles a deadline timer (see deadline); when that fails for
// the deadlineFailuresBeforeParking-th time, it parks the saga with the
// error as the reason.
func (o *Orchestrator) onDeadline(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	if _, err := tx.Exec(ctx, "SAVEPOINT troupe_saga_deadline"); err != nil {
		return err
	}
	err := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("panic: %v", r)
			}
		}()
		return o.deadline(ctx, tx, f)
	}()
	if err == nil {
		_, err = tx.Exec(ctx, "RELEASE SAVEPOINT troupe_saga_deadline")
		return err
	}
	if f.Attempt < deadlineFailuresBeforeParking {
		return err
	}
	if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_saga_deadline"); rerr != nil {
		return errors.Join(err, rerr)
	}
	in, lerr := o.load(ctx, tx, f.Msg.Extensions[ExtSagaID])
	if lerr != nil {
		return errors.Join(err, lerr)
	}
	o.record(in, f.Msg.Extensions[ExtStep], f.Msg.Extensions[ExtOp], 0, "failed", err.Error())
	o.park(in, fmt.Sprintf("handling the deadline of step %q failed %d times: %v", f.Msg.Extensions[ExtStep], f.Attempt, err))
	return o.save(ctx, tx, in)
}

// deadline handles a deadline: the command is sent again, or, after the
// last attempt (an HTTP step's first deadline is its last: its calls were
// retried meanwhile), the action counts as failed (compensate) or the
// compensation parks the saga. An action's last attempt is its
// MaxAttempts-th; a compensation's is the one whose deadline brings the
// time waited since the round's first send to its CompensationTimeout.
func (o *Orchestrator) deadline(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	m := f.Msg
	id, stepName := m.Extensions[ExtSagaID], m.Extensions[ExtStep]
	op, _ := parseOp(m.Extensions[ExtOp])
	attempt, _ := strconv.Atoi(m.Extensions[extAttempt])
	first, err := strconv.Atoi(m.Extensions[extFirstAttempt])
	if err != nil || first < 1 || first > attempt {
		first = attempt // a deadline that does not say: its waits start anew
	}
	in, err := o.load(ctx, tx, id)
	if errors.Is(err, sqldb.ErrNoRows) {
		return nil
	}
	if err != nil {
		return err
	}
	def, err := o.definition(in.name, in.version)
	if err != nil {
		return err
	}
	st, bs, current, ok := awaited(def, in, stepName, op)
	if !ok || current != attempt {
		return nil // answered meanwhile
	}
	wait, waited := st.wait(op, attempt-first)
	o.record(in, st.name, op.String(), attempt, "deadline", wait.String())
	again := attempt < st.maxAttempts
	if op == Compensation {
		again = waited < st.compensationTimeout
	}
	if !st.isHTTP() && again {
		if err := o.sendMember(ctx, tx, in, st, bs != nil, op, attempt+1, first); err != nil {
			return err
		}
		if bs != nil {
			bs.Attempt = attempt + 1
		} else {
			in.awaiting, in.attempt = op.String(), attempt+1
		}
		return o.save(ctx, tx, in)
	}
	var reason string
	switch {
	case st.isHTTP() && op == Compensation:
		reason = fmt.Sprintf("step %q: no answer to the compensation within %v", st.name, waited)
	case st.isHTTP():
		reason = fmt.Sprintf("step %q: no answer to the %s within its deadline (%v)", st.name, op, st.deadline)
	case op == Compensation:
		reason = fmt.Sprintf("step %q: no reply to the compensation within %v (%d attempts)", st.name, waited, attempt-first+1)
	default:
		reason = fmt.Sprintf("step %q: no reply to the %s after %d attempts", st.name, op, attempt)
	}
	return o.conclude(ctx, tx, def, in, st, bs, op, attempt, verdict{kind: lost, reason: reason, atDeadline: true})
}

// Info is a saga instance as stored.
type Info struct {
	// ID and Name identify the instance and its definition.
	ID   string `json:"id"`
	Name string `json:"name"`
	// Version is the definition's version.
	Version int `json:"version"`
	// Status is where it stands; Reason why it compensated or is parked.
	Status Status `json:"status"`
	// Reason explains a compensation or a parking.
	Reason string `json:"reason,omitempty"`
	// Step is the index of the step in progress.
	Step int `json:"step"`
	// Data is the saga's data, as JSON.
	Data []byte `json:"data,omitempty"`
}

// MarshalJSON encodes the instance with its data as the JSON it is, not as
// base64, for APIs and dashboards.
func (in Info) MarshalJSON() ([]byte, error) {
	type plain Info
	var data json.RawMessage
	if json.Valid(in.Data) {
		data = in.Data
	}
	return json.Marshal(struct {
		plain
		Data json.RawMessage `json:"data,omitempty"`
	}{plain(in), data})
}

// Get reads a saga instance.
func (o *Orchestrator) Get(ctx context.Context, id string) (Info, error) {
	var in Info
	var status string
	err := o.db.QueryRow(ctx, `SELECT id, name, version, status, reason, step, data FROM troupe_sagas WHERE id = $1`, id).
		Scan(&in.ID, &in.Name, &in.Version, &status, &in.Reason, &in.Step, &in.Data)
	if err != nil {
		return Info{}, fmt.Errorf("saga: get %q: %w", id, err)
	}
	in.Status = Status(status)
	return in, nil
}
