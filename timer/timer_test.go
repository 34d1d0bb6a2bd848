package timer_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

func TestScheduleTx_FiresIntoTheOutboxOnceWhenDue(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			ctx := context.Background()
			for i := range 10 {
				if err := s.Schedule(ctx, t0.Add(time.Duration(i+1)*time.Minute), timer.ToTopic("reminders"), newMsg(fmt.Sprint("m", i))); err != nil {
					t.Fatal(err)
				}
			}
			run(t, s)
			clock.Advance(5*time.Minute + time.Second)
			waitFor(t, "5 outbox rows", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_outbox`) == 5 })
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 5 {
				t.Fatalf("%d timers pending, want 5", n)
			}
			clock.Advance(time.Hour)
			waitFor(t, "10 outbox rows", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_outbox`) == 10 })
			if n := countRows(t, db, `SELECT count(DISTINCT id) FROM troupe_outbox WHERE topic = 'reminders'`); n != 10 {
				t.Fatalf("%d distinct messages on the topic, want 10", n)
			}
		})
	}
}

func TestHandle_RunsInTheFiringTransaction(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("expire", recordEffect("a")); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return s.ScheduleTx(ctx, tx, t0.Add(time.Second), timer.ToHandler("expire"), newMsg("x"))
			}); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "the effect", func() bool { return countRows(t, db, `SELECT count(*) FROM effects`) == 1 })
			waitFor(t, "the timer gone", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
		})
	}
}

// --- Cancel and reschedule ---

func TestCancel_CancelledTimerNeverFires(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("remind", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			due := t0.Add(time.Minute)
			for _, id := range []string{"cancelled", "kept"} {
				if err := s.Schedule(ctx, due, timer.ToHandler("remind"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			if ok, err := s.Cancel(ctx, "cancelled"); err != nil || !ok {
				t.Fatalf("Cancel of a pending timer = %v, %v; want true", ok, err)
			}
			if ok, err := s.Cancel(ctx, "cancelled"); err != nil || ok {
				t.Fatalf("Cancel of a cancelled timer = %v, %v; want false", ok, err)
			}
			run(t, s)
			clock.Advance(time.Minute)
			// Both were due at the same time: the round that fired "kept"
			// would have fired "cancelled" too.
			waitFor(t, "the kept timer's effect", func() bool { return effectCount(t, db, "kept") == 1 })
			if n := effectCount(t, db, "cancelled"); n != 0 {
				t.Fatalf("the cancelled timer fired %d times", n)
			}
			if ok, err := s.Cancel(ctx, "kept"); err != nil || ok {
				t.Fatalf("Cancel of a fired timer = %v, %v; want false", ok, err)
			}
			if ok, err := s.Cancel(ctx, "never-scheduled"); err != nil || ok {
				t.Fatalf("Cancel of an unknown id = %v, %v; want false", ok, err)
			}
		})
	}
}

func TestCancelTx_RolledBackCancelLeavesTheTimerPending(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("remind", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := s.Schedule(ctx, t0.Add(time.Minute), timer.ToHandler("remind"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			errAbort := errors.New("the business change failed")
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				ok, err := s.CancelTx(ctx, tx, "x")
				if err != nil || !ok {
					t.Errorf("CancelTx = %v, %v; want true", ok, err)
				}
				return errAbort
			})
			if !errors.Is(err, errAbort) {
				t.Fatalf("InTx = %v", err)
			}
			if !isStored(t, db, "x") {
				t.Fatal("the timer is gone after its cancellation rolled back")
			}
			run(t, s)
			clock.Advance(time.Minute)
			waitFor(t, "the timer to fire", func() bool { return effectCount(t, db, "x") == 1 })
		})
	}
}

func TestRescheduleTx_FiresAtTheNewTimeNotTheOld(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			var gotDue atomic.Value
			if err := s.Handle("remind", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				gotDue.Store(f.Due)
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			oldDue, newDue := t0.Add(time.Minute), t0.Add(5*time.Minute)
			if err := s.Schedule(ctx, oldDue, timer.ToHandler("remind"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			// probe is due at the old time: once it has fired, a round ran
			// when x would have been due.
			if err := s.Schedule(ctx, oldDue, timer.ToTopic("probe"), newMsg("probe")); err != nil {
				t.Fatal(err)
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if ok, err := s.RescheduleTx(ctx, tx, "x", newDue); err != nil || !ok {
					return fmt.Errorf("RescheduleTx = %v, %v; want true", ok, err)
				}
				if ok, err := s.RescheduleTx(ctx, tx, "unknown", newDue); err != nil || ok {
					return fmt.Errorf("RescheduleTx of an unknown id = %v, %v; want false", ok, err)
				}
				if _, err := s.RescheduleTx(ctx, tx, "x", t0.Add(-time.Hour)); !errors.Is(err, timer.ErrInPast) {
					return fmt.Errorf("RescheduleTx into the past = %v; want ErrInPast", err)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Set(oldDue)
			waitFor(t, "the probe", func() bool { return outboxCount(t, db, "probe") == 1 })
			if n := effectCount(t, db, "x"); n != 0 {
				t.Fatal("the rescheduled timer fired at its old time")
			}
			clock.Set(newDue)
			waitFor(t, "the timer at its new time", func() bool { return effectCount(t, db, "x") == 1 })
			if due, _ := gotDue.Load().(time.Time); !due.Equal(newDue) {
				t.Fatalf("Fired.Due = %v, want %v", due, newDue)
			}
		})
	}
}

// --- ScheduleTx's errors ---

func TestScheduleTx_RefusesADueTimeBeyondPastTolerance(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, PastTolerance: time.Second})
			tests := []struct {
				name    string
				at      time.Time
				wantErr error
			}{
				{"zero time", time.Time{}, timer.ErrInPast},
				{"beyond tolerance", t0.Add(-2 * time.Second), timer.ErrInPast},
				{"within tolerance", t0.Add(-500 * time.Millisecond), nil},
				{"now", t0, nil},
				{"future", t0.Add(time.Hour), nil},
			}
			for i, tt := range tests {
				id := fmt.Sprint("t", i)
				err := s.Schedule(context.Background(), tt.at, timer.ToTopic("topic"), newMsg(id))
				if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
					t.Errorf("%s: Schedule = %v, want %v", tt.name, err, tt.wantErr)
				}
				if got := isStored(t, db, id); got != (tt.wantErr == nil) {
					t.Errorf("%s: stored = %v, want %v", tt.name, got, tt.wantErr == nil)
				}
			}
		})
	}
}

func TestScheduleTx_DuplicatePendingIDIsErrExistsAndTheTxGoesOn(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			ctx := context.Background()
			first := newMsg("dup")
			second := newMsg("dup")
			second.Data = []byte(`{"second":true}`)
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := s.ScheduleTx(ctx, tx, t0.Add(time.Hour), timer.ToTopic("a"), first); err != nil {
					return err
				}
				if err := s.ScheduleTx(ctx, tx, t0.Add(2*time.Hour), timer.ToTopic("b"), second); !errors.Is(err, timer.ErrExists) {
					return fmt.Errorf("second ScheduleTx of the same id = %v; want ErrExists", err)
				}
				// The transaction is still usable (on PostgreSQL, a failed
				// statement would have aborted it).
				if _, err := tx.Exec(ctx, `INSERT INTO effects (timer_id) VALUES ('business')`); err != nil {
					return err
				}
				return s.ScheduleTx(ctx, tx, t0.Add(time.Hour), timer.ToTopic("a"), newMsg("other"))
			}); err != nil {
				t.Fatal(err)
			}
			if !isStored(t, db, "other") || effectCount(t, db, "business") != 1 {
				t.Fatal("the transaction's work after ErrExists did not commit")
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE id = 'dup' AND target = 'a'`); n != 1 {
				t.Fatal("ErrExists replaced the pending timer")
			}
			// A committed timer is a duplicate for later transactions too.
			if err := s.Schedule(ctx, t0.Add(time.Hour), timer.ToTopic("a"), newMsg("dup")); !errors.Is(err, timer.ErrExists) {
				t.Fatalf("Schedule of a committed id = %v; want ErrExists", err)
			}
		})
	}
}

func TestScheduleTx_RefusesInvalidTimersAndStoresNothing(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			noType := newMsg("no-type")
			noType.Type = ""
			tests := []struct {
				name   string
				target timer.Target
				msg    *message.Message
			}{
				{"nil message", timer.ToTopic("t"), nil},
				{"empty topic", timer.ToTopic(""), newMsg("m1")},
				{"empty handler", timer.ToHandler(""), newMsg("m2")},
				{"zero target", timer.Target{}, newMsg("m3")},
				{"invalid message", timer.ToTopic("t"), noType},
			}
			for _, tt := range tests {
				err := s.Schedule(context.Background(), t0.Add(time.Hour), tt.target, tt.msg)
				if !errors.Is(err, timer.ErrInvalidTimer) {
					t.Errorf("%s: Schedule = %v; want ErrInvalidTimer", tt.name, err)
				}
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d invalid timers stored", n)
			}
		})
	}
}

func TestScheduleTx_RolledBackTransactionStoresNothing(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			ctx := context.Background()
			errAbort := errors.New("the business change failed")
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := s.ScheduleTx(ctx, tx, t0.Add(time.Second), timer.ToTopic("t"), newMsg("x")); err != nil {
					return err
				}
				return errAbort
			})
			if !errors.Is(err, errAbort) {
				t.Fatalf("InTx = %v", err)
			}
			if isStored(t, db, "x") {
				t.Fatal("a timer scheduled in a rolled-back transaction is stored")
			}
			if st, err := s.Stats(ctx); err != nil || st.Pending != 0 {
				t.Fatalf("Stats = %+v, %v; want nothing pending", st, err)
			}
		})
	}
}

func TestNew_ReportsEveryConfigProblemAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			_, err := timer.New(db, timer.Config{
				BatchSize:       -1,
				PollInterval:    -time.Second,
				LeaseTTL:        -time.Second,
				PastTolerance:   -time.Second,
				MaxAttempts:     -1,
				HTTPConcurrency: -1,
				HTTPTimeout:     -time.Second,
			})
			if !errors.Is(err, timer.ErrInvalidConfig) {
				t.Fatalf("New = %v; want ErrInvalidConfig", err)
			}
			for _, field := range []string{"BatchSize", "PollInterval", "LeaseTTL", "PastTolerance", "MaxAttempts", "HTTPConcurrency", "HTTPTimeout"} {
				if !strings.Contains(err.Error(), field) {
					t.Errorf("the error does not name %s:\n%v", field, err)
				}
			}
			for _, cfg := range []timer.Config{
				{LeaseTTL: 5 * time.Second, HTTPTimeout: 5 * time.Second},
				{LeaseTTL: 5 * time.Second}, // the default HTTPTimeout is 10 s
				{HTTPTimeout: time.Minute},  // the default LeaseTTL is 30 s
			} {
				_, err := timer.New(db, cfg)
				if !errors.Is(err, timer.ErrInvalidConfig) || !strings.Contains(err.Error(), "LeaseTTL") {
					t.Errorf("New(LeaseTTL %v, HTTPTimeout %v) = %v; want ErrInvalidConfig naming LeaseTTL", cfg.LeaseTTL, cfg.HTTPTimeout, err)
				}
			}
			if _, err := timer.New(db, timer.Config{LeaseTTL: time.Minute, HTTPTimeout: 59 * time.Second}); err != nil {
				t.Errorf("New with LeaseTTL > HTTPTimeout = %v", err)
			}
			if _, err := timer.New(nil, timer.Config{}); !errors.Is(err, timer.ErrInvalidConfig) {
				t.Errorf("New(nil) = %v; want ErrInvalidConfig", err)
			}
		})
	}
}

// --- Firing order ---

func TestRun_FiresOverdueTimersInDueOrderAfterDowntime(t *testing.T) {
	const n, batch = 50, 7
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			var (
				mu      sync.Mutex
				order   []time.Time
				batches []int
			)
			s := newScheduler(t, db, timer.Config{Clock: clock, BatchSize: batch, OnFired: func(fs []timer.Fired) {
				mu.Lock()
				defer mu.Unlock()
				batches = append(batches, len(fs))
			}})
			if err := s.Handle("record", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				mu.Lock()
				defer mu.Unlock()
				order = append(order, f.Due)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			// Due times 1.5 s apart (so fractions of seconds sort too),
			// scheduled in a shuffled order.
			var want []time.Time
			for i := range n {
				want = append(want, t0.Add(time.Duration(i+1)*1500*time.Millisecond))
			}
			rng := rand.New(rand.NewPCG(1, 2))
			ctx := context.Background()
			for _, i := range rng.Perm(n) {
				if err := s.Schedule(ctx, want[i], timer.ToHandler("record"), newMsg(fmt.Sprint("t", i))); err != nil {
					t.Fatal(err)
				}
			}
			clock.Advance(time.Hour) // downtime: every timer is overdue when Run starts
			run(t, s)
			waitFor(t, "every timer to fire", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(order) == n
			})
			mu.Lock()
			defer mu.Unlock()
			if !slices.EqualFunc(order, want, time.Time.Equal) {
				t.Fatalf("fired in this order of due times:\n%v\nwant\n%v", order, want)
			}
			for _, b := range batches {
				if b > batch {
					t.Fatalf("a transaction fired %d timers; BatchSize is %d", b, batch)
				}
			}
		})
	}
}

// --- Handler failures ---

func TestHandle_ErrorRetriesAfterTheBackoff(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			backoff := func(attempt int) time.Duration { return time.Duration(attempt) * time.Minute }
			s := newScheduler(t, db, timer.Config{Clock: clock, Backoff: backoff})
			var attempts []int
			var mu sync.Mutex
			if err := s.Handle("flaky", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				mu.Lock()
				attempts = append(attempts, f.Attempt)
				n := len(attempts)
				mu.Unlock()
				if n == 1 {
					return errors.New("not yet")
				}
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			failedAt := t0.Add(time.Second)
			if err := s.Schedule(ctx, failedAt, timer.ToHandler("flaky"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Set(failedAt)
			waitFor(t, "the first attempt to fail", func() bool { return attemptsOf(t, db, "x") == 1 })
			retryAt := failedAt.Add(backoff(1))
			if due := dueOf(t, db, "x"); !due.Equal(retryAt) {
				t.Fatalf("retry due at %v, want %v (the failure plus Backoff(1))", due, retryAt)
			}
			if err := s.Schedule(ctx, retryAt.Add(-time.Millisecond), timer.ToTopic("probe"), newMsg("probe")); err != nil {
				t.Fatal(err)
			}
			clock.Set(retryAt.Add(-time.Millisecond))
			waitFor(t, "the probe", func() bool { return outboxCount(t, db, "probe") == 1 })
			mu.Lock()
			if len(attempts) != 1 {
				t.Fatalf("the handler ran %d times before the backoff ended", len(attempts))
			}
			mu.Unlock()
			clock.Set(retryAt)
			waitFor(t, "the retry's effect", func() bool { return effectCount(t, db, "x") == 1 })
			mu.Lock()
			defer mu.Unlock()
			if !slices.Equal(attempts, []int{1, 2}) {
				t.Fatalf("Fired.Attempt of each call = %v, want [1 2]", attempts)
			}
		})
	}
}

func TestHandle_FailedAttemptRollsBackOnlyItsOwnWrites(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			firedTogether := make(chan []string, 10)
			s := newScheduler(t, db, timer.Config{Clock: clock, OnFired: func(fs []timer.Fired) {
				var ids []string
				for _, f := range fs {
					ids = append(ids, f.ID)
				}
				firedTogether <- ids
			}})
			var failingCalls atomic.Int32
			if err := s.Handle("work", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if err := recordEffect("")(ctx, tx, f); err != nil {
					return err
				}
				if f.ID == "b-fails" {
					failingCalls.Add(1)
					// On PostgreSQL a failed statement aborts the
					// transaction; the savepoint must undo that as well.
					_, _ = tx.Exec(ctx, `INSERT INTO no_such_table VALUES (1)`)
					return errors.New("after writing")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			for _, id := range []string{"a-ok", "b-fails", "c-ok"} {
				if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("work"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToTopic("t"), newMsg("d-topic")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			ids := recvWithin(t, firedTogether, "the batch")
			if !slices.Equal(ids, []string{"a-ok", "c-ok", "d-topic"}) {
				t.Fatalf("the batch fired %v, want [a-ok c-ok d-topic]", ids)
			}
			if effectCount(t, db, "a-ok") != 1 || effectCount(t, db, "c-ok") != 1 || outboxCount(t, db, "d-topic") != 1 {
				t.Fatal("the other timers' effects are missing")
			}
			if n := effectCount(t, db, "b-fails"); n != 0 {
				t.Fatal("the failed attempt's write committed")
			}
			if attemptsOf(t, db, "b-fails") != 1 {
				t.Fatal("the failed timer's attempt is not counted")
			}
			// The batch ran again with savepoints after the failure, but the
			// failing handler is called once per attempt.
			if n := failingCalls.Load(); n != 1 {
				t.Fatalf("the failing handler ran %d times for one attempt, want 1", n)
			}
		})
	}
}

func TestHandle_PermanentErrorFailsAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 5})
			var calls atomic.Int32
			if err := s.Handle("charge", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				calls.Add(1)
				return fmt.Errorf("charge %s: %w", f.ID, timer.Permanent(errors.New("card expired")))
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("charge"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			f := waitFailed(t, s, "x")
			if f.Attempts != 1 || !strings.Contains(f.LastError, "card expired") || f.Kind != timer.KindHandler || f.Target != "charge" {
				t.Fatalf("Failed = %+v; want 1 attempt, the handler's error, handler charge", f)
			}
			if !f.FailedAt.Equal(t0.Add(time.Second)) {
				t.Fatalf("FailedAt = %v, want %v", f.FailedAt, t0.Add(time.Second))
			}
			// A failed timer is kept for an operator, and not retried.
			if err := s.Schedule(ctx, t0.Add(time.Hour), timer.ToTopic("probe"), newMsg("probe")); err != nil {
				t.Fatal(err)
			}
			clock.Advance(time.Hour)
			waitFor(t, "the probe", func() bool { return outboxCount(t, db, "probe") == 1 })
			if n := calls.Load(); n != 1 {
				t.Fatalf("the handler ran %d times, want 1", n)
			}
		})
	}
}

func TestHandle_TimerFailsWhenMaxAttemptsAreSpent(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 3, Backoff: func(int) time.Duration { return time.Minute }})
			var calls atomic.Int32
			if err := s.Handle("sync", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				calls.Add(1)
				return fmt.Errorf("upstream down (attempt %d)", f.Attempt)
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("sync"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			for attempt := 1; attempt < 3; attempt++ {
				waitFor(t, fmt.Sprintf("attempt %d", attempt), func() bool { return attemptsOf(t, db, "x") == attempt })
				if fs, err := s.Failed(ctx, 10); err != nil || len(fs) != 0 {
					t.Fatalf("after attempt %d: Failed = %v, %v; want none", attempt, fs, err)
				}
				clock.Advance(time.Minute)
			}
			f := waitFailed(t, s, "x")
			if f.Attempts != 3 || f.LastError != "upstream down (attempt 3)" {
				t.Fatalf("Failed = %+v; want 3 attempts and the last error", f)
			}
			if n := calls.Load(); n != 3 {
				t.Fatalf("the handler ran %d times, want 3", n)
			}
		})
	}
}

func TestHandle_PanicCountsAsAnError(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 2, Backoff: func(int) time.Duration { return time.Minute }})
			if err := s.Handle("boom", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if err := recordEffect("")(ctx, tx, f); err != nil {
					return err
				}
				panic("nil map")
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("boom"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "the first attempt", func() bool { return attemptsOf(t, db, "x") == 1 })
			clock.Advance(time.Minute)
			f := waitFailed(t, s, "x")
			if f.Attempts != 2 || !strings.Contains(f.LastError, "nil map") {
				t.Fatalf("Failed = %+v; want 2 attempts and the panic's value", f)
			}
			if n := effectCount(t, db, "x"); n != 0 {
				t.Fatal("the panicking handler's write committed")
			}
			// The scheduler survived its handler's panics.
			if err := s.Schedule(ctx, clock.Now(), timer.ToTopic("after"), newMsg("after")); err != nil {
				t.Fatal(err)
			}
			s.Notify()
			waitFor(t, "a timer after the panics", func() bool { return outboxCount(t, db, "after") == 1 })
		})
	}
}

func TestRetryTx_RearmsAFailedTimerAndStatsCountIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			var mended atomic.Bool
			var lastAttempt atomic.Int32
			if err := s.Handle("ship", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				lastAttempt.Store(int32(f.Attempt))
				if !mended.Load() {
					return timer.Permanent(errors.New("no address"))
				}
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			for _, tm := range []struct {
				id     string
				at     time.Time
				target timer.Target
			}{
				{"x", t0.Add(time.Second), timer.ToHandler("ship")},
				{"later", t0.Add(time.Hour), timer.ToTopic("t")},
				{"stuck", t0.Add(time.Second), timer.ToHandler("nobody")}, // no scheduler has this handler
			} {
				if err := s.Schedule(ctx, tm.at, tm.target, newMsg(tm.id)); err != nil {
					t.Fatal(err)
				}
			}
			checkStats(t, "before anything is due", s, timer.Stats{Pending: 3})
			run(t, s)
			clock.Advance(time.Second)
			waitFailed(t, s, "x")
			// x failed; stuck is due, held up; later is pending.
			checkStats(t, "with x failed", s, timer.Stats{Pending: 2, Due: 1, Failed: 1, OldestDue: t0.Add(time.Second)})

			mended.Store(true)
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if ok, err := s.RetryTx(ctx, tx, "x"); err != nil || !ok {
					return fmt.Errorf("RetryTx = %v, %v; want true", ok, err)
				}
				if ok, err := s.RetryTx(ctx, tx, "later"); err != nil || ok {
					return fmt.Errorf("RetryTx of a pending timer = %v, %v; want false", ok, err)
				}
				if ok, err := s.RetryTx(ctx, tx, "unknown"); err != nil || ok {
					return fmt.Errorf("RetryTx of an unknown id = %v, %v; want false", ok, err)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			s.Notify()
			waitFor(t, "the retried timer's effect", func() bool { return effectCount(t, db, "x") == 1 })
			if n := lastAttempt.Load(); n != 1 {
				t.Fatalf("the retry ran as attempt %d; RetryTx counts from zero again", n)
			}
			if fs, err := s.Failed(ctx, 10); err != nil || len(fs) != 0 {
				t.Fatalf("Failed after the retry = %v, %v; want none", fs, err)
			}
			checkStats(t, "after the retry", s, timer.Stats{Pending: 2, Due: 1, OldestDue: t0.Add(time.Second)})
		})
	}
}

func TestHandle_TimersWaitForTheirHandlerToBeRegistered(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			ctx := context.Background()
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("added-later"), newMsg("h")); err != nil {
				t.Fatal(err)
			}
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToTopic("t"), newMsg("topic")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			// The round that fired the topic timer passed over the handler
			// timer, leaving it as it was.
			waitFor(t, "the topic timer", func() bool { return outboxCount(t, db, "topic") == 1 })
			if !isStored(t, db, "h") || attemptsOf(t, db, "h") != 0 {
				t.Fatal("the timer of an unregistered handler was touched")
			}
			if fs, err := s.Failed(ctx, 10); err != nil || len(fs) != 0 {
				t.Fatalf("Failed = %v, %v; want none", fs, err)
			}
			if st := readStats(t, s); st.Due != 1 {
				t.Fatalf("Stats.Due = %d; want 1 (the handler timer, held up)", st.Due)
			}
			if err := s.Handle("added-later", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the handler timer once registered", func() bool { return effectCount(t, db, "h") == 1 })
		})
	}
}

// --- Several schedulers ---

func TestScheduler_SeveralInstancesFireEachTimerOnce(t *testing.T) {
	const n = 1000
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			for _, instances := range []int{2, 3} {
				t.Run(fmt.Sprint(instances, " schedulers"), func(t *testing.T) {
					db, url := openDB(t, kind)
					clock := newClock()
					var stops []func()
					for i := range instances {
						// Each instance has its own connections, as if in its
						// own process.
						s := newScheduler(t, openAgain(t, url), timer.Config{Clock: clock, BatchSize: 20, Owner: fmt.Sprint("s", i)})
						if err := s.Handle("work", recordEffect(fmt.Sprint("s", i))); err != nil {
							t.Fatal(err)
						}
						if i == 0 {
							scheduleBatch(t, db, s, n, timer.ToHandler("work"), "w")
						}
						stops = append(stops, runStoppable(t, s))
					}
					// Wake every instance at the same moment: each has both
					// of Run's loops waiting on the clock.
					waitFor(t, "every instance to wait", func() bool { return clock.Waiters() >= 2*instances })
					clock.Advance(time.Hour)
					waitFor(t, "every timer to fire", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
					for _, stop := range stops {
						stop()
					}
					checkEachOnce(t, db, n)
					if kind == "postgres" {
						if got := countRows(t, db, `SELECT count(DISTINCT owner) FROM effects`); got != instances {
							t.Errorf("%d of %d instances fired timers; SKIP LOCKED should share the work", got, instances)
						}
					}
				})
			}
		})
	}
}

func TestCancel_TrueExactlyWhenTheTimerNeverFires(t *testing.T) {
	const n = 400
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, url := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, BatchSize: 20})
			if err := s.Handle("work", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			ids := scheduleBatch(t, db, s, n, timer.ToHandler("work"), "c")
			// The cancelling service is another process.
			canceller := newScheduler(t, openAgain(t, url), timer.Config{Clock: clock})
			stop := runStoppable(t, s)
			waitFor(t, "the scheduler to wait", func() bool { return clock.Waiters() >= 2 })

			toCancel := make([]string, 0, n/2)
			for i, id := range ids {
				if i%2 == 1 {
					toCancel = append(toCancel, id)
				}
			}
			rand.New(rand.NewPCG(3, 4)).Shuffle(len(toCancel), func(i, j int) { toCancel[i], toCancel[j] = toCancel[j], toCancel[i] })
			cancelled := map[string]bool{}
			clock.Advance(time.Hour)
			for _, id := range toCancel {
				ok, err := canceller.Cancel(context.Background(), id)
				if err != nil {
					t.Fatal(err)
				}
				cancelled[id] = ok
			}
			waitFor(t, "every timer fired or cancelled", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			stop()
			fired := effectsByID(t, db)
			var nCancelled int
			for _, id := range ids {
				if cancelled[id] {
					nCancelled++
				}
				if cancelled[id] == (fired[id] == 1) || fired[id] > 1 {
					t.Errorf("%s: Cancel returned %v, and it fired %d times", id, cancelled[id], fired[id])
				}
			}
			t.Logf("%d of %d cancels came before the firing", nCancelled, len(toCancel))
		})
	}
}

// --- Hooks, wakes, and messages ---

func TestOnFired_CalledAfterCommitWithDueAtAndAttempt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			type report struct {
				f timer.Fired
				// What another connection saw when OnFired was called.
				pending bool
				effects int
			}
			reports := make(chan report, 10)
			s := newScheduler(t, db, timer.Config{
				Clock:   clock,
				Backoff: func(int) time.Duration { return time.Minute },
				OnFired: func(fs []timer.Fired) {
					for _, f := range fs {
						var r report
						r.f = f
						var pending, effects, outboxed int
						_ = db.QueryRow(context.Background(), `SELECT count(*) FROM troupe_timers WHERE id = $1`, f.ID).Scan(&pending)
						_ = db.QueryRow(context.Background(), `SELECT count(*) FROM effects WHERE timer_id = $1`, f.ID).Scan(&effects)
						_ = db.QueryRow(context.Background(), `SELECT count(*) FROM troupe_outbox WHERE id = $1`, f.ID).Scan(&outboxed)
						r.pending, r.effects = pending > 0, effects+outboxed
						reports <- r
					}
				},
			})
			var calls atomic.Int32
			if err := s.Handle("h", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if calls.Add(1) == 1 {
					return errors.New("first attempt fails")
				}
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			due := t0.Add(time.Second)
			if err := s.Schedule(ctx, due, timer.ToTopic("t"), newMsg("topic")); err != nil {
				t.Fatal(err)
			}
			if err := s.Schedule(ctx, due, timer.ToHandler("h"), newMsg("handler")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Set(due.Add(500 * time.Millisecond))

			r := recvWithin(t, reports, "the topic timer's report")
			if r.pending || r.effects != 1 {
				t.Fatalf("OnFired ran before the commit: pending %v, %d outbox rows", r.pending, r.effects)
			}
			want := timer.Fired{ID: "topic", Kind: timer.KindTopic, Target: "t", Due: due, At: due.Add(500 * time.Millisecond), Attempt: 1}
			checkFired(t, r.f, want)

			clock.Advance(time.Minute)
			r = recvWithin(t, reports, "the handler timer's report")
			retryDue := due.Add(500*time.Millisecond + time.Minute)
			if r.pending || r.effects != 1 {
				t.Fatalf("OnFired ran before the commit: pending %v, %d effects", r.pending, r.effects)
			}
			want = timer.Fired{ID: "handler", Kind: timer.KindHandler, Target: "h", Due: retryDue, At: retryDue, Attempt: 2}
			checkFired(t, r.f, want)
		})
	}
}

func TestNotify_WakesASchedulerWaitingOnALongPoll(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, url := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, PollInterval: time.Hour})
			run(t, s)
			waitFor(t, "the scheduler to wait", func() bool { return clock.Waiters() >= 2 })
			// Another process schedules a timer due now; the scheduler,
			// waiting for an hour that never passes, knows nothing of it.
			other := newScheduler(t, openAgain(t, url), timer.Config{Clock: clock})
			if err := other.Schedule(context.Background(), t0, timer.ToTopic("t"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			s.Notify()
			waitFor(t, "the timer to fire", func() bool { return outboxCount(t, db, "x") == 1 })
			if !clock.Now().Equal(t0) {
				t.Fatal("the clock moved")
			}
		})
	}
}

func TestRun_RefusesASecondRunOfTheSameScheduler(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			run(t, s)
			waitFor(t, "the scheduler to wait", func() bool { return clock.Waiters() >= 2 })
			if err := s.Run(context.Background()); !errors.Is(err, timer.ErrRunning) {
				t.Fatalf("a second Run = %v; want ErrRunning", err)
			}
		})
	}
}

func TestScheduleTx_FiredMessageKeepsItsIDAndInheritsTheCause(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			// A handler timer's writes to the outbox continue the flow of
			// the timer's message.
			if err := s.Handle("follow-up", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				return outbox.Add(ctx, tx, "follow-ups", newMsg("follow-up-of-"+f.ID))
			}); err != nil {
				t.Fatal(err)
			}
			cause := newMsg("order-placed")
			cause.CorrelationID = "checkout-7"
			cause.TraceParent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
			ctx := message.WithCause(context.Background(), cause)

			own := newMsg("own-cause")
			own.CorrelationID, own.CausationID = "other-flow", "other-cause"
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := s.ScheduleTx(ctx, tx, t0.Add(time.Second), timer.ToTopic("reminders"), newMsg("reminder")); err != nil {
					return err
				}
				if err := s.ScheduleTx(ctx, tx, t0.Add(time.Second), timer.ToTopic("reminders"), own); err != nil {
					return err
				}
				return s.ScheduleTx(ctx, tx, t0.Add(time.Second), timer.ToHandler("follow-up"), newMsg("step"))
			}); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "three outbox rows", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_outbox`) == 3 })

			m := outboxMessage(t, db, "reminder")
			want := newMsg("reminder")
			want.CorrelationID, want.CausationID, want.TraceParent = "checkout-7", "order-placed", cause.TraceParent
			want.Time = m.Time
			if !m.Equal(want) {
				t.Fatalf("fired message = %+v\nwant %+v", m, want)
			}
			if m := outboxMessage(t, db, "own-cause"); m.CorrelationID != "other-flow" || m.CausationID != "other-cause" {
				t.Fatalf("a message with its own cause got correlation %q, causation %q", m.CorrelationID, m.CausationID)
			}
			if m := outboxMessage(t, db, "follow-up-of-step"); m.CorrelationID != "checkout-7" || m.CausationID != "step" {
				t.Fatalf("the handler's message has correlation %q, causation %q; want checkout-7, step", m.CorrelationID, m.CausationID)
			}
		})
	}
}

// --- helpers of this file ---

// openAgain opens another handle on the database at url, with connections
// of its own, as another process would.
func openAgain(t testing.TB, url string) *sqldb.DB {
	t.Helper()
	db, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// scheduleMany schedules n timers to target in one transaction, due 1 ms
// apart from t0 + 1 s, with ids prefix0000, prefix0001, ..., and returns the
// ids.
func scheduleBatch(t testing.TB, db *sqldb.DB, s *timer.Scheduler, n int, target timer.Target, prefix string) []string {
	t.Helper()
	ids := make([]string, n)
	err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		for i := range n {
			ids[i] = fmt.Sprintf("%s%04d", prefix, i)
			if err := s.ScheduleTx(ctx, tx, t0.Add(time.Second+time.Duration(i)*time.Millisecond), target, newMsg(ids[i])); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// isStored reports whether a timer with this id is stored (pending or
// failed).
func isStored(t testing.TB, db *sqldb.DB, id string) bool {
	return countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE id = $1`, id) == 1
}

// attemptsOf returns the stored attempt count of a timer (-1 if none).
func attemptsOf(t testing.TB, db *sqldb.DB, id string) int {
	t.Helper()
	n := -1
	err := db.QueryRow(context.Background(), `SELECT attempts FROM troupe_timers WHERE id = $1`, id).Scan(&n)
	if err != nil && !errors.Is(err, sqldb.ErrNoRows) {
		t.Fatal(err)
	}
	return n
}

// dueOf returns the stored due time of a timer.
func dueOf(t testing.TB, db *sqldb.DB, id string) time.Time {
	t.Helper()
	var due time.Time
	if err := db.QueryRow(context.Background(), `SELECT due_at FROM troupe_timers WHERE id = $1`, id).Scan(&due); err != nil {
		t.Fatal(err)
	}
	return due
}

// effectCount counts the effect rows of a timer.
func effectCount(t testing.TB, db *sqldb.DB, id string) int {
	return countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1`, id)
}

// outboxCount counts the outbox rows of a message id.
func outboxCount(t testing.TB, db *sqldb.DB, id string) int {
	return countRows(t, db, `SELECT count(*) FROM troupe_outbox WHERE id = $1`, id)
}

// outboxMessage decodes the outbox row of a message id.
func outboxMessage(t testing.TB, db *sqldb.DB, id string) *message.Message {
	t.Helper()
	var env []byte
	if err := db.QueryRow(context.Background(), `SELECT envelope FROM troupe_outbox WHERE id = $1`, id).Scan(&env); err != nil {
		t.Fatalf("outbox row %q: %v", id, err)
	}
	m, err := outbox.DecodeEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// effectsByID counts the effect rows of each timer id.
func effectsByID(t testing.TB, db *sqldb.DB) map[string]int {
	t.Helper()
	rs, err := db.Query(context.Background(), `SELECT timer_id, count(*) FROM effects GROUP BY timer_id`)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for rs.Next() {
		var id string
		var n int
		if err := rs.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		out[id] = n
	}
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkEachOnce fails t unless the effects table holds exactly one row for
// each of the n timers scheduleMany made with prefix "w".
func checkEachOnce(t testing.TB, db *sqldb.DB, n int) {
	t.Helper()
	got := effectsByID(t, db)
	for i := range n {
		id := fmt.Sprintf("w%04d", i)
		if got[id] != 1 {
			t.Errorf("timer %s took effect %d times", id, got[id])
		}
	}
	if len(got) != n {
		t.Errorf("effects of %d timers, want %d", len(got), n)
	}
}

// waitFailed waits until Failed lists the timer id, and returns its entry.
func waitFailed(t testing.TB, s *timer.Scheduler, id string) timer.FailedTimer {
	t.Helper()
	var found timer.FailedTimer
	waitFor(t, "timer "+id+" to fail", func() bool {
		fs, err := s.Failed(context.Background(), 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fs {
			if f.ID == id {
				found = f
				return true
			}
		}
		return false
	})
	return found
}

// checkStats fails t unless s.Stats reads want.
func checkStats(t testing.TB, when string, s *timer.Scheduler, want timer.Stats) {
	t.Helper()
	got := readStats(t, s)
	if got.Pending != want.Pending || got.Due != want.Due || got.Failed != want.Failed || !got.OldestDue.Equal(want.OldestDue) {
		t.Fatalf("Stats %s = %+v\nwant %+v", when, got, want)
	}
}

// readStats reads s.Stats.
func readStats(t testing.TB, s *timer.Scheduler) timer.Stats {
	t.Helper()
	st, err := s.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// recvWithin receives from ch, failing the test after 20 s.
func recvWithin[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// checkFired compares a Fired with want, times by Equal and the message by
// id only.
func checkFired(t testing.TB, got, want timer.Fired) {
	t.Helper()
	if got.ID != want.ID || got.Kind != want.Kind || got.Target != want.Target || !got.Due.Equal(want.Due) ||
		!got.At.Equal(want.At) || got.Attempt != want.Attempt || got.Msg == nil || got.Msg.ID != want.ID {
		t.Fatalf("Fired = %+v\nwant  %+v", got, want)
	}
}
