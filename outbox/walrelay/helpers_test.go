package walrelay_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/outbox/walrelay"
	"github.com/troupedev/troupe/sqldb"
)

const topic = "walrelay.test"

// testDB is a fresh database with the outbox table, and a slot name unique in
// the cluster, dropped (so that the database can be) when the test ends.
type testDB struct {
	url  string
	db   *sqldb.DB
	slot string
}

func newTestDB(t testing.TB) testDB {
	t.Helper()
	u := pgtest.URL(t)
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	// Slots are cluster-wide: name the slot after the test's database.
	slot := strings.TrimPrefix(pu.Path, "/")
	ctx := context.Background()
	db, err := sqldb.Open(ctx, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := outbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-registered first: the slot goes before the database.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := walrelay.DropSlot(ctx, u, slot); err != nil && !errors.Is(err, walrelay.ErrSlotNotFound) {
			t.Errorf("drop slot: %v", err)
		}
	})
	return testDB{url: u, db: db, slot: slot}
}

// payload is the data of a test message: its subject's sequence number.
type payload struct {
	N int `json:"n"`
}

func newMsg(subject string, n int) *message.Message {
	data, _ := json.Marshal(payload{N: n})
	return &message.Message{
		ID: message.NewID(), Source: "/test/walrelay", Type: "test.numbered",
		Subject: subject, DataContentType: "application/json", Data: data,
	}
}

// write commits msgs to the outbox in one transaction.
func (d testDB) write(t testing.TB, msgs ...*message.Message) {
	t.Helper()
	err := d.db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, topic, msgs...)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// writeNumbered commits perSubject messages for each subject, txSize per
// transaction, numbering each subject's messages from first, and returns
// them in commit order.
func (d testDB) writeNumbered(t testing.TB, subjects []string, first, perSubject, txSize int) []*message.Message {
	t.Helper()
	var all, batch []*message.Message
	for i := first; i < first+perSubject; i++ {
		for _, s := range subjects {
			batch = append(batch, newMsg(s, i))
			if len(batch) == txSize {
				d.write(t, batch...)
				all, batch = append(all, batch...), nil
			}
		}
	}
	if len(batch) > 0 {
		d.write(t, batch...)
		all = append(all, batch...)
	}
	return all
}

// undelivered counts the outbox rows not marked delivered.
func (d testDB) undelivered(t testing.TB) int {
	t.Helper()
	var n int
	if err := d.db.QueryRow(context.Background(), "SELECT count(*) FROM troupe_outbox WHERE delivered_at IS NULL").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func startNATS(t testing.TB, dir, listen string) *natsjs.Broker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: dir, ListenAddr: listen})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// collector is a consumer group that records every message it receives.
type collector struct {
	mu   sync.Mutex
	msgs []*message.Message
	more chan struct{}
}

func collect(t testing.TB, sub broker.Subscriber) *collector {
	t.Helper()
	c := &collector{more: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := sub.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "check", MaxBatch: 500},
		func(_ context.Context, batch []*broker.Delivery) {
			c.mu.Lock()
			for _, d := range batch {
				c.msgs = append(c.msgs, d.Msg)
				d.Ack()
			}
			c.mu.Unlock()
			select {
			case c.more <- struct{}{}:
			default:
			}
		})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = s.Stop(context.Background())
	})
	return c
}

// waitCount waits until the collector has at least n messages and returns
// them.
func (c *collector) waitCount(t testing.TB, n int, timeout time.Duration) []*message.Message {
	t.Helper()
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		got := append([]*message.Message(nil), c.msgs...)
		c.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-c.more:
		case <-deadline:
			t.Fatalf("received %d of %d messages within %v", len(got), n, timeout)
		}
	}
}

func (c *collector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.msgs)
}

// sameIDs fails t unless got holds exactly want's messages, in want's order.
func sameIDs(t testing.TB, got, want []*message.Message) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("received %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].ID != want[i].ID {
			t.Fatalf("message %d: got %s (subject %s %s), want %s (subject %s %s)",
				i, got[i].ID, got[i].Subject, got[i].Data, want[i].ID, want[i].Subject, want[i].Data)
		}
	}
}

// perSubjectInOrder fails t unless each subject's messages in got are
// numbered 0, 1, 2... with none missing or repeated, n per subject.
func perSubjectInOrder(t testing.TB, got []*message.Message, subjects []string, n int) {
	t.Helper()
	next := map[string]int{}
	for _, m := range got {
		var p payload
		if err := json.Unmarshal(m.Data, &p); err != nil {
			t.Fatal(err)
		}
		if p.N != next[m.Subject] {
			t.Fatalf("subject %s: got message %d, want %d", m.Subject, p.N, next[m.Subject])
		}
		next[m.Subject]++
	}
	for _, s := range subjects {
		if next[s] != n {
			t.Fatalf("subject %s: received %d messages, want %d", s, next[s], n)
		}
	}
}

// running is a relay running in the background.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func startRelay(t testing.TB, cfg walrelay.Config) *running {
	t.Helper()
	r, err := walrelay.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rr := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { rr.done <- r.Run(ctx) }()
	t.Cleanup(func() { rr.stop(t) })
	return rr
}

// stop cancels the relay and waits for Run to return; it fails t if Run
// returned an error.
func (rr *running) stop(t testing.TB) {
	t.Helper()
	rr.cancel()
	select {
	case err, ok := <-rr.done:
		if ok && err != nil {
			t.Errorf("Run: %v", err)
		}
		if ok {
			close(rr.done)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return within 20s of its context ending")
	}
}

// waitLag waits until the slot's lag is at most limit bytes.
func waitLag(t testing.TB, d testDB, limit int64, timeout time.Duration) int64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var lag int64
	for time.Now().Before(deadline) {
		var err error
		lag, err = walrelay.SlotLag(context.Background(), d.url, d.slot)
		if err == nil && lag <= limit {
			return lag
		}
		<-tick.C
	}
	t.Fatalf("slot lag still %d bytes after %v, want at most %d", lag, timeout, limit)
	return 0
}

// logWatch is a slog handler that passes each record's message to a channel.
type logWatch struct{ ch chan string }

func (h logWatch) Enabled(context.Context, slog.Level) bool { return true }
func (h logWatch) Handle(_ context.Context, r slog.Record) error {
	select {
	case h.ch <- r.Message:
	default:
	}
	return nil
}
func (h logWatch) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h logWatch) WithGroup(string) slog.Handler      { return h }

// waitLog waits for a log message containing s.
func waitLog(t testing.TB, ch <-chan string, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m := <-ch:
			if strings.Contains(m, s) {
				return
			}
		case <-deadline:
			t.Fatalf("no log message containing %q within %v", s, timeout)
		}
	}
}

func subjects(n int) []string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprintf("order-%d", i)
	}
	return s
}

func addTx(ctx context.Context, tx sqldb.Tx, msgs ...*message.Message) error {
	return outbox.Add(ctx, tx, topic, msgs...)
}
