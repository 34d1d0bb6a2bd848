package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

func newNATS(t *testing.T) *natsjs.Broker {
	t.Helper()
	b, err := natsjs.New(context.Background(), natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// subscribe subscribes h and returns a func that stops the subscription,
// which is also stopped when t ends.
func subscribe(t *testing.T, b broker.Subscriber, cfg broker.SubscribeConfig, h broker.Handler) (stop func()) {
	t.Helper()
	sub, err := b.Subscribe(context.Background(), cfg, h)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := sub.Stop(ctx); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// collector gathers the messages of a topic, such as a dead-letter topic.
type collector struct {
	mu   sync.Mutex
	msgs map[string]*message.Message
}

func (c *collector) handle(_ context.Context, batch []*broker.Delivery) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range batch {
		c.msgs[d.Msg.ID] = d.Msg
		d.Ack()
	}
}

func (c *collector) get(id string) *message.Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.msgs[id]
}

func TestHandler_WithNATS_PoisonRetriesAndLostAcksEachHaveTheirOneOutcome(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		b := newNATS(t)
		const topic, group = "shop.orders", "billing"

		msgs := newMessages(50)
		poison, flaky, lostAck, hopeless := msgs[10], msgs[20], msgs[30], msgs[40]

		// calls counts the batches in which the handler ran for each message:
		// it may run twice in one batch, when another message failed.
		type batchKey struct{}
		var mu sync.Mutex
		calls := map[string]int{}
		lastBatch := map[string]any{}
		ib := newInbox(t, db.DB, inbox.Config{Backoff: inbox.ExponentialBackoff{Min: 5 * time.Millisecond, Max: 20 * time.Millisecond}.Delay})
		h := ib.Handler(group, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			mu.Lock()
			if b := ctx.Value(batchKey{}); lastBatch[m.ID] != b {
				lastBatch[m.ID] = b
				calls[m.ID]++
			}
			n := calls[m.ID]
			mu.Unlock()
			if err := applyEffect(ctx, tx, group, m); err != nil {
				return err
			}
			switch m.ID {
			case poison.ID:
				return inbox.Permanent(errors.New("order total is negative"))
			case flaky.ID:
				if n < 3 {
					return errors.New("payment service unavailable")
				}
			case hopeless.ID:
				return errors.New("tax service unavailable")
			}
			return nil
		})
		// The ack of lostAck's first delivery is lost after the commit,
		// as when the process dies between commit and ack.
		var lostAckSeen []string // attempt and settlement of each delivery of lostAck
		duplicateAcked := func() bool {
			mu.Lock()
			defer mu.Unlock()
			return slices.Contains(lostAckSeen, "2 acked")
		}
		wrapped := func(ctx context.Context, batch []*broker.Delivery) {
			h(context.WithValue(ctx, batchKey{}, new(int)), batch)
			for _, d := range batch {
				if d.Msg.ID != lostAck.ID {
					continue
				}
				s, _, reason := d.Settlement()
				mu.Lock()
				lostAckSeen = append(lostAckSeen, strings.TrimSpace(fmt.Sprint(d.Attempt, " ", s, " ", reason)))
				mu.Unlock()
				if d.Attempt == 1 && s == broker.Acked {
					d.Nak(time.Millisecond)
				}
			}
		}
		dlq := &collector{msgs: map[string]*message.Message{}}
		subscribe(t, b, broker.SubscribeConfig{Topic: topic + ".dlq", Group: "ops"}, dlq.handle)
		subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 50, MaxDeliver: 3}, wrapped)
		if err := b.Publish(ctx, topic, msgs...); err != nil {
			t.Fatal(err)
		}

		waitFor(t, "48 effects, and both dead letters", func() bool {
			return len(effects(t, db.DB)) == 48 && dlq.get(poison.ID) != nil && dlq.get(hopeless.ID) != nil
		})
		waitFor(t, "the redelivery of the message whose ack was lost to be acked", func() bool {
			return duplicateAcked()
		})
		mu.Lock()
		if !slices.Equal(lostAckSeen, []string{"1 acked", "2 acked"}) {
			t.Errorf("deliveries of the message whose ack was lost: %q, want [1 acked, 2 acked]", lostAckSeen)
		}
		mu.Unlock()

		got := effects(t, db.DB)
		for _, m := range msgs {
			want := 1
			if m == poison || m == hopeless {
				want = 0
			}
			if got[m.ID] != want {
				t.Errorf("message %s has %d effects, want %d", m.ID, got[m.ID], want)
			}
		}
		mu.Lock()
		if calls[flaky.ID] != 3 || calls[lostAck.ID] != 1 || calls[poison.ID] != 1 || calls[hopeless.ID] != 3 {
			t.Errorf("handler calls: flaky %d, lost ack %d, poison %d, hopeless %d; want 3, 1, 1, 3",
				calls[flaky.ID], calls[lostAck.ID], calls[poison.ID], calls[hopeless.ID])
		}
		mu.Unlock()

		dl := dlq.get(poison.ID)
		if r := dl.Extensions[broker.ExtDeadLetterReason]; !strings.Contains(r, "order total is negative") {
			t.Errorf("poison dead letter reason %q lacks the handler's error", r)
		}
		if a := dl.Extensions[broker.ExtDeadLetterAttempts]; a != "1" {
			t.Errorf("poison dead letter attempts %q, want 1", a)
		}
		// Past MaxDeliver the broker dead-letters (Config.MaxAttempts unset).
		dl = dlq.get(hopeless.ID)
		if a := dl.Extensions[broker.ExtDeadLetterAttempts]; a != "3" {
			t.Errorf("hopeless dead letter attempts %q, want 3", a)
		}
		if r := dl.Extensions[broker.ExtDeadLetterReason]; r == "" {
			t.Error("hopeless dead letter has no reason")
		}
	})
}

func TestHandler_WithNATS_SameMessageOnTwoSubscriptionsAtOnceHasOneEffect(t *testing.T) {
	// The same message reaches the consumer group through two
	// subscriptions at once, here on two topics (a message routed twice,
	// or re-published after the broker's dedup window), each with its own
	// Inbox and connections, as two instances of the service would.
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		b := newNATS(t)
		const group = "billing"
		m := newMessages(1)[0]

		var mu sync.Mutex
		calls := 0
		inTx, release := make(chan struct{}), make(chan struct{})
		secondDelivered := make(chan struct{})
		member := func(delivered chan struct{}) broker.Handler {
			ib := newInbox(t, open(t, db.url), inbox.Config{})
			h := ib.Handler(group, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
				mu.Lock()
				calls++
				first := calls == 1
				mu.Unlock()
				if err := applyEffect(ctx, tx, group, m); err != nil {
					return err
				}
				if first {
					close(inTx)
					<-release // inbox row written, transaction open
				}
				return nil
			})
			return func(ctx context.Context, batch []*broker.Delivery) {
				if delivered != nil {
					close(delivered)
				}
				h(ctx, batch)
			}
		}
		var settledMu sync.Mutex
		var settlements []broker.Settlement
		record := func(h broker.Handler) broker.Handler {
			return func(ctx context.Context, batch []*broker.Delivery) {
				h(ctx, batch)
				settledMu.Lock()
				defer settledMu.Unlock()
				for _, d := range batch {
					s, _, _ := d.Settlement()
					settlements = append(settlements, s)
				}
			}
		}
		stop1 := subscribe(t, b, broker.SubscribeConfig{Topic: "shop.orders", Group: group}, record(member(nil)))
		stop2 := subscribe(t, b, broker.SubscribeConfig{Topic: "shop.orders.replay", Group: group}, record(member(secondDelivered)))

		if err := b.Publish(ctx, "shop.orders", m); err != nil {
			t.Fatal(err)
		}
		<-inTx
		if err := b.Publish(ctx, "shop.orders.replay", m); err != nil {
			t.Fatal(err)
		}
		<-secondDelivered // the second member is in its handler call with the same message
		if db.Dialect() == sqldb.Postgres {
			waitFor(t, "the second member to wait for the first's row lock", func() bool {
				var waiting int
				if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity
					WHERE datname = current_database() AND wait_event_type = 'Lock'
					AND query LIKE 'INSERT INTO troupe_inbox%'`).Scan(&waiting); err != nil {
					t.Fatal(err)
				}
				return waiting == 1
			})
		}
		close(release)
		waitFor(t, "both deliveries to be settled", func() bool {
			settledMu.Lock()
			defer settledMu.Unlock()
			return len(settlements) == 2
		})
		stop1()
		stop2()
		for i, s := range settlements {
			if s != broker.Acked {
				t.Errorf("delivery %d settled %v, want acked", i, s)
			}
		}
		if got := effects(t, db.DB)[m.ID]; got != 1 {
			t.Errorf("%d effects, want 1", got)
		}
		mu.Lock()
		defer mu.Unlock()
		if calls != 1 {
			t.Errorf("handler called %d times, want 1", calls)
		}
	})
}
