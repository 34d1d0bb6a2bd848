package bench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// TimerOptions is what the timer benchmark takes beyond Config.
type TimerOptions struct {
	// Pending is the number of timers loaded before the schedulers start.
	// Default 100,000 with mode drain, 1,000,000 with mode steady.
	Pending int
	// Target is what the timers fire into: "handler" (the default), a local
	// handler that inserts one row into an effects table, or "topic", the
	// outbox. No relay runs: the benchmark measures firing, not publishing.
	Target string
}

// The timer benchmark's modes and targets.
const (
	TimerDrain   = "drain"
	TimerSteady  = "steady"
	TimerHandler = "handler"
	TimerTopic   = "topic"
)

// Timer returns the timer benchmark. Config.Mode picks what it measures:
//
//   - drain (the default): opts.Pending timers, all due, are fired by
//     Concurrency schedulers until none is left; the throughput is fires per
//     second, the lateness each timer's wait in the backlog.
//   - steady: opts.Pending timers fall due at Config.Rate per second
//     (default 1,000/s) from shortly after the schedulers start; the
//     lateness is measured for those due within Duration, while the rest
//     stay pending.
//
// Lateness is Fired.At (read by the scheduler after its firing transaction
// committed) minus the timer's due time. Config.Batch is the schedulers'
// BatchSize. Every run checks that each timer fired at most once, and that
// each due within the measured window fired.
func Timer(opts TimerOptions) Benchmark {
	return Benchmark{
		Name:    "timer",
		Summary: "durable timers: fires/s draining a due backlog (--mode drain) or lateness with many pending at a steady due rate (--mode steady --rate N); --pending N, --target handler|topic",
		Run: func(ctx context.Context, cfg Config) (*Result, error) {
			return runTimer(ctx, cfg, opts)
		},
	}
}

// timerRun is one run's settings, defaults applied.
type timerRun struct {
	mode    string
	target  string
	pending int
	rate    int           // steady: timers falling due per second
	lead    time.Duration // steady: from the schedulers' start to the first due time
}

func timerSettings(cfg Config, opts TimerOptions) (timerRun, error) {
	r := timerRun{mode: cmp.Or(cfg.Mode, TimerDrain), target: cmp.Or(opts.Target, TimerHandler), pending: opts.Pending, rate: cfg.Rate}
	var errs []string
	switch r.mode {
	case TimerDrain:
		if cfg.Rate > 0 {
			errs = append(errs, "--rate applies to --mode steady only (a drain fires a backlog as fast as it can)")
		}
		r.pending = cmp.Or(r.pending, 100_000)
	case TimerSteady:
		r.pending = cmp.Or(r.pending, 1_000_000)
		r.rate = cmp.Or(r.rate, 1_000)
		r.lead = min(2*time.Second, cfg.Duration) // for the schedulers to start and settle
	default:
		errs = append(errs, fmt.Sprintf("--mode %q: want drain or steady", r.mode))
	}
	if r.target != TimerHandler && r.target != TimerTopic {
		errs = append(errs, fmt.Sprintf("--target %q: want handler or topic", r.target))
	}
	if r.pending < 0 {
		errs = append(errs, fmt.Sprintf("--pending %d: want a positive number of timers", r.pending))
	}
	if len(errs) > 0 {
		return r, errors.New(strings.Join(errs, "; "))
	}
	return r, nil
}

// Names of the benchmark's timers and of what they fire into.
const (
	timerIDPrefix   = "bench-timer-"
	timerHandler    = "bench.timer"
	timerTopic      = "bench.timer"
	timerEffects    = "bench_timer_effects"
	timerLoadChunk  = 50_000 // timers per COPY or per SQLite transaction
	timerStallLimit = 30 * time.Second
)

// timerID returns the id of the benchmark's i-th timer. The ids sort in
// the order of i, which is also their due order.
func timerID(i int) string { return fmt.Sprintf("%s%09d", timerIDPrefix, i) }

func runTimer(ctx context.Context, cfg Config, opts TimerOptions) (*Result, error) {
	run, err := timerSettings(cfg, opts)
	if err != nil {
		return nil, err
	}
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	bdb, err := openDB(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	defer bdb.close()
	db, release, err := timerDB(ctx, cfg, bdb.db)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := timer.Migrate(ctx, db); err != nil {
		return nil, err
	}
	if err := outbox.Migrate(ctx, db); err != nil {
		return nil, err
	}
	if _, err := db.Exec(ctx, "DROP TABLE IF EXISTS "+timerEffects); err != nil {
		return nil, fmt.Errorf("drop the effects table: %w", err)
	}
	if _, err := db.Exec(ctx, "CREATE TABLE "+timerEffects+" (timer_id TEXT NOT NULL, due_at TIMESTAMP NOT NULL)"); err != nil {
		return nil, fmt.Errorf("create the effects table: %w", err)
	}

	// Due times are laid out before loading, on a clock that is set after
	// it (see shiftedClock): drain makes every timer due at base; steady
	// spaces them 1/rate apart from base.
	base := time.Now().UTC().Truncate(time.Second)
	due := func(i int) time.Time { return base }
	window := run.pending // timers measured: those due before the end
	if run.mode == TimerSteady {
		due = func(i int) time.Time {
			return base.Add(time.Duration(float64(i) * float64(time.Second) / float64(run.rate)))
		}
		end := base.Add(cfg.Duration)
		window = sort.Search(run.pending, func(i int) bool { return !due(i).Before(end) })
	}

	fmt.Fprintf(cfg.Progress, "bench timer: %s; mode %s, target %s, %d timers, %d scheduler(s), BatchSize %d\n",
		bdb.description, run.mode, run.target, run.pending, cfg.Concurrency, cfg.Batch)
	loadStart := time.Now()
	if err := loadTimers(ctx, cfg, db, run, due); err != nil {
		return nil, err
	}
	loadElapsed := time.Since(loadStart)

	var rec Recorder
	tr := newFireTracker(run.pending, window, &rec)
	logged := &countingHandler{}
	clock := &shiftedClock{}
	scheds := make([]*timer.Scheduler, cfg.Concurrency)
	for i := range scheds {
		s, err := timer.New(db, timer.Config{
			Clock:     clock,
			Logger:    slog.New(logged),
			Owner:     fmt.Sprintf("bench-%d", i),
			BatchSize: cfg.Batch,
			OnFired:   tr.onFired,
		})
		if err != nil {
			return nil, err
		}
		if run.target == TimerHandler {
			insert := "INSERT INTO " + timerEffects + " (timer_id, due_at) VALUES ($1, $2)"
			if err := s.Handle(timerHandler, func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				_, err := tx.Exec(ctx, insert, f.ID, f.Due)
				return err
			}); err != nil {
				return nil, err
			}
		}
		scheds[i] = s
	}

	clock.set(base.Add(-run.lead))
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	stopAll := func() { stop(); wg.Wait() }
	defer stopAll()
	for _, s := range scheds {
		wg.Go(func() { s.Run(runCtx) })
	}
	fmt.Fprintf(cfg.Progress, "bench timer: firing; measuring the %d timers due %s\n", window, measuredNote(run, cfg))
	if err := tr.wait(ctx, time.Now().Add(run.lead), timerStallLimit); err != nil {
		return nil, err
	}
	// Pending timers cost an index entry, not memory: the heap while the
	// schedulers run is the same for a thousand pending timers or a million.
	runtime.GC()
	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	stopAll()

	fired, inWindow, twice, lastAt := tr.counts()
	res := &Result{Unit: "timer"}
	elapsed := lastAt.Sub(base)
	if inWindow == 0 {
		elapsed = 0
	}
	rec.Fill(res, elapsed)
	res.OmittedOps = int64(window - inWindow)
	if run.mode == TimerSteady {
		res.OfferedPerS = float64(run.rate)
		res.Latency = fmt.Sprintf("lateness: Fired.At (read after the firing transaction committed) minus the due time, for the %d timers due in the first %s, while the others stay pending", window, cfg.Duration)
	} else {
		res.Latency = fmt.Sprintf("lateness: Fired.At (read after the firing transaction committed) minus the due time; all %d timers were due when the schedulers started, so this is each one's wait in the backlog", run.pending)
	}

	check, bad, err := checkFiredOnce(ctx, db, run, window, fired)
	if err != nil {
		return nil, err
	}
	res.Errors = int64(twice) + bad + logged.n.Load()
	res.Notes = append(res.Notes,
		fmt.Sprintf("timers: %d pending when the schedulers started, target %s, %s", run.pending, run.target, modeNote(run, cfg, window)),
		fmt.Sprintf("schedulers: %d in this process, BatchSize %d (--batch), PollInterval %s (default); --concurrency sets their number", cfg.Concurrency, cfg.Batch, timer.DefaultPollInterval),
		fmt.Sprintf("load: %d timers in %.1fs (%.0f/s), %s", run.pending, loadElapsed.Seconds(), float64(run.pending)/loadElapsed.Seconds(), loadNote(db.Dialect())),
		"clock: due times are laid out before the load, and the schedulers' clock (timer.Config.Clock) is the system clock moved back by a constant fixed after it, so the first timer falls due "+leadNote(run)+"; lateness is read on that clock, which runs at the system clock's speed",
		"exactly once: "+check,
		fmt.Sprintf("memory: Go heap in use %.1f MiB after firing, with %d timers still pending (the fire tracker's own table of %d entries included)", float64(mem.HeapInuse)/(1<<20), run.pending-fired, run.pending),
		"db: "+bdb.description,
		"broker: not used (topic timers fire into the outbox; no relay runs)",
	)
	if n := logged.n.Load(); n > 0 {
		res.Notes = append(res.Notes, fmt.Sprintf("the schedulers logged %d warnings or errors (counted as errors); the last: %s", n, logged.last()))
	}
	if res.Ops == 0 {
		return nil, errors.New("no timer fired")
	}
	return res, nil
}

func measuredNote(run timerRun, cfg Config) string {
	if run.mode == TimerSteady {
		return "in the first " + cfg.Duration.String()
	}
	return "at once (a drain)"
}

func modeNote(run timerRun, cfg Config, window int) string {
	if run.mode == TimerSteady {
		return fmt.Sprintf("steady: due at %d/s from the first, %d of them within the measured %s; the throughput is the measured ones over the time from the first due time to the last one's firing", run.rate, window, cfg.Duration)
	}
	return "drain: all due at once; the throughput is their number over the time from that due time to the last one's firing"
}

func leadNote(run timerRun) string {
	if run.lead > 0 {
		return fmt.Sprintf("%s after the schedulers start", run.lead)
	}
	return "as the schedulers start"
}

func loadNote(d sqldb.Dialect) string {
	if d == sqldb.Postgres {
		return "by COPY into troupe_timers, then VACUUM ANALYZE (as autovacuum would have done); in a schema of the benchmark's own, dropped afterwards"
	}
	return "by multi-row INSERTs, 50,000 timers per transaction"
}

// timerDB returns the database the timer benchmark runs on. On PostgreSQL
// that is a schema of its own, dropped afterwards, so that its schedulers
// can never fire timers that were already in the database (a --postgres
// URL may name a real one). On SQLite the database must hold no timers.
func timerDB(ctx context.Context, cfg Config, db *sqldb.DB) (*sqldb.DB, func(), error) {
	if db.Dialect() == sqldb.SQLite {
		var n int
		err := db.QueryRow(ctx, "SELECT count(*) FROM sqlite_master WHERE name = $1", timer.Table).Scan(&n)
		if err == nil && n > 0 {
			err = db.QueryRow(ctx, "SELECT count(*) FROM "+timer.Table).Scan(&n)
			if err == nil && n > 0 {
				err = fmt.Errorf("the database in %s holds %d timers (from an earlier run?): the timer benchmark needs one without, to fire only its own (use another --data-dir)", cfg.DataDir, n)
			}
		}
		return db, func() {
			if cfg.DataDir != "" {
				dropTimerRows(context.WithoutCancel(ctx), db)
			}
		}, err
	}
	schema := fmt.Sprintf("troupe_bench_timer_%d", time.Now().UnixNano())
	u, err := url.Parse(db.Pool().Config().ConnString())
	if err != nil {
		return nil, nil, fmt.Errorf("read the PostgreSQL URL: %w", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	if _, err := db.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		return nil, nil, fmt.Errorf("create schema %s: %w", schema, err)
	}
	drop := func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		db.Exec(dctx, "DROP SCHEMA "+schema+" CASCADE")
	}
	sdb, err := sqldb.Open(ctx, u.String(), nil)
	if err != nil {
		drop()
		return nil, nil, err
	}
	return sdb, func() { sdb.Close(); drop() }, nil
}

// dropTimerRows removes what a run left in a SQLite database that is kept.
func dropTimerRows(ctx context.Context, db *sqldb.DB) {
	db.Exec(ctx, "DELETE FROM "+timer.Table+" WHERE id LIKE '"+timerIDPrefix+"%'")
	db.Exec(ctx, "DELETE FROM troupe_outbox WHERE topic = $1", timerTopic)
	db.Exec(ctx, "DROP TABLE "+timerEffects)
}

// loadTimers stores run.pending timers, the i-th due at due(i).
func loadTimers(ctx context.Context, cfg Config, db *sqldb.DB, run timerRun, due func(int) time.Time) error {
	kind, target := timer.KindHandler, timerHandler
	if run.target == TimerTopic {
		kind, target = timer.KindTopic, timerTopic
	}
	now := time.Now().UTC()
	row := func(i int) ([]any, error) {
		id := timerID(i)
		env, err := message.EncodeJSON(&message.Message{
			ID: id, Source: "/bench/timer", Type: "troupe.bench.timer", Time: now,
			DataContentType: "application/json", Data: []byte(`{"n":` + strconv.Itoa(i) + `}`),
		})
		if err != nil {
			return nil, err
		}
		return []any{id, int16(kind), target, due(i), env, now}, nil
	}
	cols := []string{"id", "kind", "target", "due_at", "payload", "created_at"}
	for start := 0; start < run.pending; start += timerLoadChunk {
		end := min(start+timerLoadChunk, run.pending)
		var err error
		if db.Dialect() == sqldb.Postgres {
			err = copyTimers(ctx, db, cols, start, end, row)
		} else {
			err = insertTimers(ctx, db, cols, start, end, row)
		}
		if err != nil {
			return fmt.Errorf("load timers %d-%d: %w", start, end, err)
		}
		if end%500_000 == 0 || end == run.pending {
			fmt.Fprintf(cfg.Progress, "bench timer: loaded %d of %d timers\n", end, run.pending)
		}
	}
	if db.Dialect() == sqldb.Postgres {
		if _, err := db.Exec(ctx, "VACUUM ANALYZE "+timer.Table); err != nil {
			return fmt.Errorf("vacuum analyze: %w", err)
		}
	}
	return nil
}

func copyTimers(ctx context.Context, db *sqldb.DB, cols []string, start, end int, row func(int) ([]any, error)) error {
	i := start
	_, err := db.Pool().CopyFrom(ctx, pgx.Identifier{timer.Table}, cols, pgx.CopyFromFunc(func() ([]any, error) {
		if i == end {
			return nil, nil
		}
		i++
		return row(i - 1)
	}))
	return err
}

func insertTimers(ctx context.Context, db *sqldb.DB, cols []string, start, end int, row func(int) ([]any, error)) error {
	const perStatement = 500 // 3,000 parameters, well under SQLite's limit
	return db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		args := make([]any, 0, perStatement*len(cols))
		for s := start; s < end; s += perStatement {
			e := min(s+perStatement, end)
			args = args[:0]
			for i := s; i < e; i++ {
				r, err := row(i)
				if err != nil {
					return err
				}
				args = append(args, r...)
			}
			q := "INSERT INTO " + timer.Table + " (" + strings.Join(cols, ", ") + ") VALUES " + sqldb.ValuesList(1, e-s, len(cols))
			if _, err := tx.Exec(ctx, q, args...); err != nil {
				return err
			}
		}
		return nil
	})
}

// checkFiredOnce checks in the database that no timer fired twice, that
// every timer either fired or is still pending, and that every timer of the
// measured window fired. It returns the verdict and the number of problems.
func checkFiredOnce(ctx context.Context, db *sqldb.DB, run timerRun, window, firedSeen int) (string, int64, error) {
	table, col, where := timerEffects, "timer_id", "true"
	if run.target == TimerTopic {
		table, col, where = "troupe_outbox", "id", "topic = '"+timerTopic+"'"
	}
	var rows, distinct, inWindow, pending int
	if err := db.QueryRow(ctx, "SELECT count(*), count(DISTINCT "+col+") FROM "+table+" WHERE "+where).Scan(&rows, &distinct); err != nil {
		return "", 0, fmt.Errorf("count effects: %w", err)
	}
	if err := db.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE "+where+" AND "+col+" < $1", timerID(window)).Scan(&inWindow); err != nil {
		return "", 0, fmt.Errorf("count effects: %w", err)
	}
	if err := db.QueryRow(ctx, "SELECT count(*) FROM "+timer.Table).Scan(&pending); err != nil {
		return "", 0, fmt.Errorf("count pending timers: %w", err)
	}
	var problems []string
	if rows != distinct {
		problems = append(problems, fmt.Sprintf("%d effects for %d timers: %d fired twice", rows, distinct, rows-distinct))
	}
	if distinct+pending != run.pending {
		problems = append(problems, fmt.Sprintf("%d fired + %d pending != %d loaded", distinct, pending, run.pending))
	}
	if inWindow != window {
		problems = append(problems, fmt.Sprintf("%d of the %d timers due in the window fired", inWindow, window))
	}
	what := "outbox rows"
	if run.target == TimerHandler {
		what = "rows in the handler's effects table"
	}
	if len(problems) > 0 {
		return "FAILED: " + strings.Join(problems, "; ") + " (" + what + ")", int64(len(problems)), nil
	}
	return fmt.Sprintf("ok: %d of %d due fired, each once (%d %s, all distinct; %d fired in all, %d still pending; OnFired reported %d)",
		inWindow, window, rows, what, distinct, pending, firedSeen), 0, nil
}

// shiftedClock is the system clock moved back by a constant, set once the
// timers are loaded so that their due times, laid out before, fall where
// the run needs them.
type shiftedClock struct{ shift atomic.Int64 }

// set moves the clock so that it reads t now.
func (c *shiftedClock) set(t time.Time) { c.shift.Store(int64(time.Since(t))) }

func (c *shiftedClock) Now() time.Time {
	return time.Now().Add(-time.Duration(c.shift.Load()))
}

func (c *shiftedClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// fireTracker records what the schedulers' OnFired reports: each timer's
// lateness, once, and any second firing.
type fireTracker struct {
	rec    *Recorder
	window int // timers 0..window-1 are measured

	mu       sync.Mutex
	seen     []bool
	distinct int // timers fired, each counted once
	inWindow int
	twice    int
	lastAt   time.Time // when the last measured timer fired
	changed  chan struct{}
}

func newFireTracker(pending, window int, rec *Recorder) *fireTracker {
	return &fireTracker{rec: rec, window: window, seen: make([]bool, pending), changed: make(chan struct{}, 1)}
}

func (t *fireTracker) onFired(fs []timer.Fired) {
	t.mu.Lock()
	for _, f := range fs {
		i, err := strconv.Atoi(strings.TrimPrefix(f.ID, timerIDPrefix))
		if err != nil || i < 0 || i >= len(t.seen) {
			continue // not one of the benchmark's
		}
		if t.seen[i] {
			t.twice++
			continue
		}
		t.seen[i] = true
		t.distinct++
		if i < t.window {
			t.inWindow++
			t.rec.Observe(max(0, f.At.Sub(f.Due)))
			if f.At.After(t.lastAt) {
				t.lastAt = f.At
			}
		}
	}
	t.mu.Unlock()
	select {
	case t.changed <- struct{}{}:
	default:
	}
}

func (t *fireTracker) counts() (fired, inWindow, twice int, lastAt time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.distinct, t.inWindow, t.twice, t.lastAt
}

// wait returns when every measured timer has fired, or when none has fired
// for stall since the later of the last firing and from.
func (t *fireTracker) wait(ctx context.Context, from time.Time, stall time.Duration) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last, lastProgress := -1, from
	for {
		_, n, _, _ := t.counts()
		if n == t.window {
			return nil
		}
		now := time.Now()
		if n > last {
			last, lastProgress = n, now
			if lastProgress.Before(from) {
				lastProgress = from
			}
		} else if now.Sub(lastProgress) > stall {
			return nil // reported as omitted
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.changed:
		case <-tick.C:
		}
	}
}

// countingHandler is a slog handler that counts the schedulers' warnings
// and errors and keeps the last one.
type countingHandler struct {
	n   atomic.Int64
	mu  sync.Mutex
	msg string
}

func (h *countingHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }

func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	h.n.Add(1)
	h.mu.Lock()
	h.msg = b.String()
	h.mu.Unlock()
	return nil
}

func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

func (h *countingHandler) last() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.msg
}
