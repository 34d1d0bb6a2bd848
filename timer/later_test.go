package timer_test

import (
	"context"
	"fmt"
	"testing"
	"time"

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
