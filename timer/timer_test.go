package timer_test

import (
	"context"
	"fmt"
	"testing"
	"time"

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
