// Package demo runs `troupe demo`: Troupe's parts working together on
// embedded defaults (SQLite files and an in-process NATS JetStream server),
// with faults injected along the way, printing what happens.
package demo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// Config configures the demo.
type Config struct {
	// DataDir keeps the demo's database and broker files. Default: a
	// temporary directory removed at the end.
	DataDir string
	// Orders is how many orders the demo places. Default 1000.
	Orders int
	// Out receives the demo's narration. Required.
	Out io.Writer
	// Timeout bounds each wait for the consumer. Default 30s.
	Timeout time.Duration
}

const (
	topic     = "shop.orders"
	eventType = "shop.order.placed"
	source    = "/services/order"
)

// order is the data of a shop.order.placed event.
type order struct {
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	TotalCents int64  `json:"total_cents"`
}

var viewMigrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_order_history",
	SQL: `CREATE TABLE order_history (
  event_id    TEXT PRIMARY KEY,
  order_id    TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  total_cents INTEGER NOT NULL
);`,
}}

// Run runs the demo and returns the first thing that did not go as the demo
// says it should.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Out == nil {
		return errors.New("demo: Out is required")
	}
	if cfg.Orders <= 0 {
		cfg.Orders = 1000
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	dir := cfg.DataDir
	if dir == "" {
		d, err := os.MkdirTemp("", "troupe-demo-*")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	d := &run{cfg: cfg, dir: dir, out: cfg.Out, applied: make(chan struct{}, 1)}
	return d.run(ctx)
}

type run struct {
	cfg Config
	dir string
	out io.Writer

	view *sqldb.DB
	ob   *brokeropen.Opened

	mu        sync.Mutex
	failedFor map[string]bool // event ids whose first attempt the demo fails
	applied   chan struct{}   // signalled after each committed batch
	dead      chan *message.Message
	delivered atomic.Int64 // deliveries to the view's handler
}

func (d *run) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

func (d *run) run(ctx context.Context) error {
	d.say("Troupe demo: an Order service publishes events, an order-history view consumes them.")
	d.say("Embedded defaults: SQLite and NATS JetStream in-process, files in %s\n", d.dir)

	var err error
	d.view, err = sqldb.Open(ctx, "sqlite://"+filepath.Join(d.dir, "order-history.db"), nil)
	if err != nil {
		return err
	}
	defer d.view.Close()
	if err := d.view.Migrate(ctx, "demo.order_history", viewMigrations); err != nil {
		return err
	}
	if err := d.openBroker(ctx); err != nil {
		return err
	}
	defer func() { d.ob.Close() }()

	// 1. Publish.
	t0 := time.Now()
	placed, err := d.placeOrders(ctx, cfgOrders(d.cfg), 100)
	if err != nil {
		return err
	}
	d.say("[1/5] placed %d orders: published %d %q events in batches of 100 (%s)", len(placed), len(placed), eventType, since(t0))

	// 2. Consume into the view.
	t0 = time.Now()
	sub, err := d.subscribeView(ctx)
	if err != nil {
		return err
	}
	if err := d.waitForRows(ctx, len(placed)); err != nil {
		return err
	}
	total, err := d.viewTotal(ctx)
	if err != nil {
		return err
	}
	d.say("[2/5] order-history view (SQLite): %d orders, %.2f in total, written one transaction per batch (%s)", len(placed), float64(total)/100, since(t0))

	// 3. Faults: a transient failure, a duplicate publish, a poison message.
	if err := d.faults(ctx, placed, len(placed)); err != nil {
		return err
	}

	// 4. Restart the broker on the same files.
	if err := sub.Stop(ctx); err != nil {
		return err
	}
	if err := d.ob.Close(); err != nil {
		return err
	}
	if err := d.openBroker(ctx); err != nil {
		return err
	}
	want := len(placed) + 1 + 1 // the orders, the flaky one, the poison one
	audit, deliveries, err := d.countTopic(ctx, "audit", want)
	if err != nil {
		return err
	}
	if audit != want || deliveries != want {
		return fmt.Errorf("after the restart a new group read %d distinct events in %d deliveries, want %d of each", audit, deliveries, want)
	}
	d.say("[4/5] restart: broker stopped and started on the same files; a new consumer group read all %d events from the start, each once: nothing lost, no duplicate stored", audit)

	// 5. The group's position survived: only new events reach the view.
	rows, err := d.viewRows(ctx)
	if err != nil {
		return err
	}
	before := d.delivered.Load()
	sub, err = d.subscribeView(ctx)
	if err != nil {
		return err
	}
	defer sub.Stop(context.WithoutCancel(ctx))
	more, err := d.placeOrders(ctx, 10, 10)
	if err != nil {
		return err
	}
	if err := d.waitForRows(ctx, rows+len(more)); err != nil {
		return err
	}
	if n := d.delivered.Load() - before; n != int64(len(more)) {
		return fmt.Errorf("after the restart the view's handler saw %d deliveries, want %d", n, len(more))
	}
	d.say("[5/5] the order-history group resumed where it stopped: %d new orders applied, none of the %d before delivered again", len(more), rows)
	d.say("\nDone. Sagas, the outbox and the reference shops arrive in later releases; see README.md.")
	return nil
}

func cfgOrders(c Config) int { return c.Orders }

func (d *run) openBroker(ctx context.Context) error {
	ob, err := brokeropen.Open(ctx, "nats", d.dir, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	d.ob = ob
	return nil
}

// placeOrders publishes n order events in batches and returns them.
func (d *run) placeOrders(ctx context.Context, n, batch int) ([]*message.Message, error) {
	all := make([]*message.Message, 0, n)
	for len(all) < n {
		msgs := make([]*message.Message, 0, batch)
		for i := 0; i < batch && len(all)+len(msgs) < n; i++ {
			k := len(all) + len(msgs)
			m, err := message.NewJSON(source, eventType, order{
				OrderID:    fmt.Sprintf("order-%s", message.NewID()[24:]),
				CustomerID: fmt.Sprintf("customer-%d", k%37),
				TotalCents: int64(1000 + (k*7919)%9000),
			})
			if err != nil {
				return nil, err
			}
			m.Subject = m.ID
			m.CorrelationID = m.ID
			msgs = append(msgs, m)
		}
		if err := d.ob.Broker.Publish(ctx, topic, msgs...); err != nil {
			return nil, err
		}
		all = append(all, msgs...)
	}
	return all, nil
}

// subscribeView consumes order events into the view: each batch in one
// transaction, its rows keyed by event id so a redelivered event changes
// nothing.
func (d *run) subscribeView(ctx context.Context) (broker.Subscription, error) {
	return d.ob.Broker.Subscribe(ctx, broker.SubscribeConfig{
		Topic: topic, Group: "order-history", MaxBatch: 100, NakDelay: 200 * time.Millisecond,
	}, func(ctx context.Context, batch []*broker.Delivery) {
		d.delivered.Add(int64(len(batch)))
		var apply []*broker.Delivery
		for _, dl := range batch {
			var o order
			if err := json.Unmarshal(dl.Msg.Data, &o); err != nil || o.OrderID == "" {
				dl.DeadLetter(fmt.Sprintf("order-history cannot read %s: %v", dl.Msg.Type, errOr(err, "no order_id")))
				continue
			}
			d.mu.Lock()
			fail := d.failedFor[dl.Msg.ID] && dl.Attempt == 1
			d.mu.Unlock()
			if fail {
				dl.Nak(200 * time.Millisecond)
				continue
			}
			apply = append(apply, dl)
		}
		err := d.view.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			for _, dl := range apply {
				var o order
				_ = json.Unmarshal(dl.Msg.Data, &o)
				if _, err := tx.Exec(ctx, `INSERT INTO order_history (event_id, order_id, customer_id, total_cents)
VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING`, dl.Msg.ID, o.OrderID, o.CustomerID, o.TotalCents); err != nil {
					return err
				}
			}
			return nil
		})
		for _, dl := range apply {
			if err != nil {
				dl.Nak(0)
			} else {
				dl.Ack()
			}
		}
		select {
		case d.applied <- struct{}{}:
		default:
		}
	})
}

func errOr(err error, s string) any {
	if err != nil {
		return err
	}
	return s
}

func (d *run) faults(ctx context.Context, placed []*message.Message, rows int) error {
	// A transient failure: the first attempt of this event fails.
	flaky, err := message.NewJSON(source, eventType, order{OrderID: "order-flaky", CustomerID: "customer-1", TotalCents: 4200})
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.failedFor = map[string]bool{flaky.ID: true}
	d.mu.Unlock()
	// A duplicate: the first 100 events published again with the same ids.
	// A poison message: data the view cannot read.
	poison := message.New(source, eventType, []byte("this is not JSON"))
	poison.DataContentType = "text/plain"

	dlq, err := d.ob.Broker.Subscribe(ctx, broker.SubscribeConfig{Topic: topic + ".dlq", Group: "operator"},
		d.collect(1))
	if err != nil {
		return err
	}
	before := d.delivered.Load()
	if err := d.ob.Broker.Publish(ctx, topic, flaky); err != nil {
		return err
	}
	if err := d.ob.Broker.Publish(ctx, topic, placed[:100]...); err != nil {
		return err
	}
	if err := d.ob.Broker.Publish(ctx, topic, poison); err != nil {
		return err
	}
	if err := d.waitForRows(ctx, rows+1); err != nil {
		return err
	}
	got, err := d.waitCollected(ctx)
	if err != nil {
		return err
	}
	// The flaky event twice, the poison one once, the duplicates never.
	if n := d.delivered.Load() - before; n != 3 {
		return fmt.Errorf("the view's handler saw %d deliveries during the faults, want 3", n)
	}
	d.say("[3/5] faults: an event whose first attempt failed was redelivered after 200ms and applied once;")
	d.say("      100 events published again with the same ids were dropped by the broker's dedup window;")
	if err := dlq.Stop(ctx); err != nil {
		return err
	}
	dead := got[0]
	d.say("      a malformed event went to %q with its reason: %q", topic+".dlq", dead.Extensions[broker.ExtDeadLetterReason])
	n, err := d.viewRows(ctx)
	if err != nil {
		return err
	}
	if n != rows+1 {
		return fmt.Errorf("view has %d rows after the faults, want %d", n, rows+1)
	}
	return nil
}

func (d *run) collect(n int) broker.Handler {
	d.dead = make(chan *message.Message, n)
	return func(ctx context.Context, batch []*broker.Delivery) {
		for _, dl := range batch {
			select {
			case d.dead <- dl.Msg:
			default:
			}
			dl.Ack()
		}
	}
}

func (d *run) waitCollected(ctx context.Context) ([]*message.Message, error) {
	select {
	case m := <-d.dead:
		return []*message.Message{m}, nil
	case <-time.After(d.cfg.Timeout):
		return nil, errors.New("no message reached the dead-letter topic")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// waitForRows waits until the view holds n rows.
func (d *run) waitForRows(ctx context.Context, n int) error {
	timeout := time.NewTimer(d.cfg.Timeout)
	defer timeout.Stop()
	for {
		got, err := d.viewRows(ctx)
		if err != nil {
			return err
		}
		if got >= n {
			return nil
		}
		select {
		case <-d.applied:
		case <-timeout.C:
			return fmt.Errorf("the view has %d of %d rows after %s", got, n, d.cfg.Timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (d *run) viewRows(ctx context.Context) (int, error) {
	var n int
	err := d.view.QueryRow(ctx, "SELECT count(*) FROM order_history").Scan(&n)
	return n, err
}

func (d *run) viewTotal(ctx context.Context) (int64, error) {
	var n int64
	err := d.view.QueryRow(ctx, "SELECT coalesce(sum(total_cents), 0) FROM order_history").Scan(&n)
	return n, err
}

// countTopic reads the whole topic with a new consumer group until it has
// seen want distinct events, then a moment longer to catch any extra, and
// returns how many distinct events and how many deliveries it saw.
func (d *run) countTopic(ctx context.Context, group string, want int) (distinct, deliveries int, err error) {
	var mu sync.Mutex
	seen := map[string]bool{}
	delivered := 0
	more := make(chan struct{}, 1)
	sub, err := d.ob.Broker.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 500},
		func(ctx context.Context, batch []*broker.Delivery) {
			mu.Lock()
			for _, dl := range batch {
				seen[dl.Msg.ID] = true
				delivered++
				dl.Ack()
			}
			mu.Unlock()
			select {
			case more <- struct{}{}:
			default:
			}
		})
	if err != nil {
		return 0, 0, err
	}
	defer sub.Stop(context.WithoutCancel(ctx))
	count := func() (int, int) {
		mu.Lock()
		defer mu.Unlock()
		return len(seen), delivered
	}
	timer := time.NewTimer(d.cfg.Timeout)
	defer timer.Stop()
	for n, _ := count(); n < want; n, _ = count() {
		select {
		case <-more:
		case <-timer.C:
			n, dl := count()
			return n, dl, nil
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		}
	}
	// Anything beyond want (a duplicate stored in the stream) would follow
	// in stream order right behind; give it a moment to show.
	extra := time.NewTimer(300 * time.Millisecond)
	defer extra.Stop()
	for {
		select {
		case <-more:
		case <-extra.C:
			n, dl := count()
			return n, dl, nil
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		}
	}
}

func since(t time.Time) string { return time.Since(t).Round(time.Millisecond).String() }
