package outbox_test

import (
	"context"
	"encoding/json"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// The process fault tests: a service process commits messages, then dies
// by SIGKILL at a point of the relay's work; a fresh relay in this process
// takes over once the dead relay's leases expire. The consumer applies each
// message's effect once (deduplicating by message id in its own database)
// and records the order per subject.

func TestRelay_NoMessageLostWhenKilledBetweenCommitAndPublish(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) { testKilledRelay(t, kind, "before-publish") })
	}
}

func TestRelay_OneEffectWhenKilledBetweenPublishAndMarkDelivered(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) { testKilledRelay(t, kind, "after-publish") })
	}
}

func testKilledRelay(t *testing.T, kind, point string) {
	const nSubjects, perSubject = 5, 20
	const n = nSubjects * perSubject
	db, url := openDB(t, kind)
	b := startNATS(t, t.TempDir(), "127.0.0.1:0")
	c := newConsumer(t)
	c.subscribe(t, b, "shop.orders")

	runKilledChild(t, point, url, b.ClientURL(), "shop.orders", nSubjects, perSubject)

	// The child committed everything and marked nothing delivered.
	if p := pendingRows(t, db); p != n {
		t.Fatalf("%d rows pending after the kill, want %d", p, n)
	}
	if point == "after-publish" {
		// The broker holds every message already.
		c.waitEffects(t, n, 20*time.Second)
	}

	r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, LeaseTTL: childLeaseTTL})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)
	waitFor(t, 20*time.Second, "every row delivered by the fresh relay", func() bool { return pendingRows(t, db) == 0 })
	c.waitEffects(t, n, 20*time.Second)
	deliveries := c.checkExactlyOnceInOrder(t, subjects(nSubjects), perSubject)
	// The re-published batch carries the same ids, which the broker drops
	// within its dedup window: the consumer is not even asked twice.
	if deliveries != n {
		t.Errorf("%d deliveries for %d messages: the broker's dedup did not absorb the re-publish", deliveries, n)
	}
}

// countingPublisher counts failed Publish calls of the publisher it wraps.
type countingPublisher struct {
	next     broker.Publisher
	failures atomic.Int64
	failed   chan struct{}
}

func (p *countingPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	err := p.next.Publish(ctx, topic, msgs...)
	if err != nil {
		p.failures.Add(1)
		select {
		case p.failed <- struct{}{}:
		default:
		}
	}
	return err
}

func TestRelay_DeliversEverythingOnceInOrderAfterTheBrokerComesBack(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			const nSubjects, perSubject = 4, 25
			subs := subjects(nSubjects)
			db, _ := openDB(t, kind)
			dir := t.TempDir()
			ctx := context.Background()

			// A NATS server on a TCP port; the relay's client reconnects to
			// it when it comes back.
			srv, err := natsjs.New(ctx, natsjs.Config{DataDir: dir, ListenAddr: "127.0.0.1:0"})
			if err != nil {
				t.Fatal(err)
			}
			addr := srv.ClientURL()
			client, err := natsjs.New(ctx, natsjs.Config{URL: addr, PublishTimeout: 500 * time.Millisecond})
			if err != nil {
				srv.Close()
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Close() })
			pub := &countingPublisher{next: client, failed: make(chan struct{}, 1)}
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, LeaseTTL: 2 * time.Second, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)

			// First half while the broker is up.
			writeOrderedRange(t, db, "shop.orders", subs, 0, perSubject/2, 10)
			waitFor(t, 20*time.Second, "first half delivered", func() bool { return pendingRows(t, db) == 0 })

			// The broker goes down; the second half is committed meanwhile.
			if err := srv.Close(); err != nil {
				t.Fatal(err)
			}
			writeOrderedRange(t, db, "shop.orders", subs, perSubject/2, perSubject, 10)
			for range 3 { // the relay keeps failing, and keeps the rows
				select {
				case <-pub.failed:
				case <-time.After(20 * time.Second):
					t.Fatal("the relay did not try to publish while the broker was down")
				}
			}
			if p := pendingRows(t, db); p != len(subs)*(perSubject-perSubject/2) {
				t.Fatalf("%d rows pending while the broker is down, want %d", p, len(subs)*(perSubject-perSubject/2))
			}

			// The broker comes back on the same address and files.
			host := addr[len("nats://"):]
			srv2 := restartNATS(t, dir, host)
			waitFor(t, 30*time.Second, "every row delivered after the broker came back", func() bool { return pendingRows(t, db) == 0 })

			c := newConsumer(t)
			c.subscribe(t, srv2, "shop.orders")
			c.waitEffects(t, nSubjects*perSubject, 20*time.Second)
			deliveries := c.checkExactlyOnceInOrder(t, subs, perSubject)
			t.Logf("%d publish failures during the outage; %d deliveries for %d messages", pub.failures.Load(), deliveries, nSubjects*perSubject)
		})
	}
}

// restartNATS starts the embedded server again on its old address and data
// directory, retrying while the old listener's port is being released.
func restartNATS(t *testing.T, dir, hostport string) *natsjs.Broker {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		b, err := natsjs.New(ctx, natsjs.Config{DataDir: dir, ListenAddr: hostport})
		cancel()
		if err == nil {
			t.Cleanup(func() { b.Close() })
			return b
		}
		if time.Now().After(deadline) {
			t.Fatalf("restart NATS on %s: %v", hostport, err)
		}
	}
}

func TestRelay_TwoInstancesShareThePartitionsAndFailOverWithoutLossOrReorder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			const nSubjects, perSubject = 20, 40
			subs := subjects(nSubjects)
			db1, url := openDB(t, kind)
			db2, err := sqldb.Open(context.Background(), url, nil) // as if another process
			if err != nil {
				t.Fatal(err)
			}
			defer db2.Close()
			b := startNATS(t, t.TempDir(), "")
			c := newConsumer(t)
			c.subscribe(t, b, "shop.orders")

			cfg := outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, LeaseTTL: 300 * time.Millisecond, BatchSize: 20}
			cfg.Owner = "relay-1"
			r1, err := outbox.NewRelay(db1, b, cfg)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Owner = "relay-2"
			r2, err := outbox.NewRelay(db2, b, cfg)
			if err != nil {
				t.Fatal(err)
			}
			stop1 := runRelay(t, r1)
			runRelay(t, r2)
			waitFor(t, 10*time.Second, "both relays hold disjoint halves of the partitions", func() bool {
				p1, p2 := r1.OwnedPartitions(), r2.OwnedPartitions()
				for _, p := range p1 {
					if slices.Contains(p2, p) {
						t.Fatalf("partition %d held by both relays: %v and %v", p, p1, p2)
					}
				}
				return len(p1) == outbox.Partitions/2 && len(p2) == outbox.Partitions/2
			})

			writeOrderedRange(t, db1, "shop.orders", subs, 0, perSubject/2, 10)
			c.waitEffects(t, nSubjects*perSubject/4, 20*time.Second)
			// relay-1 stops while its rows are in flight; relay-2 takes its
			// partitions over.
			stop1()
			writeOrderedRange(t, db1, "shop.orders", subs, perSubject/2, perSubject, 10)
			waitFor(t, 20*time.Second, "every row delivered", func() bool { return pendingRows(t, db1) == 0 })
			if got := r2.OwnedPartitions(); len(got) != outbox.Partitions {
				t.Errorf("relay-2 holds %v after relay-1 stopped, want all", got)
			}
			c.waitEffects(t, nSubjects*perSubject, 20*time.Second)
			deliveries := c.checkExactlyOnceInOrder(t, subs, perSubject)
			if deliveries != nSubjects*perSubject {
				t.Errorf("%d deliveries for %d messages", deliveries, nSubjects*perSubject)
			}
		})
	}
}

// TestRelayAndInbox_OneEffectPerMessageWhenKilledBetweenPublishAndMarkDelivered
// runs the whole chain: a service process commits messages and is killed
// after the broker acknowledged them but before its relay marked them
// delivered; a fresh relay publishes them again; the consuming service
// handles them through the inbox, its effects written in the inbox's
// transaction with no dedup of their own.
func TestRelayAndInbox_OneEffectPerMessageWhenKilledBetweenPublishAndMarkDelivered(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			const nSubjects, perSubject = 5, 20
			const n = nSubjects * perSubject
			ctx := context.Background()
			db, url := openDB(t, kind)
			consumerDB, _ := openDB(t, kind)
			if err := inbox.Migrate(ctx, consumerDB); err != nil {
				t.Fatal(err)
			}
			ddl := "CREATE TABLE effects (k INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, subject TEXT NOT NULL, n INTEGER NOT NULL)"
			if kind == "postgres" {
				ddl = "CREATE TABLE effects (k BIGSERIAL PRIMARY KEY, id TEXT NOT NULL, subject TEXT NOT NULL, n INTEGER NOT NULL)"
			}
			if _, err := consumerDB.Exec(ctx, ddl); err != nil {
				t.Fatal(err)
			}
			ib, err := inbox.New(consumerDB, inbox.Config{})
			if err != nil {
				t.Fatal(err)
			}
			b := startNATS(t, t.TempDir(), "127.0.0.1:0")
			subCtx, cancel := context.WithCancel(ctx)
			sub, err := b.Subscribe(subCtx, broker.SubscribeConfig{Topic: "shop.orders", Group: "effects"}, ib.Handler("effects",
				func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
					var body struct{ N int }
					if err := json.Unmarshal(m.Data, &body); err != nil {
						return inbox.Permanent(err)
					}
					_, err := tx.Exec(ctx, "INSERT INTO effects (id, subject, n) VALUES ($1, $2, $3)", m.ID, m.Subject, body.N)
					return err
				}))
			if err != nil {
				cancel()
				t.Fatal(err)
			}
			defer func() {
				cancel()
				sub.Stop(ctx)
			}()

			runKilledChild(t, "after-publish", url, b.ClientURL(), "shop.orders", nSubjects, perSubject)
			if p := pendingRows(t, db); p != n {
				t.Fatalf("%d rows pending after the kill, want %d", p, n)
			}
			r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, LeaseTTL: childLeaseTTL})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			waitFor(t, 20*time.Second, "every row delivered by the fresh relay", func() bool { return pendingRows(t, db) == 0 })
			count := func(q string) int {
				var c int
				if err := consumerDB.QueryRow(ctx, q).Scan(&c); err != nil {
					t.Fatal(err)
				}
				return c
			}
			waitFor(t, 20*time.Second, "every message handled", func() bool { return count("SELECT count(*) FROM effects") >= n })
			if got, distinct := count("SELECT count(*) FROM effects"), count("SELECT count(DISTINCT id) FROM effects"); got != n || distinct != n {
				t.Fatalf("%d effects for %d distinct messages, want %d of each", got, distinct, n)
			}
			rows, err := consumerDB.Query(ctx, "SELECT subject, n FROM effects ORDER BY k")
			if err != nil {
				t.Fatal(err)
			}
			next := map[string]int{}
			for rows.Next() {
				var s string
				var i int
				if err := rows.Scan(&s, &i); err != nil {
					t.Fatal(err)
				}
				if i != next[s] {
					t.Errorf("subject %s: effect %d after %d", s, i, next[s]-1)
				}
				next[s] = i + 1
			}
			if err := rows.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
