package timer_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// The benchmarks run on the tests' databases: a SQLite file
// (synchronous=NORMAL) and the shared PostgreSQL cluster, which runs with
// fsync off. Figures with durable commits on PostgreSQL come from
// `troupe bench timer --db postgres`.

// BenchmarkFire measures one scheduler (default BatchSize) draining b.N
// timers that are all due, into a local handler that inserts one row each,
// and into the outbox. It reports fires per second, from Run's start to the
// OnFired of the last timer.
func BenchmarkFire(b *testing.B) {
	for _, kind := range dialects {
		for _, target := range []string{"handler", "topic"} {
			b.Run(kind+"/"+target, func(b *testing.B) { benchFire(b, kind, target) })
		}
	}
}

func benchFire(b *testing.B, kind, target string) {
	db, _ := openDB(b, kind)
	var (
		seen     atomic.Int64
		allFired = make(chan struct{})
		once     sync.Once
	)
	s := newScheduler(b, db, timer.Config{OnFired: func(fs []timer.Fired) {
		if seen.Add(int64(len(fs))) >= int64(b.N) {
			once.Do(func() { close(allFired) })
		}
	}})
	to, fired := timer.ToTopic("bench.fire"), `SELECT count(DISTINCT id) FROM troupe_outbox`
	if target == "handler" {
		if err := s.Handle("bench.fire", recordEffect("bench")); err != nil {
			b.Fatal(err)
		}
		to, fired = timer.ToHandler("bench.fire"), `SELECT count(DISTINCT timer_id) FROM effects`
	}
	benchScheduleDue(b, db, s, b.N, to)

	b.ResetTimer()
	run(b, s)
	select {
	case <-allFired:
	case <-time.After(5 * time.Minute):
		b.Fatalf("%d of %d timers fired within 5 minutes", seen.Load(), b.N)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "fires/s")
	if n := countRows(b, db, fired); n != b.N {
		b.Fatalf("%d distinct timers fired, want %d", n, b.N)
	}
}

// benchScheduleDue schedules n timers due at once, 1,000 per transaction.
func benchScheduleDue(b *testing.B, db *sqldb.DB, s *timer.Scheduler, n int, to timer.Target) {
	b.Helper()
	ctx := context.Background()
	for start := 0; start < n; start += 1000 {
		at := time.Now()
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			for i := start; i < min(start+1000, n); i++ {
				if err := s.ScheduleTx(ctx, tx, at, to, newMsg(fmt.Sprintf("t%09d", i))); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkScheduleTx measures ScheduleTx inside the caller's transaction:
// alone in its transaction (what a request that sets one timer pays,
// commit included), and 100 to a transaction (the cost of the call
// itself). It reports timers scheduled per second.
func BenchmarkScheduleTx(b *testing.B) {
	for _, kind := range dialects {
		for _, perTx := range []int{1, 100} {
			b.Run(fmt.Sprintf("%s/%d-per-tx", kind, perTx), func(b *testing.B) {
				ctx := context.Background()
				db, _ := openDB(b, kind)
				s := newScheduler(b, db, timer.Config{})
				due := time.Now().Add(time.Hour)
				b.ReportAllocs()
				for b.Loop() {
					err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						for range perTx {
							m := message.New("/bench/timer", "troupe.bench.reminder", []byte(`{"order":"o-1"}`))
							if err := s.ScheduleTx(ctx, tx, due, timer.ToTopic("reminders"), m); err != nil {
								return err
							}
						}
						return nil
					})
					if err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N*perTx)/b.Elapsed().Seconds(), "timers/s")
			})
		}
	}
}
