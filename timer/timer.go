package timer

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

//go:embed migrations
var migrationFS embed.FS

// Component is the name under which the timers' migrations are recorded in
// troupe_migrations.
const Component = "timer"

// Table is the timers' table.
const Table = "troupe_timers"

// Errors callers test with errors.Is.
var (
	// ErrInPast is returned for a due time earlier than now by more than
	// Config.PastTolerance, or the zero time.
	ErrInPast = errors.New("timer: due time is in the past")
	// ErrExists is returned by ScheduleTx when a timer with the same id
	// exists: pending, or failed and kept for an operator (see Failed). The transaction is unharmed: a caller that schedules
	// idempotently (a deterministic message id) can treat it as success.
	ErrExists = errors.New("timer: a pending timer has this id")
	// ErrInvalidTimer is matched by the error for a timer that cannot be
	// stored: a nil or invalid message, an empty topic or handler name, a
	// bad HTTP task.
	ErrInvalidTimer = errors.New("timer: invalid timer")
	// ErrUnknownHandler is returned by Handle for an empty name, and wrapped
	// by Run's log lines; timers for a handler no running scheduler has
	// registered stay pending (see Handle).
	ErrUnknownHandler = errors.New("timer: unknown handler")
	// ErrRunning is returned by Run on a scheduler that is already running.
	ErrRunning = errors.New("timer: scheduler already running")
)

// Kind says how a timer's effect is delivered.
type Kind int

// The kinds of timers. The numbers are stored; they never change.
const (
	// KindTopic timers write their message to the outbox, to be published
	// on a topic, in the transaction that deletes the timer.
	KindTopic Kind = 1
	// KindHandler timers run a local handler in the transaction that
	// deletes the timer.
	KindHandler Kind = 2
	// KindHTTP timers call a URL (an HTTPTask), at least once.
	KindHTTP Kind = 3
)

// String returns "topic", "handler" or "http".
func (k Kind) String() string {
	switch k {
	case KindTopic:
		return "topic"
	case KindHandler:
		return "handler"
	case KindHTTP:
		return "http"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Target is where a timer's message goes when it fires: a topic, through the
// outbox (ToTopic), or a local handler (ToHandler).
type Target struct {
	kind Kind
	name string
}

// ToTopic targets the outbox: the fired message is added to the outbox for
// topic in the transaction that fires the timer, and published by the
// outbox relay. The outbox's tables must exist (outbox.Migrate).
func ToTopic(topic string) Target { return Target{kind: KindTopic, name: topic} }

// ToHandler targets the local handler registered under name (Handle): it runs
// in the transaction that fires the timer.
func ToHandler(name string) Target { return Target{kind: KindHandler, name: name} }

// Kind returns the target's kind.
func (t Target) Kind() Kind { return t.kind }

// Name returns the topic or the handler's name.
func (t Target) Name() string { return t.name }

// String returns "topic:NAME" or "handler:NAME".
func (t Target) String() string { return t.kind.String() + ":" + t.name }

func (t Target) validate() error {
	if t.kind != KindTopic && t.kind != KindHandler {
		return fmt.Errorf("%w: target has no kind (use ToTopic or ToHandler)", ErrInvalidTimer)
	}
	if t.name == "" {
		return fmt.Errorf("%w: empty %s name", ErrInvalidTimer, t.kind)
	}
	return nil
}

// Fired describes a timer that fired (or, for HTTP tasks, completed).
type Fired struct {
	// ID is the timer's id: its message's id, or the HTTP task's id.
	ID string
	// Kind is how it was delivered.
	Kind Kind
	// Target is the topic or the handler's name ("" for HTTP).
	Target string
	// Due is when it was due.
	Due time.Time
	// At is when it fired, by the scheduler's clock.
	At time.Time
	// Attempt counts tries, from 1. Timers into the outbox fire on their
	// first; handlers and HTTP tasks may need more.
	Attempt int
	// Schedule names the recurring schedule that made the timer, or "".
	Schedule string
	// Msg is the timer's message; for an HTTP task's OnDone handler, the
	// call's outcome (read it with HTTPOutcomeOf); nil for other HTTP tasks.
	Msg *message.Message
}

// A Scheduler stores timers and fires them. Any number of schedulers, in any
// number of processes, may run on one database: each due timer fires once.
// It is safe for concurrent use.
type Scheduler struct {
	db       *sqldb.DB
	cfg      Config
	log      *slog.Logger
	wake     chan struct{} // wakes the firing loop
	wakeHTTP chan struct{} // wakes the HTTP loop

	running sync.Mutex

	mu       sync.Mutex
	handlers map[string]HandlerFunc
}

// New returns a scheduler on db, whose timer tables Migrate has created.
// Timers can be scheduled at once; they fire while Run runs, here or in any
// other process on the same database.
func New(db *sqldb.DB, cfg Config) (*Scheduler, error) {
	if db == nil {
		return nil, fmt.Errorf("%w: nil *sqldb.DB", ErrInvalidConfig)
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	return &Scheduler{
		db:       db,
		cfg:      cfg,
		log:      cfg.Logger.With("scheduler", cfg.Owner),
		wake:     make(chan struct{}, 1),
		wakeHTTP: make(chan struct{}, 1),
		handlers: map[string]HandlerFunc{},
	}, nil
}

// Migrate creates or updates the timers' tables in db. It is safe to call
// from several processes at once, at every start-up.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("timer: %w", err)
	}
	return db.Migrate(ctx, Component, migs)
}

// Notify wakes the scheduler to look for due timers at once. Call it after
// committing a transaction that scheduled a timer due soon, in the process
// the scheduler runs in. It never blocks.
func (s *Scheduler) Notify() {
	for _, ch := range []chan struct{}{s.wake, s.wakeHTTP} {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Now returns the time by the scheduler's clock.
func (s *Scheduler) Now() time.Time { return s.cfg.Clock.Now() }

// checkDue refuses a zero due time and one too far in the past.
func (s *Scheduler) checkDue(at time.Time) error {
	if at.IsZero() {
		return fmt.Errorf("%w: zero time", ErrInPast)
	}
	now := s.cfg.Clock.Now()
	if at.Before(now.Add(-s.cfg.PastTolerance)) {
		return fmt.Errorf("%w: %s is %v before now (%s)", ErrInPast, at.UTC().Format(time.RFC3339Nano), now.Sub(at).Round(time.Millisecond), now.UTC().Format(time.RFC3339Nano))
	}
	return nil
}

// ScheduleTx stores in tx a timer that delivers msg to target at at. The
// timer exists once tx commits; nothing is stored if tx rolls back. The
// timer's id is the message's id (one is assigned when msg has none), so a
// service that derives the id from its own data (an order id and a step)
// can cancel the timer later without storing anything. A pending timer
// with the same id makes ScheduleTx return ErrExists and store nothing; a
// caller that would ignore ErrExists can save a round trip with
// ScheduleLaterTx.
//
// at may lie up to Config.PastTolerance in the past; an earlier time is
// ErrInPast. A message that lacks a causation id takes the flow of the
// message ctx carries (message.WithCause), as outbox.Add does.
func (s *Scheduler) ScheduleTx(ctx context.Context, tx sqldb.Tx, at time.Time, target Target, msg *message.Message) error {
	env, err := s.prepare(ctx, at, target, msg)
	if err != nil {
		return err
	}
	return s.insert(ctx, tx, msg.ID, target.kind, target.name, at, env, "")
}

// ScheduleLaterTx is ScheduleTx for a caller that does not need to know
// whether the timer was new: a pending or failed timer with the same id is
// left as it is, without ErrExists, and the INSERT is run by
// sqldb.ExecLater, so on PostgreSQL it travels with tx's next statement or
// its commit instead of costing a round trip of its own. Use it to schedule
// idempotently (an id derived from the caller's data, such as a saga's
// deadline) where ScheduleTx's ErrExists would be ignored anyway.
//
// The timer, its message and at are checked, and msg's id assigned, at once,
// as by ScheduleTx; an error of the INSERT itself is returned by tx's next
// statement or commit (see sqldb.ExecLater).
func (s *Scheduler) ScheduleLaterTx(ctx context.Context, tx sqldb.Tx, at time.Time, target Target, msg *message.Message) error {
	env, err := s.prepare(ctx, at, target, msg)
	if err != nil {
		return err
	}
	if err := sqldb.ExecLater(ctx, tx, insertTimer, s.timerRow(msg.ID, target.kind, target.name, at, env, "")...); err != nil {
		return fmt.Errorf("timer: schedule %q: %w", msg.ID, err)
	}
	return nil
}

// Timer is a timer to schedule with ScheduleAllLaterTx: at At, Msg goes to
// Target.
type Timer struct {
	At     time.Time
	Target Target
	Msg    *message.Message
}

// ScheduleAllLaterTx is ScheduleLaterTx for several timers, which on
// PostgreSQL one statement stores. Every timer is checked, and its
// message's id assigned, before any is queued: one that ScheduleTx would
// refuse fails the call and none is stored.
func (s *Scheduler) ScheduleAllLaterTx(ctx context.Context, tx sqldb.Tx, timers ...Timer) error {
	if len(timers) == 0 {
		return nil
	}
	envs := make([][]byte, len(timers))
	for i, t := range timers {
		env, err := s.prepare(ctx, t.At, t.Target, t.Msg)
		if err != nil {
			return err
		}
		envs[i] = env
	}
	if tx.Dialect() != sqldb.Postgres || len(timers) == 1 {
		for i, t := range timers {
			if err := sqldb.ExecLater(ctx, tx, insertTimer, s.timerRow(t.Msg.ID, t.Target.kind, t.Target.name, t.At, envs[i], "")...); err != nil {
				return fmt.Errorf("timer: schedule %q: %w", t.Msg.ID, err)
			}
		}
		return nil
	}
	n := len(timers)
	ids, targets := make([]string, n), make([]string, n)
	kinds := make([]int32, n)
	due := make([]time.Time, n)
	for i, t := range timers {
		ids[i], kinds[i], targets[i], due[i] = t.Msg.ID, int32(t.Target.kind), t.Target.name, t.At.UTC()
	}
	err := sqldb.ExecLater(ctx, tx, `INSERT INTO troupe_timers (id, kind, target, due_at, payload, schedule, created_at)
		SELECT id, kind, target, due_at, payload, '', $6 FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[], $5::bytea[])
			AS t(id, kind, target, due_at, payload)
		ON CONFLICT (id) DO NOTHING`, ids, kinds, targets, due, envs, s.cfg.Clock.Now().UTC())
	if err != nil {
		return fmt.Errorf("timer: schedule %d timers: %w", n, err)
	}
	return nil
}

// prepare checks a timer of ScheduleTx, gives msg an id and a cause, and
// returns its envelope.
func (s *Scheduler) prepare(ctx context.Context, at time.Time, target Target, msg *message.Message) ([]byte, error) {
	if err := target.validate(); err != nil {
		return nil, err
	}
	if msg == nil {
		return nil, fmt.Errorf("%w: nil message", ErrInvalidTimer)
	}
	if err := s.checkDue(at); err != nil {
		return nil, err
	}
	if msg.ID == "" {
		msg.ID = message.NewID()
	}
	message.InheritCause(ctx, msg)
	env, err := message.EncodeJSON(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: message %q: %w", ErrInvalidTimer, msg.ID, err)
	}
	if len(env) > message.DefaultMaxSize {
		return nil, fmt.Errorf("%w: message %q: its %d-byte envelope exceeds message.DefaultMaxSize", ErrInvalidTimer, msg.ID, len(env))
	}
	return env, nil
}

// Schedule is ScheduleTx in a transaction of its own.
func (s *Scheduler) Schedule(ctx context.Context, at time.Time, target Target, msg *message.Message) error {
	return s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		return s.ScheduleTx(ctx, tx, at, target, msg)
	})
}

// insertTimer stores one timer row; an existing id is left as it is.
const insertTimer = `INSERT INTO troupe_timers (id, kind, target, due_at, payload, schedule, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING`

// timerRow returns insertTimer's arguments.
func (s *Scheduler) timerRow(id string, kind Kind, target string, at time.Time, payload []byte, schedule string) []any {
	return []any{id, int(kind), target, at.UTC(), payload, schedule, s.cfg.Clock.Now().UTC()}
}

// insert stores one timer row, ErrExists when the id is taken.
func (s *Scheduler) insert(ctx context.Context, tx sqldb.Tx, id string, kind Kind, target string, at time.Time, payload []byte, schedule string) error {
	n, err := tx.Exec(ctx, insertTimer, s.timerRow(id, kind, target, at, payload, schedule)...)
	if err != nil {
		return fmt.Errorf("timer: schedule %q: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("%w: %q", ErrExists, id)
	}
	return nil
}

// CancelTx deletes the timer with this id in tx, and reports whether it did:
// false means no such timer is pending (it fired already, was cancelled, or
// never existed). A timer being fired by a concurrent transaction is waited
// for on PostgreSQL, so true always means the timer will never fire. An HTTP
// task whose call is already under way cannot be recalled: the call may
// still reach its URL (its result is then ignored). A failed timer is
// deleted too.
func (s *Scheduler) CancelTx(ctx context.Context, tx sqldb.Tx, id string) (bool, error) {
	n, err := tx.Exec(ctx, cancelQuery, id)
	if err != nil {
		return false, fmt.Errorf("timer: cancel %q: %w", id, err)
	}
	return n == 1, nil
}

// TryCancelTx is CancelTx that never waits: a timer that a concurrent
// transaction holds (a scheduler firing it) is left alone, and TryCancelTx
// reports false. Use it where the caller already holds a row the timer's
// handler locks (a saga's deadline): waiting there would deadlock. The
// handler must then find, once it gets the row, that it has nothing to do.
// A caller that would ignore the answer can save a round trip with
// TryCancelLaterTx.
func (s *Scheduler) TryCancelTx(ctx context.Context, tx sqldb.Tx, id string) (bool, error) {
	n, err := tx.Exec(ctx, tryCancelQuery(tx), id)
	if err != nil {
		return false, fmt.Errorf("timer: cancel %q: %w", id, err)
	}
	return n == 1, nil
}

// TryCancelLaterTx is TryCancelTx for a caller that does not need to know
// whether the timers were cancelled, for any number of ids: the DELETE is
// run by sqldb.ExecLater, so on PostgreSQL it travels with tx's next
// statement or its commit instead of costing a round trip of its own, and
// its error, if any, is returned by that statement or commit; several ids
// are deleted by one statement. It never waits either: a timer a
// concurrent transaction holds at that moment is left alone, and its
// handler must find that it has nothing to do. On SQLite, where write
// transactions take turns, it is CancelTx for each id. Use it where
// TryCancelTx's answer would be ignored: a saga withdrawing the deadline of
// a step that was answered.
func (s *Scheduler) TryCancelLaterTx(ctx context.Context, tx sqldb.Tx, ids ...string) error {
	var err error
	switch {
	case len(ids) == 0:
		return nil
	case len(ids) == 1 || tx.Dialect() != sqldb.Postgres:
		for _, id := range ids {
			if err = sqldb.ExecLater(ctx, tx, tryCancelQuery(tx), id); err != nil {
				break
			}
		}
	default:
		err = sqldb.ExecLater(ctx, tx, `DELETE FROM troupe_timers WHERE id IN
			(SELECT id FROM troupe_timers WHERE id = ANY($1) FOR UPDATE SKIP LOCKED)`, ids)
	}
	if err != nil {
		return fmt.Errorf("timer: cancel %q: %w", ids, err)
	}
	return nil
}

// tryCancelQuery deletes the timer $1 unless, on PostgreSQL, a concurrent
// transaction holds it. SQLite's write transactions are serialized.
func tryCancelQuery(tx sqldb.Tx) string {
	if tx.Dialect() != sqldb.Postgres {
		return cancelQuery
	}
	return `DELETE FROM troupe_timers WHERE id = (SELECT id FROM troupe_timers WHERE id = $1 FOR UPDATE SKIP LOCKED)`
}

// cancelQuery deletes the timer $1.
const cancelQuery = `DELETE FROM troupe_timers WHERE id = $1`

// Cancel is CancelTx in a transaction of its own.
func (s *Scheduler) Cancel(ctx context.Context, id string) (bool, error) {
	var ok bool
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		ok, err = s.CancelTx(ctx, tx, id)
		return err
	})
	return ok, err
}

// RescheduleTx moves the pending timer with this id to fire at at, and
// reports whether there was one. A failed timer is not moved (see RetryTx).
// An HTTP task whose call is under way has its lease cut short: another
// scheduler may call it again at at, before the first call's outcome is in.
func (s *Scheduler) RescheduleTx(ctx context.Context, tx sqldb.Tx, id string, at time.Time) (bool, error) {
	if err := s.checkDue(at); err != nil {
		return false, err
	}
	n, err := tx.Exec(ctx, `UPDATE troupe_timers SET due_at = $1 WHERE id = $2 AND failed_at IS NULL`, at.UTC(), id)
	if err != nil {
		return false, fmt.Errorf("timer: reschedule %q: %w", id, err)
	}
	return n == 1, nil
}
