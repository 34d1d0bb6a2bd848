package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Saga returns the saga benchmark: the CreateOrder saga of the online shop,
// end to end. An Order service (its own database, with an outbox relay, an
// inbox, a timer scheduler and a saga.Orchestrator) and a Customer service
// (its own database, with an outbox relay, an inbox and a saga.Participant
// keeping credit limits) run in one process over one broker. Concurrency
// clients each place an order and start its saga in one transaction, wait
// until the saga has completed (order APPROVED) or compensated (REJECTED),
// and place the next. Every tenth order is over its customer's limit.
//
// Throughput counts sagas that reached an end state; latency runs from the
// start of the placing transaction (or, with --rate, from when it was due)
// to the client seeing the end state. At the end the run checks that every
// saga ended and that each customer's reserved credit equals the sum of its
// approved orders, and fails when either does not hold.
func Saga() Benchmark {
	return Benchmark{
		Name:    "saga",
		Summary: "end-to-end CreateOrder sagas: Order service (orchestrator) and Customer service (participant), each its own database (--db, --concurrency, --rate)",
		Run:     runSaga,
	}
}

// The shop the saga benchmark runs.
const (
	sagaCustomers   = 1000      // customers orders are spread over, uniformly
	sagaCreditLimit = 1_000_000 // each customer's limit; a regular order is 1..100
	sagaOverLimit   = 2 * sagaCreditLimit
	sagaRefusedEach = 10 // every tenth order of a client is over the limit
	sagaName        = "bench.create-order"
	sagaCommand     = "bench.customer.reserve-credit"
	sagaWaitLimit   = time.Minute // the longest a client waits for one saga
	sagaFallbackAsk = 100 * time.Millisecond
)

// sagaOrder is the CreateOrder saga's data.
type sagaOrder struct {
	OrderID  string `json:"order_id"`
	Customer string `json:"customer"`
	Total    int64  `json:"total"`
}

// sagaReserve is the reserve-credit command's data.
type sagaReserve struct {
	Customer string `json:"customer"`
	Amount   int64  `json:"amount"`
}

// sagaWaiters wakes the client waiting for a saga when a reply to it has
// been handled and committed.
type sagaWaiters struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

func (w *sagaWaiters) add(id string) chan struct{} {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	w.m[id] = ch
	w.mu.Unlock()
	return ch
}

func (w *sagaWaiters) remove(id string) {
	w.mu.Lock()
	delete(w.m, id)
	w.mu.Unlock()
}

func (w *sagaWaiters) wake(id string) {
	w.mu.Lock()
	ch := w.m[id]
	w.mu.Unlock()
	if ch != nil {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func runSaga(ctx context.Context, cfg Config) (*Result, error) {
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	dbs, err := openSagaDBs(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	defer dbs.close()
	orderDB, custDB := dbs.order, dbs.customer
	if err := migrateSagaShop(ctx, orderDB, custDB); err != nil {
		return nil, err
	}
	log := slog.New(slog.DiscardHandler)
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, log)
	if err != nil {
		return nil, err
	}
	defer ob.Close()
	b := ob.Broker

	run := time.Now().UnixNano()
	cmdTopic := fmt.Sprintf("bench.saga.%d.customer", run)
	replyTopic := fmt.Sprintf("bench.saga.%d.order-replies", run)

	// Background work runs until stopAll.
	bctx, cancel := context.WithCancel(ctx)
	var bg sync.WaitGroup
	defer func() { cancel(); bg.Wait() }()
	background := func(f func(ctx context.Context) error) { bg.Go(func() { _ = f(bctx) }) }

	// The Order service.
	orderRelay, err := outbox.NewRelay(orderDB, b, outbox.RelayConfig{Mode: outbox.Notify, Logger: log})
	if err != nil {
		return nil, err
	}
	sched, err := timer.New(orderDB, timer.Config{Logger: log})
	if err != nil {
		return nil, err
	}
	orderInbox, err := inbox.New(orderDB, inbox.Config{AfterCommit: orderRelay.Notify, Logger: log})
	if err != nil {
		return nil, err
	}
	o, err := saga.New(orderDB, sched, orderInbox, saga.Config{Source: "/bench/services/order", ReplyTopic: replyTopic, Logger: log})
	if err != nil {
		return nil, err
	}
	def := &saga.Definition[sagaOrder]{
		Name: sagaName,
		Steps: []saga.Step[sagaOrder]{{
			Name: "reserve-credit", Topic: cmdTopic, Command: sagaCommand,
			Input:    func(d *sagaOrder) any { return sagaReserve{Customer: d.Customer, Amount: d.Total} },
			Deadline: 30 * time.Second, MaxAttempts: 3,
		}},
		OnCompleted: func(ctx context.Context, tx sqldb.Tx, id string, d *sagaOrder) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'APPROVED' WHERE id = $1`, d.OrderID)
			return err
		},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, id string, d *sagaOrder, reason string) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'REJECTED', reason = $1 WHERE id = $2`, reason, d.OrderID)
			return err
		},
	}
	if err := o.Register(def); err != nil {
		return nil, err
	}
	// A client learns of its saga's end from the reply subscription, after
	// the reply's transaction committed (the handler has returned), and
	// confirms it by reading the saga. OnCompleted and OnCompensated run
	// inside that transaction, too early to signal.
	waiters := &sagaWaiters{m: map[string]chan struct{}{}}
	var replyUse, cmdUse consumerUse
	handleReplies := replyUse.measure(o.Handler("order"))
	replySub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: replyTopic, Group: "order"}, func(ctx context.Context, batch []*broker.Delivery) {
		handleReplies(ctx, batch)
		for _, d := range batch {
			waiters.wake(d.Msg.Extensions[saga.ExtSagaID])
		}
	})
	if err != nil {
		return nil, err
	}
	defer replySub.Stop(context.WithoutCancel(ctx))

	// The Customer service.
	custRelay, err := outbox.NewRelay(custDB, b, outbox.RelayConfig{Mode: outbox.Notify, Logger: log})
	if err != nil {
		return nil, err
	}
	custInbox, err := inbox.New(custDB, inbox.Config{AfterCommit: custRelay.Notify, Logger: log})
	if err != nil {
		return nil, err
	}
	p, err := saga.NewParticipant(custInbox, "/bench/services/customer")
	if err != nil {
		return nil, err
	}
	if err := p.Handle(sagaCommand, reserveCredit, releaseCredit); err != nil {
		return nil, err
	}
	cmdSub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: cmdTopic, Group: "customer"}, cmdUse.measure(p.Handler("customer")))
	if err != nil {
		return nil, err
	}
	defer cmdSub.Stop(context.WithoutCancel(ctx))

	background(orderRelay.Run)
	background(custRelay.Run)
	background(sched.Run)

	commitsBefore := dbs.commits(ctx)
	fmt.Fprintf(cfg.Progress, "bench saga: %s; %s; %d clients, for %s\n", dbs.description, ob.Description, cfg.Concurrency, cfg.Duration)

	var (
		rec                Recorder
		approved, rejected atomic.Int64
		lastErr            atomic.Value
	)
	fail := func(err error) { rec.Error(); lastErr.Store(err) }
	pcfg := cfg
	pcfg.Batch = 1 // one saga per turn of a client
	start := time.Now()
	runPaced(ctx, pcfg, start, &rec, func(w int) func(time.Time) {
		rng := rand.New(rand.NewPCG(uint64(run), uint64(w)))
		n := 0
		return func(due time.Time) {
			n++
			d := sagaOrder{OrderID: message.NewID(), Customer: customerID(rng.IntN(sagaCustomers)), Total: 1 + rng.Int64N(100)}
			if n%sagaRefusedEach == 0 {
				d.Total = sagaOverLimit
			}
			id := "saga-" + d.OrderID
			woken := waiters.add(id)
			defer waiters.remove(id)
			err := orderDB.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if _, err := tx.Exec(ctx, `INSERT INTO orders (id, customer, total, state) VALUES ($1, $2, $3, 'PENDING')`, d.OrderID, d.Customer, d.Total); err != nil {
					return err
				}
				return def.StartTx(ctx, tx, o, id, d)
			})
			if err != nil {
				fail(fmt.Errorf("place order: %w", err))
				return
			}
			orderRelay.Notify()
			status, err := waitSagaEnd(ctx, o, id, woken)
			if err != nil {
				fail(err)
				return
			}
			rec.Observe(time.Since(due))
			if status == saga.Completed {
				approved.Add(1)
			} else {
				rejected.Add(1)
			}
		}
	})
	elapsed := time.Since(start)
	commitsAfter := dbs.commits(ctx)

	res := &Result{Unit: "saga", Latency: "start of the transaction placing the order and starting its saga, to the client reading the saga completed or compensated"}
	if cfg.Rate > 0 {
		res.Latency = "from when the order was due (paced by --rate) to the client reading its saga completed or compensated"
	}
	rec.Fill(res, elapsed)
	inv, err := checkSagaShop(ctx, orderDB, custDB)
	if err != nil {
		return nil, err
	}
	res.Notes = append(res.Notes,
		fmt.Sprintf("orders: %d approved, %d rejected (every %dth order of a client is over its customer's limit); %d customers", approved.Load(), rejected.Load(), sagaRefusedEach, sagaCustomers),
		"invariants: "+inv,
		"db: "+dbs.description,
		"broker: "+ob.Description,
		"services: Order (orchestrator, timer scheduler, inbox, outbox relay) and Customer (participant with inbox and barrier, outbox relay), one process; one broker subscription per service; relays in notify mode, woken in-process after each commit",
		fmt.Sprintf("end detection: the reply subscription wakes the client after the reply's transaction committed; the client then reads the saga (and asks again every %s if never woken)", sagaFallbackAsk),
		"--batch does not apply: one saga per client turn",
		"Order's reply consumer: "+replyUse.String(elapsed),
		"Customer's command consumer: "+cmdUse.String(elapsed),
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

// consumerUse measures a consumer: its handler calls, the deliveries they
// took, and the time spent in them.
type consumerUse struct {
	calls, deliveries, busy atomic.Int64
}

func (u *consumerUse) measure(h broker.Handler) broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		t := time.Now()
		h(ctx, batch)
		u.busy.Add(int64(time.Since(t)))
		u.calls.Add(1)
		u.deliveries.Add(int64(len(batch)))
	}
}

func (u *consumerUse) String(elapsed time.Duration) string {
	calls := max(u.calls.Load(), 1)
	return fmt.Sprintf("%d batches of %.1f deliveries on average, %.2f ms each, busy %.0f%% of the run",
		u.calls.Load(), float64(u.deliveries.Load())/float64(calls), float64(u.busy.Load())/float64(calls)/1e6,
		100*float64(u.busy.Load())/float64(elapsed))
}

func customerID(i int) string { return fmt.Sprintf("customer-%04d", i) }

// reserveCredit is the Customer service's action: reserve the amount, or
// refuse when it would exceed the customer's limit.
func reserveCredit(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	var in sagaReserve
	if err := json.Unmarshal(cmd.Msg.Data, &in); err != nil {
		return saga.Reply{}, inbox.Permanent(err)
	}
	n, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved + $1 WHERE id = $2 AND reserved + $1 <= credit_limit`, in.Amount, in.Customer)
	if err != nil {
		return saga.Reply{}, err
	}
	if n == 0 {
		return saga.Failure("credit limit exceeded"), nil
	}
	return saga.Success(nil), nil
}

// releaseCredit is the Customer service's compensation.
func releaseCredit(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	var in sagaReserve
	if err := json.Unmarshal(cmd.Msg.Data, &in); err != nil {
		return saga.Reply{}, inbox.Permanent(err)
	}
	_, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved - $1 WHERE id = $2`, in.Amount, in.Customer)
	return saga.Success(nil), err
}

// waitSagaEnd waits until saga id has completed or compensated, reading it
// when woken and every sagaFallbackAsk.
func waitSagaEnd(ctx context.Context, o *saga.Orchestrator, id string, woken <-chan struct{}) (saga.Status, error) {
	limit := time.NewTimer(sagaWaitLimit)
	defer limit.Stop()
	ask := time.NewTicker(sagaFallbackAsk)
	defer ask.Stop()
	for {
		select {
		case <-woken:
		case <-ask.C:
		case <-limit.C:
			return "", fmt.Errorf("saga %s did not end within %s", id, sagaWaitLimit)
		case <-ctx.Done():
			return "", ctx.Err()
		}
		in, err := o.Get(ctx, id)
		if err != nil {
			return "", err
		}
		switch in.Status {
		case saga.Completed, saga.Compensated:
			return in.Status, nil
		case saga.Parked:
			return "", fmt.Errorf("saga %s parked: %s", id, in.Reason)
		}
	}
}

func migrateSagaShop(ctx context.Context, orderDB, custDB *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, orderDB); err != nil {
			return err
		}
	}
	if _, err := orderDB.Exec(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, total BIGINT NOT NULL,
		state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '')`); err != nil {
		return fmt.Errorf("create the orders table: %w", err)
	}
	for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate} {
		if err := m(ctx, custDB); err != nil {
			return err
		}
	}
	if _, err := custDB.Exec(ctx, `CREATE TABLE customers (id TEXT PRIMARY KEY, credit_limit BIGINT NOT NULL, reserved BIGINT NOT NULL)`); err != nil {
		return fmt.Errorf("create the customers table: %w", err)
	}
	return custDB.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		for i := range sagaCustomers {
			if _, err := tx.Exec(ctx, `INSERT INTO customers (id, credit_limit, reserved) VALUES ($1, $2, 0)`, customerID(i), sagaCreditLimit); err != nil {
				return err
			}
		}
		return nil
	})
}

// checkSagaShop checks the shop's invariants once every client has seen
// its saga end: every saga ended, each order's state matches its saga's,
// and each customer's reserved credit is the sum of its approved orders.
// It waits up to sagaWaitLimit for sagas a failed client left running.
func checkSagaShop(ctx context.Context, orderDB, custDB *sqldb.DB) (string, error) {
	deadline := time.Now().Add(sagaWaitLimit)
	var running int
	for {
		if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM troupe_sagas WHERE status NOT IN ($1, $2)`, string(saga.Completed), string(saga.Compensated)).Scan(&running); err != nil {
			return "", err
		}
		if running == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var sagas, completed, compensated, approvedOrders, rejectedOrders, pending int
	err := orderDB.QueryRow(ctx, `SELECT count(*),
		coalesce(sum(CASE WHEN status = $1 THEN 1 ELSE 0 END), 0),
		coalesce(sum(CASE WHEN status = $2 THEN 1 ELSE 0 END), 0) FROM troupe_sagas`,
		string(saga.Completed), string(saga.Compensated)).Scan(&sagas, &completed, &compensated)
	if err != nil {
		return "", err
	}
	err = orderDB.QueryRow(ctx, `SELECT
		coalesce(sum(CASE WHEN state = 'APPROVED' THEN 1 ELSE 0 END), 0),
		coalesce(sum(CASE WHEN state = 'REJECTED' THEN 1 ELSE 0 END), 0),
		coalesce(sum(CASE WHEN state = 'PENDING' THEN 1 ELSE 0 END), 0) FROM orders`).Scan(&approvedOrders, &rejectedOrders, &pending)
	if err != nil {
		return "", err
	}
	want := map[string]int64{}
	rows, err := orderDB.Query(ctx, `SELECT customer, sum(total) FROM orders WHERE state = 'APPROVED' GROUP BY customer`)
	if err != nil {
		return "", err
	}
	for rows.Next() {
		var c string
		var sum int64
		if err := rows.Scan(&c, &sum); err != nil {
			rows.Close()
			return "", err
		}
		want[c] = sum
	}
	if err := rows.Close(); err != nil {
		return "", err
	}
	var wrong []string
	rows, err = custDB.Query(ctx, `SELECT id, reserved FROM customers ORDER BY id`)
	if err != nil {
		return "", err
	}
	for rows.Next() {
		var c string
		var reserved int64
		if err := rows.Scan(&c, &reserved); err != nil {
			rows.Close()
			return "", err
		}
		if reserved != want[c] {
			wrong = append(wrong, fmt.Sprintf("%s reserved %d, approved orders total %d", c, reserved, want[c]))
		}
	}
	if err := rows.Close(); err != nil {
		return "", err
	}
	var errs []string
	if running > 0 {
		errs = append(errs, fmt.Sprintf("%d of %d sagas did not end", running, sagas))
	}
	if approvedOrders != completed || rejectedOrders != compensated || pending != running {
		errs = append(errs, fmt.Sprintf("orders %d approved, %d rejected, %d pending, but sagas %d completed, %d compensated, %d not ended",
			approvedOrders, rejectedOrders, pending, completed, compensated, running))
	}
	if len(wrong) > 0 {
		errs = append(errs, fmt.Sprintf("%d customers' reserved credit differs from their approved orders (first: %s)", len(wrong), wrong[0]))
	}
	if len(errs) > 0 {
		return "", fmt.Errorf("invariant broken: %s", strings.Join(errs, "; "))
	}
	return fmt.Sprintf("ok: all %d sagas ended (%d completed, %d compensated), orders match them, and each of %d customers' reserved credit equals the sum of its approved orders",
		sagas, completed, compensated, sagaCustomers), nil
}

// sagaDBs are the two services' databases.
type sagaDBs struct {
	order, customer *sqldb.DB
	description     string
	close           func()
	// commits reads the commit counters of both databases (PostgreSQL only).
	commits func(ctx context.Context) sagaCommits
}

// sagaCommits are the transactions committed in each database so far.
type sagaCommits struct {
	ok              bool
	order, customer int64
}

func (c sagaCommits) sub(before sagaCommits) string {
	if !c.ok || !before.ok {
		return ""
	}
	return fmt.Sprintf("transactions committed (pg_stat_database.xact_commit, read-only ones included): Order database %d, Customer database %d",
		c.order-before.order, c.customer-before.customer)
}

// openSagaDBs opens a database for each service: two SQLite files in a
// directory of this run's, or two databases created for the run on the
// PostgreSQL server (given or throwaway) and dropped afterwards.
func openSagaDBs(ctx context.Context, cfg Config, dir string) (*sagaDBs, error) {
	stamp := time.Now().UnixNano()
	if cfg.DB == "sqlite" {
		runDir := filepath.Join(dir, fmt.Sprintf("saga-%d", stamp))
		if err := os.MkdirAll(runDir, 0o755); err != nil {
			return nil, err
		}
		order, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(runDir, "order.db"), nil)
		if err != nil {
			return nil, err
		}
		customer, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(runDir, "customer.db"), nil)
		if err != nil {
			order.Close()
			return nil, err
		}
		return &sagaDBs{
			order: order, customer: customer,
			description: "SQLite files order.db and customer.db in " + runDir + " (WAL, synchronous=NORMAL: a commit is durable against a process crash, not a power loss; no fsync per commit)",
			close:       func() { customer.Close(); order.Close() },
			commits:     func(context.Context) sagaCommits { return sagaCommits{} },
		}, nil
	}
	admin, err := openDB(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(admin.db.Pool().Config().ConnString())
	if err != nil || u.Scheme == "" {
		admin.close()
		return nil, fmt.Errorf("--postgres: the saga benchmark needs a URL (postgres://...) to derive its two databases' URLs: %v", err)
	}
	names := []string{fmt.Sprintf("troupe_bench_saga_order_%d", stamp), fmt.Sprintf("troupe_bench_saga_customer_%d", stamp)}
	var opened []*sqldb.DB
	drop := func() {
		for _, db := range opened {
			db.Close()
		}
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		for _, n := range names {
			admin.db.Exec(dctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{n}.Sanitize()+" WITH (FORCE)")
		}
		admin.close()
	}
	for i, n := range names {
		if _, err := admin.db.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{n}.Sanitize()); err != nil {
			drop()
			return nil, fmt.Errorf("create database %s: %w", n, err)
		}
		du := *u
		du.Path = "/" + n
		// The Order database serves every client's transaction and reads;
		// the Customer database only its consumer and relay.
		conns := 8
		if i == 0 {
			conns = min(cfg.Concurrency+8, 72)
		}
		db, err := sqldb.Open(ctx, du.String(), &sqldb.Config{MaxConns: conns})
		if err != nil {
			drop()
			return nil, err
		}
		opened = append(opened, db)
	}
	return &sagaDBs{
		order: opened[0], customer: opened[1],
		description: "two databases " + names[0] + " and " + names[1] + " on " + admin.description,
		close:       drop,
		commits: func(ctx context.Context) sagaCommits {
			var c sagaCommits
			err := admin.db.QueryRow(ctx, `SELECT
				(SELECT xact_commit FROM pg_stat_database WHERE datname = $1),
				(SELECT xact_commit FROM pg_stat_database WHERE datname = $2)`, names[0], names[1]).Scan(&c.order, &c.customer)
			c.ok = err == nil
			return c
		},
	}, nil
}
