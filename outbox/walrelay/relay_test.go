package walrelay_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox/walrelay"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	if os.Getenv(envChild) != "" {
		os.Exit(childMain())
	}
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

func TestNew_ReportsEveryConfigProblemAtOnce(t *testing.T) {
	_, err := walrelay.New(walrelay.Config{SlotName: "Bad-Name", Publication: "x y", BatchSize: -1, RetryMin: time.Second, RetryMax: time.Millisecond})
	if !errors.Is(err, walrelay.ErrInvalidConfig) {
		t.Fatalf("New: got %v, want ErrInvalidConfig", err)
	}
	for _, want := range []string{"URL is required", "Publisher is required", "SlotName", "Publication", "BatchSize", "RetryMin"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestRun_FailsWithoutTheOutboxTable(t *testing.T) {
	u := pgtest.URL(t)
	b := startNATS(t, t.TempDir(), "")
	r, err := walrelay.New(walrelay.Config{URL: u, Publisher: b, SlotName: "walrelay_no_table_" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.Run(ctx); !errors.Is(err, walrelay.ErrNoOutboxTable) {
		t.Fatalf("Run: got %v, want ErrNoOutboxTable", err)
	}
}

// Rows written in several transactions, some before the relay ever ran (so
// before its slot existed), reach the broker in commit order, each subject's
// in the order written; a rolled-back transaction yields nothing; the rows
// end marked delivered.
func TestRelay_PublishesCommittedRowsInCommitOrder(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	subs := subjects(4)

	before := d.writeNumbered(t, subs, 0, 5, 3) // before the slot exists
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, BatchSize: 7})
	c := collect(t, b)
	c.waitCount(t, len(before), 20*time.Second)

	rolledBack := errors.New("roll back")
	err := d.db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		if err := addTx(ctx, tx, newMsg("order-0", 999)); err != nil {
			return err
		}
		return rolledBack
	})
	if !errors.Is(err, rolledBack) {
		t.Fatal(err)
	}
	after := d.writeNumbered(t, subs, 5, 45, 11) // streamed from the WAL
	want := append(before, after...)
	got := c.waitCount(t, len(want), 30*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, subs, 50)

	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 0 })
}

// The lag of a slot nobody reads grows with every write (the server keeps
// that WAL); once a relay catches up it comes back near zero.
func TestRelay_LagGrowsWhileStoppedAndReturnsNearZeroAfterCatchingUp(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	subs := subjects(2)
	rr := startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot})
	c := collect(t, b)
	first := d.writeNumbered(t, subs, 0, 10, 10)
	c.waitCount(t, len(first), 20*time.Second)
	rr.stop(t)

	more := d.writeNumbered(t, subs, 10, 1000, 100)
	stopped, err := walrelay.New(walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot})
	if err != nil {
		t.Fatal(err)
	}
	lag, err := stopped.Lag(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if lag < 100_000 {
		t.Fatalf("lag %d bytes after 2,000 unread rows, want at least 100 kB", lag)
	}
	t.Logf("lag with no relay running: %d bytes", lag)

	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot})
	got := c.waitCount(t, len(first)+len(more), 30*time.Second)
	sameIDs(t, got, append(first, more...))
	final := waitLag(t, d, 16<<10, 20*time.Second)
	t.Logf("lag after catching up: %d bytes", final)
}

// envChild makes the test binary run childMain: a relay that SIGKILLs its
// own process right after the broker acknowledged its killAfter-th batch,
// before marking the rows delivered or confirming their position.
const envChild = "TROUPE_WALRELAY_CHILD"

func childMain() int {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b, err := natsjs.New(ctx, natsjs.Config{URL: os.Getenv("CHILD_NATS")})
	if err != nil {
		println("child: nats:", err.Error())
		return 2
	}
	killAfter, _ := strconv.Atoi(os.Getenv("CHILD_KILL_AFTER"))
	var batches atomic.Int64
	pub := publisherFunc(func(ctx context.Context, topic string, msgs ...*message.Message) error {
		if err := b.Publish(ctx, topic, msgs...); err != nil {
			return err
		}
		if batches.Add(1) == int64(killAfter) {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal ends the process
		}
		return nil
	})
	r, err := walrelay.New(walrelay.Config{URL: os.Getenv("CHILD_URL"), Publisher: pub, SlotName: os.Getenv("CHILD_SLOT"), BatchSize: 10})
	if err != nil {
		println("child:", err.Error())
		return 2
	}
	_ = r.Run(ctx)
	println("child: not killed within 60s")
	return 3
}

type publisherFunc func(ctx context.Context, topic string, msgs ...*message.Message) error

func (f publisherFunc) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	return f(ctx, topic, msgs...)
}

// A relay process killed mid-stream, after the broker took some batches and
// before their position was confirmed: a new relay resumes from the
// confirmed position and every message reaches the consumer once, in order,
// including those written while no relay ran. Re-published messages are
// dropped by the broker's dedup on the message id.
func TestRelay_ResumesAfterKillMidStreamWithNoGapAndNoLoss(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "127.0.0.1:0")
	subs := subjects(3)
	// The slot exists before the child starts, so every row comes from the WAL.
	createSlotOnly(t, d)
	want := d.writeNumbered(t, subs, 0, 80, 6) // 240 messages in 40 transactions

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"=1", "CHILD_NATS="+b.ClientURL(), "CHILD_URL="+d.url,
		"CHILD_SLOT="+d.slot, "CHILD_KILL_AFTER=5")
	out, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: want killed by SIGKILL, got %v: %s", err, out)
	}
	c := collect(t, b)
	c.waitCount(t, 5, 20*time.Second) // the child published 5 batches
	if n := d.undelivered(t); n == 0 || n == len(want) {
		t.Fatalf("%d of %d rows undelivered after the kill: want the child killed mid-stream", n, len(want))
	}

	more := d.writeNumbered(t, subs, 80, 10, 6) // written while no relay runs
	want = append(want, more...)
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, BatchSize: 10, RetryMin: 20 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	got := c.waitCount(t, len(want), 30*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, subs, 90)
	waitLag(t, d, 16<<10, 20*time.Second)
}

// createSlotOnly makes the relay create its slot and publication on an
// empty outbox, then stops it: a relay that ran once, with nothing to publish.
func createSlotOnly(t *testing.T, d testDB) {
	t.Helper()
	ch := make(chan string, 16)
	idle := publisherFunc(func(context.Context, string, ...*message.Message) error {
		return errors.New("idle relay: no publishing expected")
	})
	rr := startRelay(t, walrelay.Config{URL: d.url, Publisher: idle, SlotName: d.slot, Logger: slog.New(logWatch{ch})})
	waitLog(t, ch, "streaming", 20*time.Second)
	rr.stop(t)
}

// swapPublisher publishes through whichever broker is current; with none,
// Publish fails as a closed broker does.
type swapPublisher struct {
	mu       sync.Mutex
	pub      broker.Publisher
	failures chan struct{}
}

func (s *swapPublisher) set(p broker.Publisher) {
	s.mu.Lock()
	s.pub = p
	s.mu.Unlock()
}

func (s *swapPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	s.mu.Lock()
	p := s.pub
	s.mu.Unlock()
	err := p.Publish(ctx, topic, msgs...)
	if err != nil {
		select {
		case s.failures <- struct{}{}:
		default:
		}
	}
	return err
}

// With the broker down the relay keeps retrying with backoff and neither
// marks rows delivered nor confirms their position; once the broker is back
// (restarted on the same files) every message arrives, in order, once.
func TestRelay_BrokerDownBacksOffAndDeliversEverythingAfterRecovery(t *testing.T) {
	d := newTestDB(t)
	dir := t.TempDir()
	ctx := context.Background()
	b1, err := natsjs.New(ctx, natsjs.Config{DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	sp := &swapPublisher{pub: b1, failures: make(chan struct{}, 100)}
	var published atomic.Int64
	startRelay(t, walrelay.Config{URL: d.url, Publisher: sp, SlotName: d.slot, BatchSize: 20,
		RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond,
		OnPublished: func(p walrelay.Published) { published.Add(int64(len(p.Messages))) }})
	subs := subjects(3)
	want := d.writeNumbered(t, subs, 0, 10, 5)
	waitCond(t, 20*time.Second, func() bool { return published.Load() == int64(len(want)) })
	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 0 })
	waitLag(t, d, 16<<10, 20*time.Second)

	b1.Close() // the broker goes down
	down := d.writeNumbered(t, subs, 10, 30, 5)
	want = append(want, down...)
	for range 5 {
		select {
		case <-sp.failures:
		case <-time.After(20 * time.Second):
			t.Fatal("the relay did not retry against the down broker")
		}
	}
	if n := d.undelivered(t); n != len(down) {
		t.Fatalf("%d rows marked undelivered while the broker was down, want %d", n, len(down))
	}
	if lag, err := walrelay.SlotLag(ctx, d.url, d.slot); err != nil || lag < 10_000 {
		t.Fatalf("slot lag %d bytes (%v) while the broker was down: want the position unconfirmed", lag, err)
	}

	b2 := startNATS(t, dir, "") // back, with the messages it had
	sp.set(b2)
	c := collect(t, b2)
	got := c.waitCount(t, len(want), 30*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, subs, 40)
	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 0 })
	waitLag(t, d, 16<<10, 20*time.Second)
}

// Two relays on one slot: the second stands by while the first holds the
// slot, and takes over, losing nothing, when the first stops.
func TestRelay_SecondInstanceStandsByAndTakesOverTheSlot(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	c := collect(t, b)
	subs := subjects(2)

	var byA, byB atomic.Int64
	var logMu sync.Mutex
	var trace []string
	logA := make(chan string, 64)
	a := startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, Logger: slog.New(logWatch{logA}),
		OnPublished: func(p walrelay.Published) {
			byA.Add(int64(len(p.Messages)))
			logMu.Lock()
			for _, m := range p.Messages {
				trace = append(trace, "A "+m.Subject+" "+string(m.Data))
			}
			logMu.Unlock()
		}})
	waitLog(t, logA, "streaming", 20*time.Second)

	logB := make(chan string, 64)
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, Logger: slog.New(logWatch{logB}),
		RetryMin: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond,
		OnPublished: func(p walrelay.Published) {
			byB.Add(int64(len(p.Messages)))
			logMu.Lock()
			for _, m := range p.Messages {
				trace = append(trace, "B "+m.Subject+" "+string(m.Data))
			}
			logMu.Unlock()
		}})
	waitLog(t, logB, "standing by", 20*time.Second)

	want := d.writeNumbered(t, subs, 0, 20, 4)
	c.waitCount(t, len(want), 20*time.Second)
	waitConfirmed(t, d) // A confirmed what it published
	if byA.Load() != int64(len(want)) || byB.Load() != 0 {
		t.Fatalf("published by A %d, by B %d; want all %d by A, the slot's holder", byA.Load(), byB.Load(), len(want))
	}

	a.stop(t)
	more := d.writeNumbered(t, subs, 20, 20, 4)
	want = append(want, more...)
	got := c.waitCount(t, len(want), 30*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, subs, 40)
	// The broker delivers a batch before its Publish call returns to the
	// relay: wait for B's confirmation, which follows its OnPublished.
	waitConfirmed(t, d)
	if byB.Load() != int64(len(more)) {
		t.Fatalf("B published %d messages after taking over, want %d (A: %d) %v", byB.Load(), len(more), byA.Load(), trace)
	}
}

// DropSlot removes the slot (so the server stops keeping WAL for it); Lag
// then reports ErrSlotNotFound, as does a second DropSlot.
func TestDropSlot_RemovesTheSlot(t *testing.T) {
	d := newTestDB(t)
	createSlotOnly(t, d)
	ctx := context.Background()
	if _, err := walrelay.SlotLag(ctx, d.url, d.slot); err != nil {
		t.Fatalf("lag of the new slot: %v", err)
	}
	if err := walrelay.DropSlot(ctx, d.url, d.slot); err != nil {
		t.Fatal(err)
	}
	if _, err := walrelay.SlotLag(ctx, d.url, d.slot); !errors.Is(err, walrelay.ErrSlotNotFound) {
		t.Fatalf("lag after drop: got %v, want ErrSlotNotFound", err)
	}
	if err := walrelay.DropSlot(ctx, d.url, d.slot); !errors.Is(err, walrelay.ErrSlotNotFound) {
		t.Fatalf("second drop: got %v, want ErrSlotNotFound", err)
	}
}

// waitCond waits until cond holds, polling it.
func waitCond(t testing.TB, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v", timeout)
		}
		<-tick.C
	}
}

// waitConfirmed waits until the slot's confirmed position has reached the
// server's current WAL position as of the call: every commit so far is
// published and confirmed.
func waitConfirmed(t testing.TB, d testDB) {
	t.Helper()
	ctx := context.Background()
	var target string
	if err := d.db.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&target); err != nil {
		t.Fatal(err)
	}
	waitCond(t, 20*time.Second, func() bool {
		var ok bool
		err := d.db.QueryRow(ctx, "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
			target, d.slot).Scan(&ok)
		return err == nil && ok
	})
}
