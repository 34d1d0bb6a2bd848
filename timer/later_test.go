package timer_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A handler's write queued with sqldb.ExecLater that fails is sent by the
// next handler's statement (PostgreSQL pipelines it). The batch must charge
// the failure to the timer whose handler queued it, and fire the others.
func TestFire_AFailingQueuedWriteIsChargedToItsOwnTimer(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 1})
			const bad = "t-05"
			if err := s.Handle("h", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if err := recordEffect("s")(ctx, tx, f); err != nil {
					return err
				}
				if f.ID == bad {
					return sqldb.ExecLater(ctx, tx, `INSERT INTO no_such_table VALUES (1)`)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			for i := range 10 {
				id := fmt.Sprintf("t-%02d", i)
				if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("h"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			clock.Advance(2 * time.Second)
			run(t, s)
			waitFor(t, "the other nine timers fired and the bad one failed", func() bool {
				fs, err := s.Failed(ctx, 10)
				return err == nil && len(fs) == 1 && countRows(t, db, `SELECT count(*) FROM effects`) == 9
			})
			fs, _ := s.Failed(ctx, 10)
			if fs[0].ID != bad {
				t.Errorf("failed timer %q, want %q", fs[0].ID, bad)
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1`, bad); n != 0 {
				t.Errorf("the failed timer's own write is there %d times, want undone", n)
			}
		})
	}
}

// A timer scheduled with ScheduleLaterTx is the same row as one from
// ScheduleTx, and fires once like it.
func TestScheduleLaterTx_StoresTheSameTimerAsScheduleTxAndItFiresOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("h", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			due := t0.Add(time.Minute)
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := s.ScheduleTx(ctx, tx, due, timer.ToHandler("h"), newMsg("now")); err != nil {
					return err
				}
				return s.ScheduleLaterTx(ctx, tx, due, timer.ToHandler("h"), newMsg("later"))
			}); err != nil {
				t.Fatal(err)
			}
			row := func(id string) string {
				var kind int
				var target, schedule string
				var at time.Time
				if err := db.QueryRow(ctx, `SELECT kind, target, due_at, schedule FROM troupe_timers WHERE id = $1`, id).Scan(&kind, &target, &at, &schedule); err != nil {
					t.Fatalf("timer %q: %v", id, err)
				}
				return fmt.Sprint(kind, target, at.UTC(), schedule)
			}
			if a, b := row("now"), row("later"); a != b {
				t.Fatalf("ScheduleLaterTx stored %q, ScheduleTx %q", b, a)
			}
			run(t, s)
			clock.Advance(time.Minute)
			waitFor(t, "both timers to fire", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			for _, id := range []string{"now", "later"} {
				if n := effectCount(t, db, id); n != 1 {
					t.Errorf("timer %q fired %d times, want once", id, n)
				}
			}
		})
	}
}

// ScheduleLaterTx of an id that is taken succeeds and leaves the first
// timer as it was; within one transaction, a ScheduleTx after it sees it.
func TestScheduleLaterTx_AnExistingIDKeepsTheFirstTimer(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			for _, h := range []string{"first", "second"} {
				if err := s.Handle(h, recordEffect(h)); err != nil {
					t.Fatal(err)
				}
			}
			due := t0.Add(time.Minute)
			if err := s.Schedule(ctx, due, timer.ToHandler("first"), newMsg("x")); err != nil {
				t.Fatal(err)
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				for range 2 {
					if err := s.ScheduleLaterTx(ctx, tx, t0.Add(time.Hour), timer.ToHandler("second"), newMsg("x")); err != nil {
						return err
					}
				}
				if err := s.ScheduleLaterTx(ctx, tx, due, timer.ToHandler("second"), newMsg("y")); err != nil {
					return err
				}
				if err := s.ScheduleTx(ctx, tx, due, timer.ToHandler("first"), newMsg("y")); !errors.Is(err, timer.ErrExists) {
					t.Errorf("ScheduleTx after ScheduleLaterTx of the same id = %v, want ErrExists", err)
				}
				return nil
			}); err != nil {
				t.Fatalf("ScheduleLaterTx of a taken id: %v", err)
			}
			if got := dueOf(t, db, "x"); !got.Equal(due) {
				t.Fatalf("timer x is due at %v, want the first's %v", got, due)
			}
			run(t, s)
			clock.Advance(time.Minute)
			waitFor(t, "the timers to fire", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			for id, owner := range map[string]string{"x": "first", "y": "second"} {
				if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1 AND owner = $2`, id, owner); n != 1 || effectCount(t, db, id) != 1 {
					t.Errorf("timer %q: want it fired once, by handler %q", id, owner)
				}
			}
		})
	}
}

// ScheduleLaterTx checks what ScheduleTx checks, at once.
func TestScheduleLaterTx_RefusesWhatScheduleTxRefuses(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			for _, tc := range []struct {
				name    string
				at      time.Time
				target  timer.Target
				msg     *message.Message
				wantErr error
			}{
				{"past", t0.Add(-time.Hour), timer.ToHandler("h"), newMsg("a"), timer.ErrInPast},
				{"zero time", time.Time{}, timer.ToHandler("h"), newMsg("b"), timer.ErrInPast},
				{"no target", t0, timer.Target{}, newMsg("c"), timer.ErrInvalidTimer},
				{"nil message", t0, timer.ToTopic("t"), nil, timer.ErrInvalidTimer},
			} {
				err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					return s.ScheduleLaterTx(ctx, tx, tc.at, tc.target, tc.msg)
				})
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("%s: %v, want %v", tc.name, err, tc.wantErr)
				}
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Errorf("%d timers stored, want none", n)
			}
		})
	}
}

// TryCancelLaterTx deletes pending timers when its transaction commits,
// and not when it rolls back.
func TestTryCancelLaterTx_CancelsAPendingTimerWithItsTransaction(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("h", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{"cancelled", "cancelled-too", "rolled-back"} {
				if err := s.Schedule(ctx, t0.Add(time.Minute), timer.ToHandler("h"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return s.TryCancelLaterTx(ctx, tx, "cancelled", "cancelled-too")
			}); err != nil {
				t.Fatal(err)
			}
			errAbort := errors.New("the business change failed")
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := s.TryCancelLaterTx(ctx, tx, "rolled-back"); err != nil {
					return err
				}
				return errAbort
			}); !errors.Is(err, errAbort) {
				t.Fatalf("InTx = %v", err)
			}
			if isStored(t, db, "cancelled") || isStored(t, db, "cancelled-too") || !isStored(t, db, "rolled-back") {
				t.Fatal("want the cancelled timers gone and the one whose cancellation rolled back kept")
			}
			run(t, s)
			clock.Advance(time.Minute)
			waitFor(t, "the kept timer to fire", func() bool { return effectCount(t, db, "rolled-back") == 1 })
			if n := effectCount(t, db, "cancelled"); n != 0 {
				t.Fatalf("the cancelled timer fired %d times", n)
			}
		})
	}
}

// A try-cancel does not wait for a scheduler that is firing the timer: on
// PostgreSQL TryCancelTx reports false and TryCancelLaterTx leaves it, both
// at once; the timer then fires, once. On SQLite, whose write transactions
// take turns, they run after the firing and find nothing to cancel.
func TestTryCancelLaterTx_LeavesATimerASchedulerHolds(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			holding, release := make(chan struct{}, 1), make(chan struct{})
			var once sync.Once
			releaseOnce := func() { once.Do(func() { close(release) }) }
			if err := s.Handle("h", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				select {
				case holding <- struct{}{}:
				default:
				}
				<-release
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			if err := s.Schedule(ctx, t0.Add(time.Minute), timer.ToHandler("h"), newMsg("held")); err != nil {
				t.Fatal(err)
			}
			if err := s.Schedule(ctx, t0.Add(time.Hour), timer.ToHandler("h"), newMsg("pending")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			t.Cleanup(releaseOnce) // before Run's cleanup, which waits for the handler
			clock.Advance(time.Minute)
			select {
			case <-holding:
			case <-time.After(20 * time.Second):
				t.Fatal("the timer did not fire")
			}
			type result struct {
				cancelled bool
				err       error
			}
			done := make(chan result, 1)
			go func() {
				err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					// The pending timer is cancelled with it, by one statement.
					return s.TryCancelLaterTx(ctx, tx, "held", "pending")
				})
				var ok bool
				if err == nil {
					err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						var err error
						ok, err = s.TryCancelTx(ctx, tx, "held")
						return err
					})
				}
				done <- result{ok, err}
			}()
			if kind == "sqlite" {
				releaseOnce()
			}
			var r result
			select {
			case r = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("the try-cancels waited for the scheduler holding the timer")
			}
			releaseOnce()
			if r.err != nil || r.cancelled {
				t.Fatalf("TryCancelTx of a held timer = %v, %v; want false", r.cancelled, r.err)
			}
			waitFor(t, "the timer to fire", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			if n := effectCount(t, db, "held"); n != 1 {
				t.Fatalf("the held timer fired %d times, want once", n)
			}
		})
	}
}

// Timers scheduled together with ScheduleAllLaterTx are stored as
// ScheduleTx stores them, an existing id is kept, and each fires once.
func TestScheduleAllLaterTx_SchedulesEachTimerAndEachFiresOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("h", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			if err := s.Schedule(ctx, t0.Add(time.Minute), timer.ToHandler("h"), newMsg("existing")); err != nil {
				t.Fatal(err)
			}
			var timers []timer.Timer
			for _, id := range []string{"a", "b", "c", "existing"} {
				timers = append(timers, timer.Timer{At: t0.Add(2 * time.Minute), Target: timer.ToHandler("h"), Msg: newMsg(id)})
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return s.ScheduleAllLaterTx(ctx, tx, timers...) }); err != nil {
				t.Fatal(err)
			}
			var due time.Time
			if err := db.QueryRow(ctx, `SELECT due_at FROM troupe_timers WHERE id = 'existing'`).Scan(&due); err != nil || !due.Equal(t0.Add(time.Minute)) {
				t.Fatalf("the existing timer is due %v (%v), want kept at %v", due, err, t0.Add(time.Minute))
			}
			run(t, s)
			clock.Advance(2 * time.Minute)
			waitFor(t, "every timer fired", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			for _, id := range []string{"a", "b", "c", "existing"} {
				if n := effectCount(t, db, id); n != 1 {
					t.Errorf("timer %s fired %d times, want once", id, n)
				}
			}
		})
	}
}

// One timer that ScheduleTx would refuse fails the whole call: none of the
// others is stored.
func TestScheduleAllLaterTx_OneInvalidTimerStoresNone(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			timers := []timer.Timer{
				{At: t0.Add(time.Minute), Target: timer.ToHandler("h"), Msg: newMsg("fine")},
				{At: t0.Add(time.Minute), Target: timer.ToHandler("h"), Msg: nil},
			}
			var err error
			// The caller commits anyway: nothing was queued.
			if cerr := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				err = s.ScheduleAllLaterTx(ctx, tx, timers...)
				return nil
			}); cerr != nil {
				t.Fatal(cerr)
			}
			if !errors.Is(err, timer.ErrInvalidTimer) {
				t.Fatalf("ScheduleAllLaterTx with a nil message = %v, want ErrInvalidTimer", err)
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Errorf("%d timers stored, want none", n)
			}
		})
	}
}
