package inbox_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// clock is a settable clock for Config.Now.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.set(t)
	return c
}
func (c *clock) set(t time.Time)     { c.ns.Store(t.UnixNano()) }
func (c *clock) now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *clock) add(d time.Duration) { c.set(c.now().Add(d)) }

func TestPrune_DeletesOnlyRowsPastRetentionInBoundedBatches(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		clk := newClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
		ib := newInbox(t, db.DB, inbox.Config{Retention: 7 * 24 * time.Hour, PruneBatchSize: 3, Now: clk.now})
		noop := func(context.Context, sqldb.Tx, *message.Message) error { return nil }

		old := newMessages(7)
		ib.Handler("billing", noop)(ctx, deliveries(1, old[:5]...))
		ib.Handler("shipping", noop)(ctx, deliveries(1, old[5:]...))
		clk.add(6 * 24 * time.Hour)
		recent := newMessages(3)
		ib.Handler("billing", noop)(ctx, deliveries(1, recent...))

		// One hour past the old rows' retention, five days short of the
		// recent ones'.
		clk.add(24*time.Hour + time.Hour)
		n, err := ib.Prune(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n != 7 {
			t.Errorf("Prune deleted %d rows, want 7", n)
		}
		rows := inboxRows(t, db.DB)
		if len(rows) != 3 {
			t.Errorf("%d inbox rows left, want 3", len(rows))
		}
		for _, m := range recent {
			if rows[m.ID] != 1 {
				t.Errorf("recent message %s was pruned", m.ID)
			}
		}
		if n, err := ib.Prune(ctx); err != nil || n != 0 {
			t.Errorf("second Prune: %d rows, %v; want 0, nil", n, err)
		}
	})
}

func TestRun_PrunesInTheBackgroundUntilItsContextEnds(t *testing.T) {
	db := openDB(t, "sqlite")
	clk := newClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
	ib := newInbox(t, db.DB, inbox.Config{Retention: time.Hour, PruneInterval: 10 * time.Millisecond, Now: clk.now})
	noop := func(context.Context, sqldb.Tx, *message.Message) error { return nil }
	ib.Handler("billing", noop)(context.Background(), deliveries(1, newMessages(5)...))

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- ib.Run(ctx) }()
	clk.add(2 * time.Hour)
	waitFor(t, "Run to prune the expired rows", func() bool { return len(inboxRows(t, db.DB)) == 0 })
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run returned %v, want nil", err)
	}
}
