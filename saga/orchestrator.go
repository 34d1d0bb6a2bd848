package saga

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"log/slog"
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

// Errors callers test with errors.Is.
var (
	// ErrUnknownSaga is returned for a saga name and version no definition
	// registered.
	ErrUnknownSaga = errors.New("saga: no such saga definition")
	// ErrExists is returned by StartTx for a saga id already used.
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
// tables. New registers the deadline handler with sched.
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
// subscription's group.
func (o *Orchestrator) Handler(consumer string) broker.Handler {
	return o.ib.Handler(consumer, o.HandleReplyTx)
}

// instance is a saga's row.
type instance struct {
	id, name   string
	version    int
	status     Status
	step       int
	awaiting   string
	attempt    int
	data       []byte
	reason     string
	historySeq int
	pending    []any // history rows recorded, not yet written: 8 values each
	created    time.Time
}

func (o *Orchestrator) startTx(ctx context.Context, tx sqldb.Tx, name string, version int, id string, data []byte) error {
	def, err := o.definition(name, version)
	if err != nil {
		return err
	}
	now := o.cfg.Now().UTC()
	n, err := tx.Exec(ctx, `INSERT INTO troupe_sagas (id, name, version, status, step, data, created_at, updated_at)
		VALUES ($1, $2, $3, $4, 0, $5, $6, $6) ON CONFLICT (id) DO NOTHING`, id, name, version, string(Running), data, now)
	if err != nil {
		return fmt.Errorf("saga: start %q: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: %q", ErrExists, id)
	}
	in := &instance{id: id, name: name, version: version, status: Running, data: data, created: now}
	if err := o.record(in, "", "", 0, "started", ""); err != nil {
		return err
	}
	return o.advance(ctx, tx, def, in)
}

// load reads and locks a saga's row.
func (o *Orchestrator) load(ctx context.Context, tx sqldb.Tx, id string) (*instance, error) {
	q := `SELECT id, name, version, status, step, awaiting, attempt, data, reason, history_seq, created_at FROM troupe_sagas WHERE id = $1`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	in := &instance{}
	var status string
	err := tx.QueryRow(ctx, q, id).Scan(&in.id, &in.name, &in.version, &status, &in.step, &in.awaiting, &in.attempt, &in.data, &in.reason, &in.historySeq, &in.created)
	if err != nil {
		return nil, err
	}
	in.status = Status(status)
	return in, nil
}

// save writes the history recorded since the last save, in one statement,
// and the saga's row.
func (o *Orchestrator) save(ctx context.Context, tx sqldb.Tx, in *instance) error {
	if n := len(in.pending) / 8; n > 0 {
		var b strings.Builder
		b.WriteString(`INSERT INTO troupe_saga_history (saga_id, seq, step, op, attempt, event, detail, at) VALUES `)
		for i := range n {
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
		if _, err := tx.Exec(ctx, b.String(), in.pending...); err != nil {
			return fmt.Errorf("saga: record history of %q: %w", in.id, err)
		}
		in.pending = in.pending[:0]
	}
	_, err := tx.Exec(ctx, `UPDATE troupe_sagas SET status = $1, step = $2, awaiting = $3, attempt = $4, data = $5, reason = $6,
		history_seq = $7, updated_at = $8 WHERE id = $9`,
		string(in.status), in.step, in.awaiting, in.attempt, in.data, in.reason, in.historySeq, o.cfg.Now().UTC(), in.id)
	if err != nil {
		return fmt.Errorf("saga: save %q: %w", in.id, err)
	}
	return nil
}

// record adds a history entry, written by the next save (every transition
// ends with one).
func (o *Orchestrator) record(in *instance, step, op string, attempt int, event, detail string) error {
	in.historySeq++
	in.pending = append(in.pending, in.id, in.historySeq, step, op, attempt, event, detail, o.cfg.Now().UTC())
	return nil
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
				if err := o.record(in, "", "", 0, "completed", ""); err != nil {
					return err
				}
				return o.save(ctx, tx, in)
			}
			st := def.steps[in.step]
			if !st.isLocal() {
				return o.send(ctx, tx, def, in, Action, in.attempt+1)
			}
			data, refused, err := o.runLocal(ctx, tx, in, st.local, false)
			if err != nil {
				return err
			}
			if refused != nil {
				if err := o.record(in, st.name, Action.String(), 1, "refused", refused.Error()); err != nil {
					return err
				}
				o.startCompensating(in, refused.Error())
				continue
			}
			in.data = data
			if err := o.record(in, st.name, Action.String(), 1, "done", ""); err != nil {
				return err
			}
			in.step++
		case Compensating:
			if in.step < 0 {
				if def.onCompensated != nil {
					if err := def.onCompensated(ctx, tx, in.id, in.data, in.reason); err != nil {
						return err
					}
				}
				in.status = Compensated
				if err := o.record(in, "", "", 0, "compensated", in.reason); err != nil {
					return err
				}
				return o.save(ctx, tx, in)
			}
			st := def.steps[in.step]
			if !st.isLocal() {
				return o.send(ctx, tx, def, in, Compensation, in.attempt+1)
			}
			if st.undoLocal != nil {
				data, failed, err := o.runLocal(ctx, tx, in, st.undoLocal, true)
				if err != nil {
					return err
				}
				if failed != nil {
					// A compensation that fails is not retried blindly:
					// the saga waits for an operator (RetryTx, AbortTx).
					in.status, in.reason = Parked, fmt.Sprintf("compensation of step %q failed: %v", st.name, failed)
					o.log.Error("saga: parked for an operator", "saga", in.id, "reason", in.reason)
					if err := o.record(in, st.name, Compensation.String(), 1, "failed", failed.Error()); err != nil {
						return err
					}
					return o.save(ctx, tx, in)
				}
				in.data = data
			}
			if err := o.record(in, st.name, Compensation.String(), 1, "done", ""); err != nil {
				return err
			}
			in.step--
		default:
			return o.save(ctx, tx, in)
		}
	}
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
	if _, err := tx.Exec(ctx, "SAVEPOINT troupe_saga_step"); err != nil {
		return nil, nil, fmt.Errorf("saga: savepoint: %w", err)
	}
	data, ferr := f(ctx, tx, in.id, in.data)
	var r *refusal
	if errors.As(ferr, &r) || (anyError && ferr != nil) {
		if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_saga_step"); err != nil {
			return nil, nil, fmt.Errorf("saga: roll back a refused step: %w", err)
		}
		if r != nil {
			return nil, r.err, nil
		}
		return nil, ferr, nil
	}
	if ferr != nil {
		return nil, nil, ferr
	}
	if _, err := tx.Exec(ctx, "RELEASE SAVEPOINT troupe_saga_step"); err != nil {
		return nil, nil, fmt.Errorf("saga: release savepoint: %w", err)
	}
	return data, nil, nil
}

// deadlineID is the timer id of a sent command's deadline.
func deadlineID(sagaID string, step int, op Op, attempt int) string {
	return "saga-deadline/" + sagaID + "/" + strconv.Itoa(step) + "/" + op.String() + "/" + strconv.Itoa(attempt)
}

// send writes the current step's command (attempt n) to the outbox,
// schedules its deadline, and saves the saga awaiting the reply.
func (o *Orchestrator) send(ctx context.Context, tx sqldb.Tx, def *definition, in *instance, op Op, attempt int) error {
	st := def.steps[in.step]
	input, err := st.input(in.data)
	if err != nil {
		return err
	}
	cmd, err := NewCommand(o.cfg.Source, st.command, in.id, st.name, op, o.cfg.ReplyTopic, input)
	if err != nil {
		return err
	}
	if err := outbox.Add(ctx, tx, st.topic, cmd); err != nil {
		return err
	}
	dl := message.New(o.cfg.Source, deadlineType, nil)
	dl.ID = deadlineID(in.id, in.step, op, attempt)
	dl.Subject, dl.CorrelationID = in.id, in.id
	dl.Extensions = map[string]string{ExtSagaID: in.id, ExtStep: st.name, ExtOp: op.String(), extAttempt: strconv.Itoa(attempt)}
	if err := o.sched.ScheduleTx(ctx, tx, o.cfg.Now().Add(st.deadline), timer.ToHandler(DeadlineHandler), dl); err != nil && !errors.Is(err, timer.ErrExists) {
		return err
	}
	in.awaiting, in.attempt = op.String(), attempt
	if err := o.record(in, st.name, op.String(), attempt, "sent", cmd.ID); err != nil {
		return err
	}
	return o.save(ctx, tx, in)
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
	def, err := o.definition(in.name, in.version)
	if err != nil {
		return err
	}
	if in.awaiting != r.Op.String() || in.step < 0 || in.step >= len(def.steps) || def.steps[in.step].name != r.Step {
		o.log.Info("saga: ignoring a reply the saga does not await", "saga", in.id, "step", r.Step, "op", r.Op, "status", in.status)
		if err := o.record(in, r.Step, r.Op.String(), 0, "ignored-reply", r.Outcome.String()); err != nil {
			return err
		}
		return o.save(ctx, tx, in)
	}
	st := def.steps[in.step]
	// Not CancelTx: a scheduler firing this deadline holds the timer's row
	// and waits for the saga's, which this transaction holds. It then finds
	// the command answered and does nothing.
	if _, err := o.sched.TryCancelTx(ctx, tx, deadlineID(in.id, in.step, r.Op, in.attempt)); err != nil {
		return err
	}
	in.awaiting = ""
	switch {
	case r.Op == Action && r.Outcome == Succeeded:
		if st.onReply != nil {
			data, err := st.onReply(in.data, r)
			if err != nil {
				return err
			}
			in.data = data
		}
		if err := o.record(in, st.name, r.Op.String(), in.attempt, "done", ""); err != nil {
			return err
		}
		in.step, in.attempt = in.step+1, 0
	case r.Op == Action:
		if err := o.record(in, st.name, r.Op.String(), in.attempt, "refused", r.Reason); err != nil {
			return err
		}
		o.startCompensating(in, r.Reason)
	case r.Outcome == Succeeded:
		if err := o.record(in, st.name, r.Op.String(), in.attempt, "done", ""); err != nil {
			return err
		}
		in.step, in.attempt = in.step-1, 0
	default:
		reason := fmt.Sprintf("compensation of step %q refused: %s", st.name, r.Reason)
		if err := o.record(in, st.name, r.Op.String(), in.attempt, "refused", r.Reason); err != nil {
			return err
		}
		in.status, in.reason = Parked, reason
		o.log.Error("saga: parked for an operator", "saga", in.id, "reason", reason)
	}
	return o.advance(ctx, tx, def, in)
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
	reason := fmt.Sprintf("handling the deadline of step %q failed %d times: %v", f.Msg.Extensions[ExtStep], f.Attempt, err)
	in.status, in.reason, in.awaiting = Parked, reason, ""
	o.log.Error("saga: parked for an operator", "saga", in.id, "reason", reason)
	if rerr := o.record(in, f.Msg.Extensions[ExtStep], f.Msg.Extensions[ExtOp], 0, "failed", err.Error()); rerr != nil {
		return errors.Join(err, rerr)
	}
	return o.save(ctx, tx, in)
}

// deadline handles a command's deadline: the command is sent again, or,
// after the last attempt, the action counts as failed (compensate) or the
// compensation parks the saga.
func (o *Orchestrator) deadline(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	m := f.Msg
	id, stepName := m.Extensions[ExtSagaID], m.Extensions[ExtStep]
	op, _ := parseOp(m.Extensions[ExtOp])
	attempt, _ := strconv.Atoi(m.Extensions[extAttempt])
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
	if in.awaiting != op.String() || in.attempt != attempt || in.step < 0 || in.step >= len(def.steps) || def.steps[in.step].name != stepName {
		return nil // answered meanwhile
	}
	st := def.steps[in.step]
	if err := o.record(in, st.name, op.String(), attempt, "deadline", st.deadline.String()); err != nil {
		return err
	}
	if attempt < st.maxAttempts {
		return o.send(ctx, tx, def, in, op, attempt+1)
	}
	in.awaiting = ""
	reason := fmt.Sprintf("step %q: no reply to the %s after %d attempts", st.name, op, attempt)
	if op == Action {
		// The action may have been applied with its reply lost or late:
		// compensate this step too. If it never ran, its participant's
		// barrier makes the compensation a no-op and refuses the action
		// should it still arrive.
		o.startCompensating(in, reason)
		in.step++
	} else {
		in.status, in.reason = Parked, reason
		o.log.Error("saga: parked for an operator", "saga", in.id, "reason", reason)
	}
	return o.advance(ctx, tx, def, in)
}

// Info is a saga instance as stored.
type Info struct {
	// ID, Name and Version identify the instance and its definition.
	ID, Name string
	// Version is the definition's version.
	Version int
	// Status is where it stands; Reason why it compensated or is parked.
	Status Status
	// Reason explains a compensation or a parking.
	Reason string
	// Step is the index of the step in progress.
	Step int
	// Data is the saga's data, as JSON.
	Data []byte
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
