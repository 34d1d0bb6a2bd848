package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/internal/bench"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/internal/servicedb"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/retry"
)

// DeliveryConfig configures the food-delivery demo (RunDelivery). The zero
// value gives the defaults.
type DeliveryConfig struct {
	// DataDir keeps the demo's databases and broker files. Default: a
	// temporary directory removed at the end.
	DataDir string
	// Postgres, when set, is the URL of a PostgreSQL server database on
	// which the role may create databases: each service gets a fresh
	// database there, dropped at the end.
	Postgres string
	// Orders is how many orders the demo places. Default 600.
	Orders int
	// Clients is how many place orders at once. Default 16.
	Clients int
	// Packets is how many packets the Store has, shared among 3 foods.
	// Default 300.
	Packets int
	// Agents is how many delivery agents there are. Default 10.
	Agents int
	// DeliverAfter is how long an agent is out with a placed order before
	// it is free again. Default 50 ms.
	DeliverAfter time.Duration
	// Seed makes the workload and the faults repeatable. Default 1.
	Seed uint64
	// Timeout bounds the whole run. Default 5 minutes.
	Timeout time.Duration
}

// The food-delivery demo's foods and faults.
var deliveryFoods = []struct{ id, name string }{{"pizza", "Pizza margherita"}, {"ramen", "Shoyu ramen"}, {"salad", "Greek salad"}}

const (
	storeConfirmFailure  = 0.10 // share of packet confirmations the Store fails once
	deliveryUnavailable  = 0.10 // share of agent confirmation calls the Delivery service answers 503
	deliveryDuplicates   = 0.05 // share of messages the broker publishes twice
	deliveryExpiry       = 10 * time.Second
	deliveryStepDeadline = time.Second
)

// RunDelivery runs the food-delivery demo (examples/delivery), writing its
// narration to w: a burst of orders against scarce packets and agents,
// with transient failures injected in the confirm phase, then a table of
// outcomes and a check of the invariants across the three databases. It
// returns an error matching ErrInvariant when an invariant does not hold.
func RunDelivery(ctx context.Context, w io.Writer, cfg DeliveryConfig) error {
	if w == nil {
		return errors.New("demo: RunDelivery needs a writer")
	}
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	dir := cfg.DataDir
	if dir == "" {
		d, err := os.MkdirTemp("", "troupe-demo-delivery-*")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	log := slog.New(slog.DiscardHandler)
	dbs, err := servicedb.Open(ctx, servicedb.Config{Dir: dir, Postgres: cfg.Postgres, Prefix: "troupe_demo_delivery_", Fresh: true,
		MaxConns: map[string]int{"order": cfg.Clients + 8}}, "order", "store", "delivery")
	if err != nil {
		return err
	}
	defer dbs.Close()
	ob, err := brokeropen.Open(ctx, "nats", dir, log)
	if err != nil {
		return err
	}
	defer ob.Close()
	fb, err := faulty.Wrap(ob.Broker, faulty.Config{Duplicate: deliveryDuplicates, Delay: 0.5, Reorder: true, Seed: cfg.Seed})
	if err != nil {
		return err
	}

	fmt.Fprintf(w, "Troupe demo: food delivery. An Order service, a Store (foods and their packets) and a Delivery service\n")
	fmt.Fprintf(w, "(agents), each with its own database. Each order is a saga of reservations: hold the packets at the\n")
	fmt.Fprintf(w, "Store (over the broker) and an agent at the Delivery service (over HTTP), then confirm them all;\n")
	fmt.Fprintf(w, "the customer sees PLACED only when every one is assigned, NOT_PLACED otherwise, with nothing held.\n")
	fmt.Fprintf(w, "Databases: %s\nBroker:    %s\n\n", dbs.Description, ob.Description)

	backoff := retry.Exponential{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}
	s, err := delivery.Start(ctx, delivery.Config{
		OrderDB: dbs.DBs["order"], StoreDB: dbs.DBs["store"], DeliveryDB: dbs.DBs["delivery"], Broker: fb,
		Order: order.Config{Logger: log, Expiry: deliveryExpiry, Deadline: deliveryStepDeadline, Backoff: backoff.Delay},
		Store: store.Config{Logger: log, FailConfirms: storeConfirmFailure, Seed: cfg.Seed, Backoff: backoff.Delay},
		Delivery: dispatch.Config{Logger: log, DeliverAfter: cfg.DeliverAfter, Unavailable: deliveryUnavailable,
			Seed: cfg.Seed},
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
	for i, f := range deliveryFoods {
		n := cfg.Packets / len(deliveryFoods)
		if i < cfg.Packets%len(deliveryFoods) {
			n++
		}
		if err := s.Store().AddFood(ctx, f.id, f.name, n); err != nil {
			return err
		}
	}
	agents := make([]string, cfg.Agents)
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%02d", i+1)
	}
	if err := s.Delivery().AddAgents(ctx, agents...); err != nil {
		return err
	}
	fmt.Fprintf(w, "[1/4] %d packets of %d foods at the Store; %d agents, each back %v after its order is placed\n",
		cfg.Packets, len(deliveryFoods), cfg.Agents, cfg.DeliverAfter)
	fmt.Fprintf(w, "[2/4] %d clients place %d orders of 1 to %d packets: more than the packets, far more than the agents at once.\n",
		cfg.Clients, cfg.Orders, order.MaxQuantity)
	fmt.Fprintf(w, "      Faults in the confirm phase: the Store fails %.0f%% of packet confirmations once (redelivered), the\n", storeConfirmFailure*100)
	fmt.Fprintf(w, "      Delivery service answers %.0f%% of agent confirmations 503 (called again); the broker publishes\n", deliveryUnavailable*100)
	fmt.Fprintf(w, "      %.0f%% of messages twice (some late, batches shuffled). Holds expire after %v.\n", deliveryDuplicates*100, deliveryExpiry)

	wl := &deliveryWorkload{cfg: cfg, s: s}
	start := time.Now()
	done := make(chan struct{})
	var progress sync.WaitGroup
	progress.Go(func() { wl.progress(ctx, w, start, done) })
	err = wl.run(ctx)
	close(done)
	progress.Wait()
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	fmt.Fprintf(w, "      %d orders ended in %.1fs\n", cfg.Orders, elapsed.Seconds())

	fmt.Fprintf(w, "[3/4] quiescence: flushing the broker's late copies, letting the last cancels land and holds expire\n")
	if err := fb.Flush(ctx); err != nil {
		return err
	}
	violations, err := quiesceDelivery(ctx, s)
	if err != nil {
		return err
	}
	tot, err := s.Count(ctx)
	if err != nil {
		return err
	}
	delivered, err := s.Delivery().Reserver().List(ctx, reserve.Filter{Pool: dispatch.AgentPool, State: reserve.Released, Limit: cfg.Orders})
	if err != nil {
		return err
	}
	storeFaults, deliveryFaults := s.Store().Injected(), s.Delivery().Injected()
	stopped = true
	if err := s.Stop(); err != nil {
		return err
	}

	fmt.Fprintf(w, "[4/4] results\n\n")
	var lat bench.Result
	wl.rec.Fill(&lat, elapsed)
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "  %s\t%s\n", k, v) }
	row("orders placed (packets and agent assigned)", fmt.Sprint(tot.Placed))
	reasons := make([]string, 0, len(tot.NotPlaced))
	for r := range tot.NotPlaced {
		reasons = append(reasons, r)
	}
	slices.Sort(reasons)
	for _, r := range reasons {
		row("orders not placed: "+r, fmt.Sprint(tot.NotPlaced[r]))
	}
	row("orders still pending", fmt.Sprint(tot.Pending))
	row("deliveries done (agent back and free)", fmt.Sprint(len(delivered)))
	row("orders per second (place to end)", fmt.Sprintf("%.0f", float64(cfg.Orders)/elapsed.Seconds()))
	row("latency p50 / p99 / max", fmt.Sprintf("%.1f ms / %.1f ms / %.1f ms", lat.P50Ms, lat.P99Ms, lat.MaxMs))
	row("injected: Store confirmations failed once", fmt.Sprint(storeFaults))
	row("injected: Delivery calls answered 503", fmt.Sprint(deliveryFaults))
	fst := fb.Stats()
	row("injected: messages duplicated (late)", fmt.Sprintf("%d (%d)", fst.Duplicated, fst.Delayed))
	tw.Flush()

	fmt.Fprintf(w, "\n  invariants (read from the three databases):\n")
	broken := map[string][]delivery.Violation{}
	for _, v := range violations {
		broken[v.Invariant] = append(broken[v.Invariant], v)
	}
	for _, inv := range delivery.Invariants {
		if vs := broken[inv]; len(vs) > 0 {
			fmt.Fprintf(w, "  ✗ %s: %d violations, e.g. %s\n", inv, len(vs), vs[0].Detail)
			continue
		}
		fmt.Fprintf(w, "  ✓ %s\n", describeDelivery(inv))
	}
	if len(violations) > 0 {
		return fmt.Errorf("%w: %d violations (first: %s)", ErrInvariant, len(violations), violations[0])
	}
	fmt.Fprintf(w, "\nAll invariants hold: no customer saw \"placed\" for an order that cannot be fulfilled. Run it on PostgreSQL\n")
	fmt.Fprintf(w, "with --postgres URL; the example itself: go run ./examples/delivery/cmd/delivery (see examples/delivery).\n")
	return nil
}

func (cfg DeliveryConfig) withDefaults() DeliveryConfig {
	if cfg.Orders <= 0 {
		cfg.Orders = 600
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 16
	}
	if cfg.Packets <= 0 {
		cfg.Packets = 300
	}
	if cfg.Agents <= 0 {
		cfg.Agents = 10
	}
	if cfg.DeliverAfter <= 0 {
		cfg.DeliverAfter = 50 * time.Millisecond
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Minute
	}
	return cfg
}

func describeDelivery(invariant string) string {
	switch invariant {
	case delivery.InvEveryOrderEnded:
		return "every order ended: PLACED or NOT_PLACED, none PENDING"
	case delivery.InvEverySagaEnded:
		return "every saga ended: completed or compensated, none running or parked"
	case delivery.InvPlacedFulfilled:
		return "every PLACED order has exactly its packets and one agent assigned (or back from delivering it)"
	case delivery.InvNotPlacedNothing:
		return "NOT_PLACED orders hold nothing: no packet, no agent"
	case delivery.InvAssignedOnce:
		return "no packet or agent is assigned twice"
	case delivery.InvNothingHeld:
		return "after quiescence and expiry, no reservation is left held"
	case delivery.InvOutboxDelivered:
		return "every message the Order service and the Store wrote reached the broker"
	default:
		return invariant
	}
}

// quiesceDelivery waits until the invariants hold or the holds' expiry
// and a margin have passed, and returns the violations left. Every order
// has ended when it is called; what may still travel is the replies to
// the last cancels, duplicates, and holds waiting for their expiry.
func quiesceDelivery(ctx context.Context, s *delivery.Services) ([]delivery.Violation, error) {
	deadline := time.Now().Add(deliveryExpiry + 20*time.Second)
	for {
		v, err := s.Check(ctx)
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

// deliveryWorkload is the clients placing orders.
type deliveryWorkload struct {
	cfg DeliveryConfig
	s   *delivery.Services

	placed, ended atomic.Int64
	rec           bench.Recorder // place-to-end latency of each order
}

func (wl *deliveryWorkload) run(ctx context.Context) error {
	return runClients(ctx, wl.cfg.Clients, wl.cfg.Orders, wl.cfg.Seed, 200, nil, wl.one)
}

// one places order n and waits for it to end.
func (wl *deliveryWorkload) one(ctx context.Context, rng *rand.Rand, n int) error {
	req := order.PlaceRequest{FoodID: deliveryFoods[rng.IntN(len(deliveryFoods))].id, Quantity: 1 + rng.IntN(order.MaxQuantity)}
	start := time.Now()
	svc := wl.s.Order()
	o, err := svc.Place(ctx, req)
	if err != nil {
		return fmt.Errorf("order %d: %w", n, err)
	}
	wl.placed.Add(1)
	got, err := svc.Await(ctx, o.ID)
	if err != nil {
		return fmt.Errorf("order %s did not end: %w", o.ID, err)
	}
	if !got.State.Ended() {
		return fmt.Errorf("order %s: Await returned %s", o.ID, got.State)
	}
	wl.ended.Add(1)
	wl.rec.Observe(time.Since(start))
	return nil
}

// progress prints a line a second until done.
func (wl *deliveryWorkload) progress(ctx context.Context, w io.Writer, start time.Time, done <-chan struct{}) {
	printProgress(ctx, w, start, done, func() (string, bool) {
		tot, err := wl.s.Count(ctx)
		if err != nil {
			return "", false
		}
		var notPlaced int
		for _, n := range tot.NotPlaced {
			notPlaced += n
		}
		return fmt.Sprintf("%4d/%d ended: %d placed, %d not placed; %d in flight",
			wl.ended.Load(), wl.cfg.Orders, tot.Placed, notPlaced, wl.placed.Load()-wl.ended.Load()), true
	})
}
