package outbox_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

func TestRelay_PublishesEveryCommittedMessageOnceInSubjectOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			b := startNATS(t, t.TempDir(), "")
			c := newConsumer(t)
			c.subscribe(t, b, "shop.orders")
			r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, BatchSize: 50})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			subs := subjects(10)
			n := writeOrdered(t, db, "shop.orders", subs, 30, 7)
			c.waitEffects(t, n, 20*time.Second)
			if got := c.checkExactlyOnceInOrder(t, subs, 30); got != n {
				t.Errorf("%d deliveries for %d messages", got, n)
			}
			waitFor(t, 10*time.Second, "every row marked delivered", func() bool { return pendingRows(t, db) == 0 })
		})
	}
}

func TestRelay_WakesAtCommitWithoutPolling(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, url := openDB(t, kind)
			b := startNATS(t, t.TempDir(), "")
			c := newConsumer(t)
			c.subscribe(t, b, "shop.orders")
			// No poll and no lease renewal within the test: only a wake can
			// start a round.
			r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Notify, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			// On PostgreSQL a writer in another process (here: another pool)
			// wakes the relay by NOTIFY at commit; on SQLite the writer in
			// the relay's process calls Notify.
			writer := db
			if kind == "postgres" {
				w, err := sqldb.Open(context.Background(), url, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer w.Close()
				writer = w
			}
			// The first messages may be found by the relay's first round or
			// its LISTEN set-up; by the third, only a wake at its commit can
			// deliver it.
			for i := range 3 {
				writeOrdered(t, writer, "shop.orders", []string{"order-1"}, 1, 1)
				if kind == "sqlite" {
					r.Notify()
				}
				c.waitEffects(t, i+1, 10*time.Second)
			}
		})
	}
}

// fakeClock is a Clock that moves only when told. Each After call is
// announced on requested, so a test knows what the relay waits for.
type fakeClock struct {
	mu        sync.Mutex
	now       time.Time
	waiters   []fakeWaiter
	requested chan time.Duration
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC), requested: make(chan time.Duration, 1000)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, fakeWaiter{at: c.now.Add(d), ch: ch})
	select {
	case c.requested <- d:
	default:
	}
	return ch
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
			continue
		}
		w.ch <- c.now
	}
	c.waiters = kept
}

// waitRequest waits until the relay asks the clock to wait exactly d.
func (c *fakeClock) waitRequest(t *testing.T, d time.Duration) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-c.requested:
			if got == d {
				return
			}
		case <-deadline:
			t.Fatalf("the relay never waited %s", d)
		}
	}
}

// flakyPublisher fails its first calls, then records what it accepts.
type flakyPublisher struct {
	mu       sync.Mutex
	fail     func(call int, msgs []*message.Message) error
	calls    int
	accepted []string
	changed  chan struct{}
}

func (p *flakyPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls++
	err := p.fail(p.calls, msgs)
	var pe *broker.PublishError
	for i, m := range msgs {
		if err != nil && (!errors.As(err, &pe) || pe.Failed[i] != nil) {
			continue
		}
		p.accepted = append(p.accepted, m.ID)
	}
	select {
	case p.changed <- struct{}{}:
	default:
	}
	return err
}

func (p *flakyPublisher) waitAccepted(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		p.mu.Lock()
		got := slices.Clone(p.accepted)
		p.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-p.changed:
		case <-deadline:
			t.Fatalf("publisher accepted %d of %d messages", len(got), n)
		}
	}
}

func idsOf(msgs []*message.Message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.ID
	}
	return out
}

func addAll(t *testing.T, db *sqldb.DB, topic string, msgs []*message.Message) {
	t.Helper()
	if err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, topic, msgs...)
	}); err != nil {
		t.Fatal(err)
	}
}

func TestRelay_BacksOffOnTheInjectedClockWhileTheBrokerFailsThenDeliversInOrder(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	msgs := make([]*message.Message, 20)
	for i := range msgs {
		msgs[i] = newMsg("order-1", i)
	}
	addAll(t, db, "shop.orders", msgs)
	errDown := errors.New("broker down")
	pub := &flakyPublisher{changed: make(chan struct{}, 1), fail: func(call int, _ []*message.Message) error {
		if call <= 3 {
			return errDown
		}
		return nil
	}}
	clock := newFakeClock()
	r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Clock: clock, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour, MinBackoff: 100 * time.Millisecond, MaxBackoff: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	// Three failures: waits of 100ms, 200ms, then 300ms (the cap); nothing
	// moves until the clock does.
	for _, d := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond} {
		clock.waitRequest(t, d)
		if n := pendingRows(t, db); n != len(msgs) {
			t.Fatalf("%d rows pending during the outage, want %d", n, len(msgs))
		}
		clock.Advance(d)
	}
	got := pub.waitAccepted(t, len(msgs))
	if !slices.Equal(got, idsOf(msgs)) {
		t.Fatalf("accepted %v\nwant %v", got, idsOf(msgs))
	}
	waitFor(t, 10*time.Second, "every row marked delivered", func() bool { return pendingRows(t, db) == 0 })
}

// TestRelay_RetriesFromTheFirstRefusedMessageOfAPartitionInOrder: when the
// broker refuses one message of a batch (and, as the broker.Publisher
// contract says, does not send the later ones of its subject), only the rows
// before it are marked delivered, and the retry publishes from it, so the
// broker accepts the subject's messages once each and in order.
func TestRelay_RetriesFromTheFirstRefusedMessageOfAPartitionInOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			msgs := make([]*message.Message, 10)
			for i := range msgs {
				msgs[i] = newMsg("order-1", i)
			}
			addAll(t, db, "shop.orders", msgs)
			// The broker refuses the fifth message of the first batch and
			// holds back the later ones of its subject.
			pub := &flakyPublisher{changed: make(chan struct{}, 1), fail: func(call int, batch []*message.Message) error {
				if call != 1 {
					return nil
				}
				failed := map[int]error{4: errors.New("refused")}
				for i := 5; i < len(batch); i++ {
					failed[i] = broker.ErrNotSent
				}
				return &broker.PublishError{Topic: "shop.orders", Total: len(batch), Failed: failed}
			}}
			clock := newFakeClock()
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Clock: clock, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			clock.waitRequest(t, outbox.DefaultMinBackoff)
			// Only the rows before the refused one count as delivered (the
			// mark may end after the relay began its backoff).
			waitFor(t, 10*time.Second, "the 4 rows before the refused one marked delivered, 6 pending", func() bool { return pendingRows(t, db) == 6 })
			clock.Advance(outbox.DefaultMinBackoff)
			got := pub.waitAccepted(t, len(msgs))
			if !slices.Equal(got, idsOf(msgs)) {
				t.Fatalf("accepted %v\nwant %v", got, idsOf(msgs))
			}
			waitFor(t, 10*time.Second, "every row marked delivered", func() bool { return pendingRows(t, db) == 0 })
		})
	}
}

func TestRelay_RetentionDeletesDeliveredRowsOnly(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			addAll(t, db, "shop.orders", []*message.Message{newMsg("a", 0), newMsg("b", 0)})
			blocked := newMsg("c", 0)
			addAll(t, db, "shop.refused", []*message.Message{blocked})
			pub := &flakyPublisher{changed: make(chan struct{}, 1), fail: func(_ int, batch []*message.Message) error {
				if batch[0].ID == blocked.ID {
					return errors.New("refused")
				}
				return nil
			}}
			clock := newFakeClock()
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Clock: clock, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour, MaxBackoff: time.Hour, MinBackoff: time.Hour, Retention: time.Hour, RetentionInterval: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			pub.waitAccepted(t, 2)
			waitFor(t, 10*time.Second, "two rows marked delivered", func() bool { return pendingRows(t, db) == 1 })
			count := func() int {
				var n int
				if err := db.QueryRow(context.Background(), "SELECT count(*) FROM troupe_outbox").Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n
			}
			// A minute later the delivered rows are younger than the
			// retention: kept.
			clock.waitRequest(t, time.Minute)
			clock.Advance(time.Minute)
			clock.waitRequest(t, time.Minute) // the next prune is scheduled: this one ran
			if n := count(); n != 3 {
				t.Fatalf("%d rows after a prune within retention, want 3", n)
			}
			clock.Advance(time.Hour)
			clock.waitRequest(t, time.Minute)
			if n := count(); n != 1 || pendingRows(t, db) != 1 {
				t.Fatalf("%d rows (%d pending) after retention, want only the pending one", n, pendingRows(t, db))
			}
		})
	}
}

func TestDeleteDelivered_DeletesInBatchesUntilNoneIsLeft(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			msgs := make([]*message.Message, 25)
			for i := range msgs {
				msgs[i] = newMsg("s", i)
			}
			addAll(t, db, "t", msgs)
			at := time.Now().Add(-2 * time.Hour)
			seqs := make([]int64, 20)
			for i := range seqs {
				seqs[i] = int64(i + 1)
			}
			if err := outbox.MarkDelivered(ctx, db, at, seqs...); err != nil {
				t.Fatal(err)
			}
			n, err := outbox.DeleteDelivered(ctx, db, time.Now().Add(-time.Hour), 7)
			if err != nil || n != 20 {
				t.Fatalf("DeleteDelivered = %d, %v; want 20", n, err)
			}
			if p := pendingRows(t, db); p != 5 {
				t.Fatalf("%d pending rows left, want 5", p)
			}
		})
	}
}

func TestNewRelay_ReportsEveryConfigProblem(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	_, err := outbox.NewRelay(db, &flakyPublisher{}, outbox.RelayConfig{Mode: 9, BatchSize: -1, MinBackoff: time.Second, MaxBackoff: time.Millisecond})
	if !errors.Is(err, outbox.ErrInvalidConfig) {
		t.Fatalf("err = %v, want ErrInvalidConfig", err)
	}
	for _, want := range []string{"Mode", "BatchSize", "backoff"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// waitFor waits until cond holds, checking it every few milliseconds, and
// fails the test after timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", timeout, what)
		}
		<-tick.C
	}
}

func TestRelay_GoesOnAfterItsConnectionsAreCut(t *testing.T) {
	db, url := openDB(t, "postgres")
	b := startNATS(t, t.TempDir(), "")
	c := newConsumer(t)
	c.subscribe(t, b, "shop.orders")
	r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond,
		MinBackoff: time.Millisecond, MaxBackoff: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	writeOrdered(t, db, "shop.orders", []string{"order-1"}, 1, 1)
	c.waitEffects(t, 1, 10*time.Second)

	// Every connection of the relay's database is cut: the pool's, the
	// LISTEN one's, and the one it reads pending rows through.
	admin, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND pid <> pg_backend_pid()`); err != nil {
		t.Fatal(err)
	}
	writeOrdered(t, admin, "shop.orders", []string{"order-2"}, 1, 1)
	c.waitEffects(t, 2, 10*time.Second)
	waitFor(t, 10*time.Second, "every row marked delivered", func() bool { return pendingRows(t, admin) == 0 })
}
