package outbox_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// startNATS starts an embedded NATS JetStream broker keeping its files in
// dir. With listen, other processes can connect to it at ClientURL.
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

// writeOrdered commits perSubject messages for each of subjects to topic,
// txSize messages per transaction, numbering each subject's messages 0, 1,
// 2... in the order they are written. It returns how many it wrote.
func writeOrdered(t testing.TB, db *sqldb.DB, topic string, subjects []string, perSubject, txSize int) int {
	t.Helper()
	writeOrderedRange(t, db, topic, subjects, 0, perSubject, txSize)
	return perSubject * len(subjects)
}

// writeOrderedRange commits the messages numbered from..to-1 of each of
// subjects, txSize per transaction.
func writeOrderedRange(t testing.TB, db *sqldb.DB, topic string, subjects []string, from, to, txSize int) {
	t.Helper()
	ctx := context.Background()
	var batch []*message.Message
	flush := func() {
		if len(batch) == 0 {
			return
		}
		if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			return outbox.Add(ctx, tx, topic, batch...)
		}); err != nil {
			t.Fatal(err)
		}
		batch = nil
	}
	for i := from; i < to; i++ {
		for _, s := range subjects {
			batch = append(batch, newMsg(s, i))
			if len(batch) == txSize {
				flush()
			}
		}
	}
	flush()
}

func subjects(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("order-%d", i)
	}
	return out
}

// consumer is an idempotent consumer for the tests: it applies each message's
// effect once, deduplicating by message id in a table of its own database
// that commits with the effect, and records each subject's effects in the
// order they were applied.
type consumer struct {
	db *sqldb.DB

	mu         sync.Mutex
	deliveries int
	effects    int
	order      map[string][]int
	changed    chan struct{}
}

func newConsumer(t testing.TB) *consumer {
	t.Helper()
	ctx := context.Background()
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(t.TempDir(), "consumer.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := db.Exec(ctx, "CREATE TABLE effects (id TEXT PRIMARY KEY, subject TEXT NOT NULL, n INTEGER NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	return &consumer{db: db, order: map[string][]int{}, changed: make(chan struct{}, 1)}
}

// subscribe consumes topic as the group "effects", one member, so that the
// consumer sees each subject's messages in stream order.
func (c *consumer) subscribe(t testing.TB, sub broker.Subscriber, topic string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := sub.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "effects", MaxBatch: 200}, c.handle)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		s.Stop(context.Background())
	})
}

func (c *consumer) handle(ctx context.Context, batch []*broker.Delivery) {
	for _, d := range batch {
		var body struct{ N int }
		if err := json.Unmarshal(d.Msg.Data, &body); err != nil {
			d.DeadLetter(err.Error())
			continue
		}
		applied := false
		err := c.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			n, err := tx.Exec(ctx, "INSERT INTO effects (id, subject, n) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", d.Msg.ID, d.Msg.Subject, body.N)
			applied = n == 1
			return err
		})
		if err != nil {
			d.Nak(0)
			continue
		}
		c.mu.Lock()
		c.deliveries++
		if applied {
			c.effects++
			c.order[d.Msg.Subject] = append(c.order[d.Msg.Subject], body.N)
		}
		c.mu.Unlock()
		d.Ack()
	}
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// waitEffects waits until n distinct effects have been applied.
func (c *consumer) waitEffects(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		got := c.effects
		c.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-c.changed:
		case <-deadline.C:
			t.Fatalf("%d of %d effects applied within %s", got, n, timeout)
		}
	}
}

// checkExactlyOnceInOrder checks that each of subjects had exactly
// perSubject effects, numbered 0, 1, 2... in order, and returns the number
// of deliveries the broker made (at least the number of effects).
func (c *consumer) checkExactlyOnceInOrder(t testing.TB, subjects []string, perSubject int) int {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	var rows int
	if err := c.db.QueryRow(context.Background(), "SELECT count(*) FROM effects").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if rows != len(subjects)*perSubject || c.effects != rows {
		t.Errorf("%d effects recorded (%d applied), want %d", rows, c.effects, len(subjects)*perSubject)
	}
	for _, s := range subjects {
		got := c.order[s]
		ok := len(got) == perSubject
		for i := 0; ok && i < perSubject; i++ {
			ok = got[i] == i
		}
		if !ok {
			t.Errorf("subject %s: effects in order %v, want 0..%d in order", s, got, perSubject-1)
		}
	}
	return c.deliveries
}

// runRelay runs r until the test ends, failing the test if Run fails.
func runRelay(t testing.TB, r *outbox.Relay) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("relay %s: Run: %v", r.Owner(), err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// pendingRows counts the rows not yet delivered.
func pendingRows(t testing.TB, db *sqldb.DB) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), "SELECT count(*) FROM troupe_outbox WHERE delivered_at IS NULL").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
