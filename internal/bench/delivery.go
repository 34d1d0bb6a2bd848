package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/internal/brokeropen"
)

// Delivery returns the delivery benchmark: orders of examples/delivery
// placed under contention. An Order service (orchestrator), a Store (food
// packets, reserved over the broker) and a Delivery service (agents,
// reserved over HTTP) each run on their own database in one process.
// Concurrency clients each place an order of one packet of one of three
// foods, wait until it is PLACED or NOT_PLACED, and place the next. There
// are deliveryPackets packets and deliveryAgents agents; an agent is free
// again deliveryAfter after its order was placed (it delivered), so agents
// are the scarce resource and many orders end NOT_PLACED.
//
// Throughput counts placed orders; latency runs from the call placing an
// order to the client seeing it ended (placed or not). The run ends with
// the example's invariant check (no resource assigned twice, each placed
// order with its packet and an agent, nothing held by orders not placed).
func Delivery() Benchmark {
	return Benchmark{
		Name:    "delivery",
		Summary: "examples/delivery under contention: orders placed per second when packets and agents are scarce (Order, Store and Delivery services, each its own database; --db, --concurrency)",
		Run:     runDelivery,
	}
}

// The delivery benchmark's store.
const (
	deliveryPackets = 1000
	deliveryAgents  = 50
	deliveryAfter   = 20 * time.Millisecond
)

var deliveryFoods = []string{"pizza", "ramen", "salad"}

func runDelivery(ctx context.Context, cfg Config) (*Result, error) {
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	dbs, closeDBs, err := openServices(ctx, cfg, dir, "troupe_bench_delivery_",
		map[string]int{"order": min(cfg.Concurrency+8, 72), "store": 8, "delivery": 8}, "order", "store", "delivery")
	if err != nil {
		return nil, err
	}
	defer closeDBs()
	log := slog.New(slog.DiscardHandler)
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, log)
	if err != nil {
		return nil, err
	}
	defer ob.Close()

	s, err := delivery.Start(ctx, delivery.Config{
		OrderDB: dbs.DBs["order"], StoreDB: dbs.DBs["store"], DeliveryDB: dbs.DBs["delivery"], Broker: ob.Broker,
		Order:    order.Config{Logger: log},
		Store:    store.Config{Logger: log},
		Delivery: dispatch.Config{Logger: log, DeliverAfter: deliveryAfter},
	})
	if err != nil {
		return nil, err
	}
	defer s.Stop()
	for i, f := range deliveryFoods {
		n := deliveryPackets / len(deliveryFoods)
		if i < deliveryPackets%len(deliveryFoods) {
			n++
		}
		if err := s.Store().AddFood(ctx, f, f, n); err != nil {
			return nil, err
		}
	}
	agents := make([]string, deliveryAgents)
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%02d", i+1)
	}
	if err := s.Delivery().AddAgents(ctx, agents...); err != nil {
		return nil, err
	}
	fmt.Fprintf(cfg.Progress, "bench delivery: %s; %s; %d clients, %d packets of %d foods, %d agents (each free again %v after its order is placed), for %s\n",
		dbs.Description, ob.Description, cfg.Concurrency, deliveryPackets, len(deliveryFoods), deliveryAgents, deliveryAfter, cfg.Duration)

	var (
		rec             Recorder
		placed, refused atomic.Int64
		lastPlaced      atomic.Int64 // when the last placed order ended, in UnixNano
		lastErr         atomic.Value
	)
	fail := func(err error) { rec.Error(); lastErr.Store(err) }
	svc := s.Order()
	run := time.Now().UnixNano()
	pcfg := cfg
	pcfg.Batch = 1
	start := time.Now()
	runPaced(ctx, pcfg, start, &rec, func(w int) func(time.Time) {
		rng := rand.New(rand.NewPCG(uint64(run), uint64(w)))
		return func(due time.Time) {
			o, err := svc.Place(ctx, order.PlaceRequest{FoodID: deliveryFoods[rng.IntN(len(deliveryFoods))], Quantity: 1})
			if err != nil {
				fail(fmt.Errorf("place order: %w", err))
				return
			}
			wctx, cancel := context.WithTimeout(ctx, sagaWaitLimit)
			got, err := svc.Await(wctx, o.ID)
			cancel()
			if err != nil {
				fail(fmt.Errorf("order %s did not end: %w", o.ID, err))
				return
			}
			if got.State == order.Placed {
				placed.Add(1)
				lastPlaced.Store(time.Now().UnixNano())
				rec.Observe(time.Since(due))
			} else {
				refused.Add(1)
			}
		}
	})
	elapsed := time.Since(start)

	res := &Result{Unit: "placed order", Latency: "of placed orders, from the call placing the order to the client seeing it PLACED (packet and agent both assigned)"}
	measured := elapsed
	if placed.Load() >= deliveryPackets {
		// Sold out: what follows measures refusals, not placing.
		measured = time.Duration(lastPlaced.Load() - start.UnixNano())
		res.Notes = append(res.Notes, fmt.Sprintf("sold out: the %d packets were all placed after %.2fs; throughput counts until then", deliveryPackets, measured.Seconds()))
	}
	rec.Fill(res, measured)
	inv, err := deliveryInvariants(ctx, s)
	if err != nil {
		return nil, err
	}
	res.Notes = append(res.Notes,
		fmt.Sprintf("orders: %d placed, %d not placed (no packet or agent free) in %.1fs: %.0f orders ended per second", placed.Load(), refused.Load(), elapsed.Seconds(), float64(placed.Load()+refused.Load())/elapsed.Seconds()),
		"invariants: "+inv,
		"db: "+dbs.Description,
		"broker: "+ob.Description,
		"services: examples/delivery's Order (orchestrator: saga.Reservations, a try then a confirm phase), Store (packets reserved over the broker) and Delivery (agents reserved over HTTP), one process",
		"--batch does not apply: one order per client turn",
	)
	if err, ok := lastErr.Load().(error); ok {
		res.Notes = append(res.Notes, "last error: "+err.Error())
	}
	if placed.Load() == 0 {
		return nil, errors.New("no order was placed")
	}
	return res, nil
}

// deliveryInvariants waits for the orders still in flight to end, then
// checks the example's invariants.
func deliveryInvariants(ctx context.Context, s *delivery.Services) (string, error) {
	if err := waitInvariants(ctx, s.Check); err != nil {
		return "", err
	}
	return "ok: every order ended, each placed order with its packet and an agent, no resource assigned twice, nothing held by orders not placed", nil
}
