package timer_test

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A handler whose writes fail only at COMMIT (a deferred constraint) fails
// the whole batch's transaction, after every handler returned nil. The
// scheduler must find the culprit, charge it the attempt, and go on firing
// the others, instead of retrying the same batch forever.
func TestHandle_AHandlerThatCannotCommitIsChargedAndDoesNotStallOthers(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			for _, q := range []string{
				`CREATE TABLE parent (k INTEGER PRIMARY KEY)`,
				`CREATE TABLE child (k INTEGER REFERENCES parent (k) DEFERRABLE INITIALLY DEFERRED)`,
			} {
				if _, err := db.Exec(ctx, q); err != nil {
					t.Fatal(err)
				}
			}
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 3, Backoff: func(int) time.Duration { return time.Second }})
			if err := s.Handle("orphan", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				_, err := tx.Exec(ctx, `INSERT INTO child (k) VALUES (42)`) // no parent: fails at COMMIT
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if err := s.Handle("work", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			// The poison is due first, so every batch starts with it.
			if err := s.Schedule(ctx, t0, timer.ToHandler("orphan"), newMsg("bad")); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{"good-1", "good-2"} {
				if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToHandler("work"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Schedule(ctx, t0.Add(time.Second), timer.ToTopic("t"), newMsg("good-topic")); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "the good timers", func() bool {
				return effectCount(t, db, "good-1") == 1 && effectCount(t, db, "good-2") == 1 && outboxCount(t, db, "good-topic") == 1
			})
			// The poison is retried after its backoff and fails for good
			// after MaxAttempts, with the commit's error as its reason.
			waitFor(t, "the poison to fail", func() bool {
				clock.Advance(time.Second)
				return len(failedByID(t, s)) == 1
			})
			f := failedByID(t, s)["bad"]
			if f.Attempts != 3 || f.LastError == "" {
				t.Fatalf("failed record %+v: want 3 attempts and the commit's error", f)
			}
			if n := countRows(t, db, `SELECT count(*) FROM child`); n != 0 {
				t.Fatalf("%d orphan rows committed", n)
			}
		})
	}
}

// A message ScheduleTx accepts is one the scheduler can fire: an envelope
// over the decoder's limit is refused up front, not failed when due.
func TestScheduleTx_RefusesAMessageTooLargeToFire(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			m := newMsg("big")
			m.DataContentType = "application/octet-stream"
			m.Data = make([]byte, 900<<10) // base64 in the envelope: over 1 MiB
			err := s.Schedule(context.Background(), t0, timer.ToTopic("t"), m)
			if !errors.Is(err, timer.ErrInvalidTimer) {
				t.Fatalf("Schedule of a %d-byte message: %v, want ErrInvalidTimer", len(m.Data), err)
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d timers stored", n)
			}
		})
	}
}

// Two handlers failing in one batch: each failed attempt's writes roll back
// (to its own savepoint) while the others' commit.
func TestHandle_TwoFailuresInOneBatchRollBackBothAndKeepTheRest(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			if err := s.Handle("work", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if err := recordEffect("")(ctx, tx, f); err != nil {
					return err
				}
				if f.ID == "b-fails" || f.ID == "d-fails" {
					return errors.New("after writing")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			ids := []string{"a-ok", "b-fails", "c-ok", "d-fails", "e-ok"}
			for i, id := range ids {
				if err := s.Schedule(ctx, t0.Add(time.Duration(i+1)*time.Millisecond), timer.ToHandler("work"), newMsg(id)); err != nil {
					t.Fatal(err)
				}
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "the batch", func() bool { return attemptsOf(t, db, "b-fails") == 1 && attemptsOf(t, db, "d-fails") == 1 })
			for _, id := range []string{"a-ok", "c-ok", "e-ok"} {
				if n := effectCount(t, db, id); n != 1 {
					t.Errorf("%s: %d effects, want 1", id, n)
				}
			}
			for _, id := range []string{"b-fails", "d-fails"} {
				if n := effectCount(t, db, id); n != 0 {
					t.Errorf("%s: the failed attempt's write committed (%d effects)", id, n)
				}
			}
		})
	}
}

// On PostgreSQL a batch's transaction is its lease: a holder that hangs
// (here a handler that ignores its context) is cut off by the server after
// LeaseTTL idle, and another scheduler fires the batch's timers, once.
func TestScheduler_AHungHolderLosesItsBatchAfterTheLease(t *testing.T) {
	db, _ := openDB(t, "postgres")
	ctx := context.Background()
	hang, hung := make(chan struct{}), make(chan struct{})
	defer close(hang)
	a := newScheduler(t, db, timer.Config{LeaseTTL: time.Second, HTTPTimeout: 500 * time.Millisecond, Owner: "a"})
	var once bool
	if err := a.Handle("work", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
		if err := recordEffect("a")(ctx, tx, f); err != nil {
			return err
		}
		if !once {
			once = true
			close(hung)
			<-hang // ignores ctx: hangs past the lease
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, id := range []string{"t1", "t2", "t3"} {
		if err := a.Schedule(ctx, now, timer.ToHandler("work"), newMsg(id)); err != nil {
			t.Fatal(err)
		}
	}
	run(t, a)
	<-hung // a holds the three timers' row locks
	b := newScheduler(t, db, timer.Config{LeaseTTL: time.Second, HTTPTimeout: 500 * time.Millisecond, Owner: "b"})
	if err := b.Handle("work", recordEffect("b")); err != nil {
		t.Fatal(err)
	}
	run(t, b)
	waitFor(t, "b to fire the hung batch", func() bool {
		return countRows(t, db, `SELECT count(*) FROM effects WHERE owner = 'b'`) == 3
	})
	if n := countRows(t, db, `SELECT count(*) FROM effects WHERE owner = 'a'`); n != 0 {
		t.Fatalf("%d effects of the hung holder committed", n)
	}
	if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
		t.Fatalf("%d timers left", n)
	}
}

// Several firing transactions at once in one scheduler fire each timer once.
func TestScheduler_FireConcurrencyFiresEachTimerOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, BatchSize: 20, FireConcurrency: 3})
			if err := s.Handle("work", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			const n = 600
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				for i := range n {
					if err := s.ScheduleTx(ctx, tx, t0.Add(time.Duration(i)*time.Millisecond), timer.ToHandler("work"), newMsg("c"+strconv.Itoa(i))); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			run(t, s)
			clock.Advance(time.Second)
			waitFor(t, "every timer", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			if got := countRows(t, db, `SELECT count(*) FROM effects`); got != n {
				t.Fatalf("%d effects, want %d", got, n)
			}
			if got := countRows(t, db, `SELECT count(DISTINCT timer_id) FROM effects`); got != n {
				t.Fatalf("%d distinct timers had an effect, want %d", got, n)
			}
		})
	}
}
