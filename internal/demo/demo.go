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
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
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

var orderMigrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_orders",
	SQL: `CREATE TABLE orders (
  order_id    TEXT PRIMARY KEY,
  customer_id TEXT NOT NULL,
  total_cents INTEGER NOT NULL,
  state       TEXT NOT NULL
);`,
}}

// The view has no unique key on the event: the inbox is what keeps a
// redelivered event from being applied twice.
var viewMigrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_order_history",
	SQL: `CREATE TABLE order_history (
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

	orders    *sqldb.DB // the Order service's database, with its outbox
	view      *sqldb.DB // the order-history view's database, with its inbox
	ob        *brokeropen.Opened
	relay     *outbox.Relay
	relayStop func() error

	mu        sync.Mutex
	failedFor map[string]bool // event ids whose first attempt the demo fails
	applied   chan struct{}   // signalled after each committed batch
	dead      chan *message.Message
	delivered atomic.Int64 // deliveries to the view's handler
}

func (d *run) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

func (d *run) run(ctx context.Context) error {
	d.say("Troupe demo: an Order service commits orders with their events (outbox), a relay publishes them,")
	d.say("and an order-history view applies each event exactly once (inbox).")
	d.say("Embedded defaults: SQLite files and NATS JetStream in-process, in %s\n", d.dir)

	var err error
	if d.orders, err = d.openDB(ctx, "orders.db", "demo.orders", orderMigrations, outbox.Migrate); err != nil {
		return err
	}
	defer d.orders.Close()
	if d.view, err = d.openDB(ctx, "order-history.db", "demo.order_history", viewMigrations, inbox.Migrate); err != nil {
		return err
	}
	defer d.view.Close()
	if err := d.openBroker(ctx); err != nil {
		return err
	}
	defer func() { d.ob.Close() }()
	if err := d.startRelay(ctx); err != nil {
		return err
	}
	defer func() { d.relayStop() }()

	// 1. Commit orders and their events together.
	t0 := time.Now()
	placed, err := d.placeOrders(ctx, d.cfg.Orders, 100)
	if err != nil {
		return err
	}
	d.say("[1/5] placed %d orders: each order row and its %q event committed in one transaction (100 orders a transaction)", len(placed), eventType)

	// 2. The relay publishes; the view consumes through its inbox.
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
	d.say("[2/5] the relay published them and the order-history view (SQLite) applied all %d: %.2f in total (%s from the first commit)", len(placed), float64(total)/100, since(t0))

	// 3. Faults: a transient failure, a relay that lost its marks, a poison message.
	if err := d.faults(ctx, len(placed)); err != nil {
		return err
	}

	// 4. Restart the broker on the same files.
	if err := sub.Stop(ctx); err != nil {
		return err
	}
	if err := d.relayStop(); err != nil {
		return err
	}
	if err := d.ob.Close(); err != nil {
		return err
	}
	if err := d.openBroker(ctx); err != nil {
		return err
	}
	if err := d.startRelay(ctx); err != nil {
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
	d.say("\nDone. Sagas and the reference shops arrive in later releases; see README.md.")
	return nil
}

// openDB opens a SQLite database in the demo's directory and migrates it:
// the service's own tables, then Troupe's.
func (d *run) openDB(ctx context.Context, file, component string, own []sqldb.Migration, troupe func(context.Context, *sqldb.DB) error) (*sqldb.DB, error) {
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(d.dir, file), nil)
	if err != nil {
		return nil, err
	}
	if err := db.Migrate(ctx, component, own); err != nil {
		db.Close()
		return nil, err
	}
	if err := troupe(ctx, db); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// startRelay runs the outbox relay of the Order service until relayStop.
func (d *run) startRelay(ctx context.Context) error {
	r, err := outbox.NewRelay(d.orders, d.ob.Broker, outbox.RelayConfig{})
	if err != nil {
		return err
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	d.relay = r
	d.relayStop = func() error {
		cancel()
		return <-done
	}
	return nil
}

func (d *run) openBroker(ctx context.Context) error {
	ob, err := brokeropen.Open(ctx, "nats", d.dir, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	d.ob = ob
	return nil
}

// placeOrders commits n orders, each with its event in the outbox, in
// transactions of batch orders, and wakes the relay after each commit.
func (d *run) placeOrders(ctx context.Context, n, batch int) ([]*message.Message, error) {
	all := make([]*message.Message, 0, n)
	for len(all) < n {
		var msgs []*message.Message
		err := d.orders.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			msgs = msgs[:0]
			for i := 0; i < batch && len(all)+len(msgs) < n; i++ {
				k := len(all) + len(msgs)
				o := order{
					OrderID:    fmt.Sprintf("order-%s", message.NewID()[24:]),
					CustomerID: fmt.Sprintf("customer-%d", k%37),
					TotalCents: int64(1000 + (k*7919)%9000),
				}
				if _, err := tx.Exec(ctx, `INSERT INTO orders (order_id, customer_id, total_cents, state) VALUES ($1, $2, $3, 'PLACED')`,
					o.OrderID, o.CustomerID, o.TotalCents); err != nil {
					return err
				}
				m, err := message.NewJSON(source, eventType, o)
				if err != nil {
					return err
				}
				m.Subject = o.OrderID
				m.CorrelationID = m.ID
				msgs = append(msgs, m)
			}
			return outbox.Add(ctx, tx, topic, msgs...)
		})
		if err != nil {
			return nil, err
		}
		d.relay.Notify()
		all = append(all, msgs...)
	}
	return all, nil
}

// subscribeView consumes order events into the view through the inbox:
// each batch in one transaction, each event's row and its inbox row
// together, so a redelivered event changes nothing.
func (d *run) subscribeView(ctx context.Context) (broker.Subscription, error) {
	ib, err := inbox.New(d.view, inbox.Config{Backoff: func(int) time.Duration { return 200 * time.Millisecond }})
	if err != nil {
		return nil, err
	}
	apply := ib.Handler("order-history", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		var o order
		if err := json.Unmarshal(m.Data, &o); err != nil || o.OrderID == "" {
			return inbox.Permanent(fmt.Errorf("order-history cannot read %s: %v", m.Type, errOr(err, "no order_id")))
		}
		d.mu.Lock()
		fail := d.failedFor[m.ID]
		delete(d.failedFor, m.ID)
		d.mu.Unlock()
		if fail {
			return errors.New("the view's database is busy (a transient failure the demo injects)")
		}
		_, err := tx.Exec(ctx, `INSERT INTO order_history (order_id, customer_id, total_cents) VALUES ($1, $2, $3)`,
			o.OrderID, o.CustomerID, o.TotalCents)
		return err
	})
	return d.ob.Broker.Subscribe(ctx, broker.SubscribeConfig{
		Topic: topic, Group: "order-history", MaxBatch: 64, NakDelay: 200 * time.Millisecond,
	}, func(ctx context.Context, batch []*broker.Delivery) {
		d.delivered.Add(int64(len(batch)))
		apply(ctx, batch)
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

func (d *run) faults(ctx context.Context, rows int) error {
	dlq, err := d.ob.Broker.Subscribe(ctx, broker.SubscribeConfig{Topic: topic + ".dlq", Group: "operator"},
		d.collect(1))
	if err != nil {
		return err
	}
	before := d.delivered.Load()

	// A transient failure: the first attempt at this event fails.
	flaky, err := message.NewJSON(source, eventType, order{OrderID: "order-flaky", CustomerID: "customer-1", TotalCents: 4200})
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.failedFor = map[string]bool{flaky.ID: true}
	d.mu.Unlock()
	if err := d.addEvents(ctx, flaky); err != nil {
		return err
	}
	if err := d.waitForRows(ctx, rows+1); err != nil {
		return err
	}

	// The relay loses its marks on 100 published events, as when it is
	// killed between the broker's ack and marking them delivered: it
	// publishes them again.
	if _, err := d.orders.Exec(ctx, `UPDATE troupe_outbox SET delivered_at = NULL
WHERE seq IN (SELECT seq FROM troupe_outbox ORDER BY seq LIMIT 100)`); err != nil {
		return err
	}
	d.relay.Notify()
	if err := d.waitForRelay(ctx); err != nil {
		return err
	}

	// A poison message: data the view cannot read.
	poison := message.New(source, eventType, []byte("this is not JSON"))
	poison.DataContentType = "text/plain"
	if err := d.addEvents(ctx, poison); err != nil {
		return err
	}
	got, err := d.waitCollected(ctx)
	if err != nil {
		return err
	}
	if err := dlq.Stop(ctx); err != nil {
		return err
	}
	// The flaky event twice, the poison one once, the re-published ones never.
	if n := d.delivered.Load() - before; n != 3 {
		return fmt.Errorf("the view's handler saw %d deliveries during the faults, want 3", n)
	}
	n, err := d.viewRows(ctx)
	if err != nil {
		return err
	}
	if n != rows+1 {
		return fmt.Errorf("view has %d rows after the faults, want %d", n, rows+1)
	}
	d.say("[3/5] faults: an event whose first attempt failed was redelivered after 200ms and applied once;")
	d.say("      the relay lost its marks on 100 published events and published them again: the broker's dedup dropped the copies;")
	d.say("      a malformed event went to %q with its reason: %q", topic+".dlq", got[0].Extensions[broker.ExtDeadLetterReason])
	return nil
}

// addEvents commits events to the Order service's outbox on their own.
func (d *run) addEvents(ctx context.Context, msgs ...*message.Message) error {
	err := d.orders.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, topic, msgs...)
	})
	d.relay.Notify()
	return err
}

// waitForRelay waits until the outbox has no undelivered row.
func (d *run) waitForRelay(ctx context.Context) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	timeout := time.NewTimer(d.cfg.Timeout)
	defer timeout.Stop()
	for {
		var pending int
		if err := d.orders.QueryRow(ctx, "SELECT count(*) FROM troupe_outbox WHERE delivered_at IS NULL").Scan(&pending); err != nil {
			return err
		}
		if pending == 0 {
			return nil
		}
		select {
		case <-tick.C:
		case <-timeout.C:
			return fmt.Errorf("the relay left %d events unpublished for %s", pending, d.cfg.Timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
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
