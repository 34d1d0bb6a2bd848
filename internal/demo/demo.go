// Package demo runs `troupe demo`: the online shop (examples/shop) on
// embedded defaults — an Order service and a Customer service, each with its
// own SQLite database, over an in-process NATS JetStream server — or on
// PostgreSQL, driven by a mixed workload with faults injected, ending with
// a table of outcomes and a check of the shop's invariants.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/bench"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/internal/servicedb"
	"github.com/troupedev/troupe/retry"
)

// Config configures the demo.
type Config struct {
	// DataDir keeps the demo's databases and broker files. Default: a
	// temporary directory removed at the end.
	DataDir string
	// Postgres, when set, is the URL of a PostgreSQL server database on
	// which the role may create databases: each service gets a fresh
	// database there, dropped at the end.
	Postgres string
	// Mode is how CreateOrder runs. Default order.Orchestrated.
	Mode order.Mode
	// Orders is how many orders the demo places. Default 2000.
	Orders int
	// Clients is how many place orders at once. Default 16.
	Clients int
	// Seed makes the workload and the faults repeatable. Default 1.
	Seed uint64
	// Out receives the demo's narration. Required.
	Out io.Writer
	// Timeout bounds the whole run. Default 5 minutes.
	Timeout time.Duration
}

// The workload and its faults.
const (
	customers       = 50
	overLimitEvery  = 8    // about one order in 8 is over its customer's limit
	cancelEvery     = 20   // about one in 20 is cancelled by its customer while in flight
	customerFailure = 0.03 // share of deliveries the Customer service fails once (transient)
	duplicateShare  = 0.05 // share of messages the broker publishes twice
)

// ErrInvariant is matched by the error Run returns when the shop's
// invariants do not hold at the end.
var ErrInvariant = errors.New("demo: invariant broken")

// Run runs the demo. It returns an error matching ErrInvariant when an
// invariant does not hold.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Out == nil {
		return errors.New("demo: Config.Out is required")
	}
	if cfg.Mode == "" {
		cfg.Mode = order.Orchestrated
	}
	if _, err := order.ParseMode(string(cfg.Mode)); err != nil {
		return err
	}
	if cfg.Orders <= 0 {
		cfg.Orders = 2000
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 16
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	out := cfg.Out
	dir := cfg.DataDir
	if dir == "" {
		d, err := os.MkdirTemp("", "troupe-demo-*")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	log := slog.New(slog.DiscardHandler)

	dbs, err := servicedb.Open(ctx, servicedb.Config{Dir: dir, Postgres: cfg.Postgres, Prefix: "troupe_demo_", Fresh: true,
		MaxConns: map[string]int{"order": cfg.Clients + 8}}, "order", "customer")
	if err != nil {
		return err
	}
	defer dbs.Close()
	ob, err := brokeropen.Open(ctx, "nats", dir, log)
	if err != nil {
		return err
	}
	defer ob.Close()
	fb, err := faulty.Wrap(ob.Broker, faulty.Config{Duplicate: duplicateShare, Delay: 0.5, Reorder: true, Seed: cfg.Seed})
	if err != nil {
		return err
	}

	fmt.Fprintf(out, "Troupe demo: the online shop. An Order service and a Customer service, each with its own database,\n")
	if cfg.Mode == order.Orchestrated {
		fmt.Fprintf(out, "run CreateOrder as an orchestrated saga: reserve the customer's credit, then approve the order;\n")
		fmt.Fprintf(out, "a refusal rejects it, a cancellation while in flight compensates (releases the credit).\n")
	} else {
		fmt.Fprintf(out, "run CreateOrder as a choreography: OrderCreated → CreditReserved | CreditLimitExceeded → approved,\n")
		fmt.Fprintf(out, "rejected, or cancelled (OrderCancelled → the credit is released).\n")
	}
	fmt.Fprintf(out, "Databases: %s\nBroker:    %s\n\n", dbs.Description, ob.Description)

	backoff := retry.Exponential{Min: 50 * time.Millisecond, Max: time.Second}
	s, err := shop.Start(ctx, shop.Config{
		OrderDB: dbs.DBs["order"], CustomerDB: dbs.DBs["customer"], Broker: fb,
		Order:    order.Config{Mode: cfg.Mode, Logger: log},
		Customer: customer.Config{Logger: log, FailRate: customerFailure, Seed: cfg.Seed, Backoff: backoff.Delay},
	})
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			s.Stop()
		}
	}()

	rng := rand.New(rand.NewPCG(cfg.Seed, 7))
	limits := make([]int64, customers)
	for i := range customers {
		limits[i] = 50_000 + rng.Int64N(450_001) // 500.00 .. 5,000.00
		if err := s.Customer().Create(ctx, customer.Customer{ID: fmt.Sprintf("cust-%02d", i), Name: fmt.Sprintf("Customer %d", i), CreditLimit: limits[i]}); err != nil {
			return err
		}
	}
	fmt.Fprintf(out, "[1/4] %d customers, credit limits 500.00 to 5,000.00\n", customers)
	fmt.Fprintf(out, "[2/4] %d clients place %d orders: about 1 in %d over its customer's limit, 1 in %d cancelled while in flight.\n",
		cfg.Clients, cfg.Orders, overLimitEvery, cancelEvery)
	fmt.Fprintf(out, "      Faults: the Customer service fails %.0f%% of deliveries (retried by the broker), the broker publishes\n", customerFailure*100)
	fmt.Fprintf(out, "      %.0f%% of messages twice (some late, batches shuffled), and the Order service is restarted halfway.\n", duplicateShare*100)

	w := &workload{cfg: cfg, shop: s, limits: limits}
	start := time.Now()
	progressDone := make(chan struct{})
	var progress sync.WaitGroup
	progress.Go(func() { w.progress(ctx, out, start, progressDone) })
	err = w.run(ctx)
	close(progressDone)
	progress.Wait() // its last line is written before the next ones

	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	fmt.Fprintf(out, "      %d orders ended in %.1fs\n", cfg.Orders, elapsed.Seconds())

	fmt.Fprintf(out, "[3/4] quiescence: flushing the broker's late copies, letting the last messages settle\n")
	if err := fb.Flush(ctx); err != nil {
		return err
	}
	violations, err := w.quiesce(ctx)
	if err != nil {
		return err
	}
	tot, err := s.Count(ctx)
	if err != nil {
		return err
	}
	injected := s.Customer().Injected()
	stopped = true
	if err := s.Stop(); err != nil {
		return err
	}

	fmt.Fprintf(out, "[4/4] results\n\n")
	var lat bench.Result
	w.rec.Fill(&lat, elapsed)
	tw := tabwriter.NewWriter(out, 0, 0, 3, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "  %s\t%s\n", k, v) }
	row("orders approved", fmt.Sprint(tot.Approved))
	row("orders rejected (credit refused)", fmt.Sprint(tot.Rejected))
	row("orders cancelled (compensated: credit released)", fmt.Sprint(tot.Cancelled))
	row("orders still pending", fmt.Sprint(tot.Pending))
	row("sagas per second (place to end)", fmt.Sprintf("%.0f", float64(cfg.Orders)/elapsed.Seconds()))
	row("latency p50 / p99 / max", fmt.Sprintf("%.1f ms / %.1f ms / %.1f ms", lat.P50Ms, lat.P99Ms, lat.MaxMs))
	row("injected: Customer transient failures", fmt.Sprint(injected))
	fst := fb.Stats()
	row("injected: messages duplicated (late)", fmt.Sprintf("%d (%d)", fst.Duplicated, fst.Delayed))
	row("injected: Order service restarts", fmt.Sprint(w.restarts.Load()))
	tw.Flush()

	fmt.Fprintf(out, "\n  invariants (read from both databases):\n")
	checks := []string{
		shop.InvEveryOrderEnded,
		shop.InvEverySagaEnded,
		shop.InvStateMatchesSaga,
		shop.InvReservedApproved,
		shop.InvWithinLimit,
		shop.InvOutboxDelivered,
	}
	if cfg.Mode == order.Choreographed {
		checks = append(checks, shop.InvEveryFlowEnded)
	}
	broken := map[string][]shop.Violation{}
	for _, v := range violations {
		broken[v.Invariant] = append(broken[v.Invariant], v)
	}
	for _, c := range checks {
		if vs := broken[c]; len(vs) > 0 {
			fmt.Fprintf(out, "  ✗ %s: %d violations, e.g. %s\n", c, len(vs), vs[0].Detail)
			continue
		}
		fmt.Fprintf(out, "  ✓ %s\n", describe(c))
	}
	if len(violations) > 0 {
		return fmt.Errorf("%w: %d violations (first: %s)", ErrInvariant, len(violations), violations[0])
	}
	fmt.Fprintf(out, "\nAll invariants hold. Run it on PostgreSQL with --postgres URL, as a choreography with --mode choreographed;\n")
	fmt.Fprintf(out, "the shop itself: go run ./examples/shop/cmd/shop (see examples/shop).\n")
	return nil
}

func describe(invariant string) string {
	switch invariant {
	case shop.InvEveryOrderEnded:
		return "every order ended: none left PENDING"
	case shop.InvEverySagaEnded:
		return "every saga ended: completed or compensated, none running or parked"
	case shop.InvStateMatchesSaga:
		return "each order's state matches its saga's (APPROVED exactly when the saga completed)"
	case shop.InvReservedApproved:
		return fmt.Sprintf("for each of the %d customers, reserved credit = the sum of its approved orders", customers)
	case shop.InvEveryFlowEnded:
		return "every choreographed flow (tracked by correlation id) completed or failed"
	case shop.InvWithinLimit:
		return "no customer's reserved credit exceeds its limit"
	case shop.InvOutboxDelivered:
		return "every message the services wrote to their outboxes reached the broker"
	default:
		return invariant
	}
}

// workload is the clients placing orders.
type workload struct {
	cfg    Config
	shop   *shop.Shop
	limits []int64

	gate     sync.RWMutex // held for writing while the Order service restarts
	placed   atomic.Int64
	ended    atomic.Int64
	restarts atomic.Int64
	rec      bench.Recorder // place-to-end latency of each order
}

func (w *workload) run(ctx context.Context) error {
	return runClients(ctx, w.cfg.Clients, w.cfg.Orders, w.cfg.Seed, 100, func(n int) error {
		if n == w.cfg.Orders/2 {
			return w.restartOrder(ctx)
		}
		return nil
	}, w.one)
}

// restartOrder stops the Order service while sagas are in flight and
// starts a new instance on the same database: the replies that arrived
// meanwhile wait in the broker, the deadlines in the database.
func (w *workload) restartOrder(ctx context.Context) error {
	w.gate.Lock()
	defer w.gate.Unlock()
	if err := w.shop.StopOrder(); err != nil {
		return fmt.Errorf("stop the Order service: %w", err)
	}
	if err := w.shop.StartOrder(ctx); err != nil {
		return fmt.Errorf("restart the Order service: %w", err)
	}
	w.restarts.Add(1)
	return nil
}

// one places order n, maybe cancels it, and waits for it to end.
func (w *workload) one(ctx context.Context, rng *rand.Rand, n int) error {
	c := rng.IntN(customers)
	req := order.PlaceRequest{CustomerID: fmt.Sprintf("cust-%02d", c)}
	if rng.IntN(overLimitEvery) == 0 {
		req.Items = []order.Item{{SKU: "piano", Quantity: 1, UnitPrice: w.limits[c] + 1}}
	} else {
		req.Items = []order.Item{{SKU: "tea", Quantity: 1 + rng.Int64N(3), UnitPrice: 100 + rng.Int64N(400)}}
	}
	cancelIt := rng.IntN(cancelEvery) == 0
	start := time.Now()
	w.gate.RLock()
	svc := w.shop.Order()
	if svc == nil {
		w.gate.RUnlock()
		return fmt.Errorf("order %d: the Order service is not running", n)
	}
	o, err := svc.Place(ctx, req)
	if err == nil && cancelIt {
		if _, cerr := svc.Cancel(ctx, o.ID); cerr != nil && !errors.Is(cerr, order.ErrNotCancellable) {
			err = cerr
		}
	}
	w.gate.RUnlock()
	if err != nil {
		return fmt.Errorf("order %d: %w", n, err)
	}
	w.placed.Add(1)
	for {
		w.gate.RLock()
		svc = w.shop.Order()
		w.gate.RUnlock()
		if svc == nil {
			return fmt.Errorf("order %s: the Order service is not running", o.ID)
		}
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		got, err := svc.Await(actx, o.ID)
		cancel()
		if err == nil {
			if !got.State.Ended() {
				return fmt.Errorf("order %s: Await returned %s", o.ID, got.State)
			}
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("order %s did not end: %w", o.ID, ctx.Err())
		}
		// Awaited through an instance that was stopped meanwhile: ask the
		// running one.
	}
	d := time.Since(start)
	w.ended.Add(1)
	w.rec.Observe(d)
	return nil
}

// progress prints a line a second until done.
func (w *workload) progress(ctx context.Context, out io.Writer, start time.Time, done <-chan struct{}) {
	printProgress(ctx, out, start, done, func() (string, bool) {
		tot, err := w.shop.Count(ctx)
		if err != nil {
			return "", false
		}
		return fmt.Sprintf("%5d/%d ended: %d approved, %d rejected, %d cancelled; %d in flight",
			w.ended.Load(), w.cfg.Orders, tot.Approved, tot.Rejected, tot.Cancelled, w.placed.Load()-w.ended.Load()), true
	})
}

// quiesce waits until the shop's invariants hold or a settling time has
// passed without change, and returns the violations left. Every order has
// ended when it is called; what may still travel is a choreography's
// release of cancelled orders' credit, and duplicates.
func (w *workload) quiesce(ctx context.Context) ([]shop.Violation, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		v, err := w.shop.Check(ctx)
		if err != nil || len(v) == 0 || time.Now().After(deadline) {
			return v, err
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
