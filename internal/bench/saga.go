package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/sqldb"
)

// Saga returns the saga benchmark: the online shop's CreateOrder saga
// (examples/shop), end to end. The Order service (its own database, with an
// outbox relay, an inbox, a timer scheduler and the saga orchestrator) and
// the Customer service (its own database, with an outbox relay, an inbox
// and a saga participant with its barrier) run in one process over one
// broker. Concurrency clients each place an order (the order row and the
// saga's start in one transaction), wait until it has ended (APPROVED or
// REJECTED), and place the next. Every tenth order is over its customer's
// limit.
//
// Throughput counts orders that ended; latency runs from the call placing
// the order (or, with --rate, from when it was due) to the client seeing it
// ended. At the end the run checks the shop's invariants (every order and
// saga ended; each customer's reserved credit equals the sum of its approved
// orders) and fails when one does not hold.
func Saga() Benchmark {
	return Benchmark{
		Name:    "saga",
		Summary: "end-to-end CreateOrder sagas of examples/shop: Order service (orchestrator) and Customer service (participant), each its own database (--db, --concurrency, --rate)",
		Run:     runSaga,
	}
}

// The shop the saga benchmark runs.
const (
	sagaCustomers   = 1000      // customers orders are spread over, uniformly
	sagaCreditLimit = 1_000_000 // each customer's limit; a regular order is 1..100
	sagaOverLimit   = 2 * sagaCreditLimit
	sagaRefusedEach = 10 // every tenth order of a client is over the limit
	sagaWaitLimit   = time.Minute
)

func customerID(i int) string { return fmt.Sprintf("customer-%04d", i) }

func runSaga(ctx context.Context, cfg Config) (*Result, error) {
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	dbs, closeDBs, err := openServices(ctx, cfg, dir, "troupe_bench_saga_",
		map[string]int{"order": min(cfg.Concurrency+8, 72), "customer": 8}, "order", "customer")
	if err != nil {
		return nil, err
	}
	defer closeDBs()
	orderDB, custDB := dbs.DBs["order"], dbs.DBs["customer"]
	log := slog.New(slog.DiscardHandler)
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, log)
	if err != nil {
		return nil, err
	}
	defer ob.Close()

	s, err := shop.Start(ctx, shop.Config{OrderDB: orderDB, CustomerDB: custDB, Broker: ob.Broker,
		Order: order.Config{Mode: order.Orchestrated, Deadline: 30 * time.Second, Logger: log}, Customer: customer.Config{Logger: log}})
	if err != nil {
		return nil, err
	}
	defer s.Stop()
	if err := custDB.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		for i := range sagaCustomers {
			if _, err := tx.Exec(ctx, `INSERT INTO shop_customers (id, name, credit_limit, reserved) VALUES ($1, $1, $2, 0)`, customerID(i), sagaCreditLimit); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	commitsBefore := commits(ctx, orderDB, dbs.Names)
	fmt.Fprintf(cfg.Progress, "bench saga: %s; %s; %d clients, for %s\n", dbs.Description, ob.Description, cfg.Concurrency, cfg.Duration)

	var (
		rec                Recorder
		approved, rejected atomic.Int64
		lastErr            atomic.Value
	)
	fail := func(err error) { rec.Error(); lastErr.Store(err) }
	svc := s.Order()
	run := time.Now().UnixNano()
	pcfg := cfg
	pcfg.Batch = 1 // one saga per turn of a client
	start := time.Now()
	runPaced(ctx, pcfg, start, &rec, func(w int) func(time.Time) {
		rng := rand.New(rand.NewPCG(uint64(run), uint64(w)))
		n := 0
		return func(due time.Time) {
			n++
			price := 1 + rng.Int64N(100)
			if n%sagaRefusedEach == 0 {
				price = sagaOverLimit
			}
			wctx, cancel := context.WithTimeout(ctx, sagaWaitLimit)
			got, err := svc.PlaceAndAwait(wctx, order.PlaceRequest{CustomerID: customerID(rng.IntN(sagaCustomers)), Items: []order.Item{{SKU: "tea", Quantity: 1, UnitPrice: price}}})
			cancel()
			if err != nil {
				fail(fmt.Errorf("place an order and await its end: %w", err))
				return
			}
			rec.Observe(time.Since(due))
			if got.State == order.Approved {
				approved.Add(1)
			} else {
				rejected.Add(1)
			}
		}
	})
	elapsed := time.Since(start)
	commitsAfter := commits(ctx, orderDB, dbs.Names)

	res := &Result{Unit: "saga", Latency: "from the call placing the order (its row and its saga's start in one transaction) to the client seeing it APPROVED or REJECTED"}
	if cfg.Rate > 0 {
		res.Latency = "from when the order was due (paced by --rate) to the client seeing it APPROVED or REJECTED"
	}
	rec.Fill(res, elapsed)
	inv, err := sagaInvariants(ctx, s)
	if err != nil {
		return nil, err
	}
	res.Notes = append(res.Notes,
		fmt.Sprintf("orders: %d approved, %d rejected (every %dth order of a client is over its customer's limit); %d customers", approved.Load(), rejected.Load(), sagaRefusedEach, sagaCustomers),
		"invariants: "+inv,
		"db: "+dbs.Description,
		"broker: "+ob.Description,
		"services: examples/shop's Order (orchestrator, timer scheduler, inbox, outbox relay) and Customer (participant with inbox and barrier, outbox relay), one process; saga steps: reserve-credit (a command to Customer), approve (local); the order's outcome event is published too",
		"end detection: the Order service wakes the client after the reply's transaction committed; the client then reads the order, once (order.Service.PlaceAndAwait)",
		"--batch does not apply: one saga per client turn",
	)
	if c := commitsAfter.sub(commitsBefore); c != "" && res.Ops > 0 {
		res.Notes = append(res.Notes, c+fmt.Sprintf(" over %d sagas", res.Ops))
	}
	if err, ok := lastErr.Load().(error); ok {
		res.Notes = append(res.Notes, "last error: "+err.Error())
	}
	if res.Ops == 0 {
		return nil, errors.New("no saga ended")
	}
	return res, nil
}

// sagaInvariants waits up to sagaWaitLimit for the orders a failed client
// left in flight, then checks the shop's invariants.
func sagaInvariants(ctx context.Context, s *shop.Shop) (string, error) {
	if err := waitInvariants(ctx, s.Check); err != nil {
		return "", err
	}
	tot, err := s.Count(ctx)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("ok: all %d orders and sagas ended (%d approved, %d rejected), each order's state matches its saga's, and each of %d customers' reserved credit equals the sum of its approved orders",
		tot.Approved+tot.Rejected+tot.Cancelled, tot.Approved, tot.Rejected, sagaCustomers), nil
}

// sagaCommits are the transactions committed in each database so far.
type sagaCommits struct {
	ok              bool
	order, customer int64
}

// commits reads the commit counters of the services' PostgreSQL databases.
func commits(ctx context.Context, db *sqldb.DB, names map[string]string) sagaCommits {
	var c sagaCommits
	if db.Dialect() != sqldb.Postgres {
		return c
	}
	err := db.QueryRow(ctx, `SELECT
		(SELECT xact_commit FROM pg_stat_database WHERE datname = $1),
		(SELECT xact_commit FROM pg_stat_database WHERE datname = $2)`, names["order"], names["customer"]).Scan(&c.order, &c.customer)
	c.ok = err == nil
	return c
}

func (c sagaCommits) sub(before sagaCommits) string {
	if !c.ok || !before.ok {
		return ""
	}
	return fmt.Sprintf("transactions committed (pg_stat_database.xact_commit, read-only ones included): Order database %d, Customer database %d",
		c.order-before.order, c.customer-before.customer)
}
