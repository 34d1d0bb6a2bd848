package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/outbox/walrelay"
	"github.com/troupedev/troupe/sqldb"
)

// Outbox returns the outbox benchmark: Concurrency writers commit
// transactions of Batch messages with outbox.Add, and a relay (Config.Mode:
// poll, notify or wal) publishes them to the broker.
//
// With --rate the writers are paced and the relay runs alongside them: the
// latency is from each transaction's commit (as the writer saw it return) to
// the broker's acknowledgement of its messages, and the throughput is the
// offered rate the relay kept up with. Without --rate the writers first fill
// the outbox for Duration with no relay running, then the relay drains the
// backlog: the throughput is the relay's own (messages published and marked
// delivered per second).
func Outbox() Benchmark {
	return Benchmark{
		Name:    "outbox",
		Summary: "outbox relay: writers commit messages with outbox.Add, a relay publishes them (--mode poll|notify|wal; --rate for commit-to-publish latency, none for relay throughput)",
		Run:     runOutbox,
	}
}

// publishTracker pairs each message's commit time with its broker ack and
// records the difference, whichever of the two is seen first.
type publishTracker struct {
	rec *Recorder

	mu        sync.Mutex
	committed map[string]time.Time
	acked     map[string]time.Time
	matched   atomic.Int64
	changed   chan struct{}
}

func newPublishTracker(rec *Recorder) *publishTracker {
	return &publishTracker{rec: rec, committed: map[string]time.Time{}, acked: map[string]time.Time{}, changed: make(chan struct{}, 1)}
}

func (t *publishTracker) commit(msgs []*message.Message, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, m := range msgs {
		if a, ok := t.acked[m.ID]; ok {
			delete(t.acked, m.ID)
			t.rec.Observe(max(0, a.Sub(at)))
			t.matched.Add(1)
			continue
		}
		t.committed[m.ID] = at
	}
}

func (t *publishTracker) ack(msgs []*message.Message, at time.Time) {
	t.mu.Lock()
	for _, m := range msgs {
		if c, ok := t.committed[m.ID]; ok {
			delete(t.committed, m.ID)
			t.rec.Observe(at.Sub(c))
			t.matched.Add(1)
			continue
		}
		if _, dup := t.acked[m.ID]; !dup {
			t.acked[m.ID] = at
		}
	}
	t.mu.Unlock()
	select {
	case t.changed <- struct{}{}:
	default:
	}
}

// trackingPublisher tells the tracker when the broker acknowledged a batch.
type trackingPublisher struct {
	next broker.Publisher
	t    *publishTracker
}

func (p *trackingPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	err := p.next.Publish(ctx, topic, msgs...)
	now := time.Now()
	var pe *broker.PublishError
	switch {
	case err == nil:
		p.t.ack(msgs, now)
	case errors.As(err, &pe):
		ok := make([]*message.Message, 0, len(msgs))
		for i, m := range msgs {
			if pe.Failed[i] == nil {
				ok = append(ok, m)
			}
		}
		p.t.ack(ok, now)
	}
	return err
}

// benchRelay is a running relay of any mode.
type benchRelay struct {
	notify func() // wakes an in-process relay; nil when it cannot be woken
	stop   func() error
}

func runOutbox(ctx context.Context, cfg Config) (*Result, error) {
	mode := cfg.Mode
	if mode == "" {
		mode = "notify"
	}
	switch mode {
	case "poll", "notify":
	case "wal":
		if cfg.DB != "postgres" {
			return nil, errors.New("--mode wal needs --db postgres (it tails PostgreSQL's write-ahead log)")
		}
	default:
		return nil, fmt.Errorf("--mode %q: want poll, notify or wal", mode)
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
	db := bdb.db
	if err := outbox.Migrate(ctx, db); err != nil {
		return nil, err
	}
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	defer ob.Close()

	var rec Recorder
	tr := newPublishTracker(&rec)
	pub := &trackingPublisher{next: ob.Broker, t: tr}
	topic := fmt.Sprintf("bench.outbox.%d", time.Now().UnixNano())
	slot := fmt.Sprintf("troupe_bench_%d", time.Now().UnixNano())
	start := func() (*benchRelay, error) { return startBenchRelay(ctx, mode, db, pub, slot) }
	if mode == "wal" {
		defer func() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			walrelay.DropSlot(dctx, db.Pool().Config().ConnString(), slot)
		}()
	}

	paced := cfg.Rate > 0
	fmt.Fprintf(cfg.Progress, "bench outbox: %s; %s; relay mode %s; %d writers, %d messages per transaction, for %s\n",
		bdb.description, ob.Description, mode, cfg.Concurrency, cfg.Batch, cfg.Duration)

	var relay *benchRelay
	if paced || mode == "wal" {
		// The WAL relay must create its slot before the writes it is to
		// read; unpaced, it then stops until the backlog is written.
		if relay, err = start(); err != nil {
			return nil, err
		}
		if mode == "wal" {
			if err := waitSlot(ctx, db, slot); err != nil {
				relay.stop()
				return nil, err
			}
			if !paced {
				if err := relay.stop(); err != nil {
					return nil, err
				}
				relay = nil
			}
		}
	}
	stopRelay := func() error {
		if relay == nil {
			return nil
		}
		err := relay.stop()
		relay = nil
		return err
	}
	defer stopRelay()

	// Writers.
	var written atomic.Int64
	wake := func() {}
	if paced && mode == "notify" && db.Dialect() == sqldb.SQLite && relay.notify != nil {
		wake = relay.notify // same process: the in-process wake
	}
	wstart := time.Now()
	runPaced(ctx, cfg, wstart, &rec, func(w int) func(time.Time) {
		n := 0
		return func(time.Time) {
			msgs := make([]*message.Message, cfg.Batch)
			for i := range msgs {
				m := message.New("/bench/outbox", "troupe.bench.outbox", []byte(`{"amount":1}`))
				m.Subject = fmt.Sprintf("w%d-%d", w, n%64)
				m.DataContentType = "application/json"
				msgs[i] = m
				n++
			}
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return outbox.Add(ctx, tx, topic, msgs...)
			})
			if err != nil {
				for range msgs {
					rec.Error()
				}
				return
			}
			tr.commit(msgs, time.Now())
			written.Add(int64(len(msgs)))
			wake()
		}
	})
	writeElapsed := time.Since(wstart)

	// Drain: with --rate the relay is already running; without, it starts
	// now against the backlog.
	measureFrom := wstart
	if !paced {
		measureFrom = time.Now()
		if relay, err = start(); err != nil {
			return nil, err
		}
	}
	if err := waitMatched(ctx, tr, written.Load(), 2*time.Minute); err != nil {
		return nil, err
	}
	elapsed := time.Since(measureFrom)
	if err := stopRelay(); err != nil {
		return nil, err
	}

	res := &Result{Unit: "message"}
	if paced {
		res.Latency = "commit (the writer's InTx returned) to the broker's acknowledgement of the relay's publish, per message"
	} else {
		res.Latency = "commit to broker acknowledgement, including the time in the backlog (unpaced: read the throughput, and use --rate for latency)"
	}
	rec.Fill(res, elapsed)
	res.Notes = append(res.Notes,
		"relay mode: "+mode+relayModeNote(mode, db.Dialect(), paced),
		"db: "+bdb.description,
		"broker: "+ob.Description,
		fmt.Sprintf("writers: %d messages committed in %.2fs (%.0f/s), %d per transaction", written.Load(), writeElapsed.Seconds(), float64(written.Load())/writeElapsed.Seconds(), cfg.Batch),
	)
	if paced {
		res.Notes = append(res.Notes, "throughput: messages acknowledged by the broker from the writers' start until the relay had published all of them")
	} else {
		res.Notes = append(res.Notes, fmt.Sprintf("throughput: the relay draining a backlog of %d messages, from its start to the last broker ack", written.Load()))
	}
	if res.Ops == 0 {
		return nil, errors.New("no message was published")
	}
	return res, nil
}

func relayModeNote(mode string, d sqldb.Dialect, paced bool) string {
	switch {
	case mode == "poll":
		return fmt.Sprintf(" (polling every %s; writers do not wake it)", outbox.DefaultPollIntervalPoll)
	case mode == "notify" && d == sqldb.Postgres:
		return " (LISTEN/NOTIFY: a trigger NOTIFYs at commit; polling every 1s as fallback)"
	case mode == "notify" && paced:
		return " (SQLite: the writers wake the relay in-process with Relay.Notify after each commit)"
	case mode == "notify":
		return " (SQLite: in-process wake)"
	}
	return " (logical replication from a slot made for this run, dropped afterwards)"
}

func startBenchRelay(ctx context.Context, mode string, db *sqldb.DB, pub broker.Publisher, slot string) (*benchRelay, error) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	br := &benchRelay{stop: func() error { cancel(); return <-done }}
	switch mode {
	case "wal":
		r, err := walrelay.New(walrelay.Config{URL: db.Pool().Config().ConnString(), Publisher: pub, SlotName: slot})
		if err != nil {
			cancel()
			return nil, err
		}
		go func() { done <- r.Run(ctx) }()
	default:
		m, err := outbox.ParseMode(mode)
		if err != nil {
			cancel()
			return nil, err
		}
		r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: m})
		if err != nil {
			cancel()
			return nil, err
		}
		br.notify = r.Notify
		go func() { done <- r.Run(ctx) }()
	}
	return br, nil
}

// waitSlot waits until the WAL relay has created its replication slot.
func waitSlot(ctx context.Context, db *sqldb.DB, slot string) error {
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var n int
		if err := db.QueryRow(ctx, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&n); err != nil {
			return err
		}
		if n == 1 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the WAL relay did not create slot %s within 30s", slot)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// waitMatched waits until n committed messages have been acknowledged.
func waitMatched(ctx context.Context, tr *publishTracker, n int64, timeout time.Duration) error {
	wait := time.NewTimer(timeout)
	defer wait.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for tr.matched.Load() < n {
		select {
		case <-tr.changed:
		case <-tick.C:
		case <-wait.C:
			return fmt.Errorf("the relay published %d of %d committed messages within %s of the writers' end", tr.matched.Load(), n, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
