package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	dorder "github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/examples/shop/customer"
	sorder "github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/retry"
	"github.com/troupedev/troupe/sqldb"
)

// The roles a node process plays: the broker, or one service of an
// example.
const (
	RoleNATS             = "nats"
	RoleShopOrder        = "shop-order"
	RoleShopCustomer     = "shop-customer"
	RoleDeliveryOrder    = "delivery-order"
	RoleDeliveryStore    = "delivery-store"
	RoleDeliveryDispatch = "delivery-dispatch"
)

// What a node writes on its standard output, one line each, for the
// harness: readyLine once it serves, then statsPrefix and its Stats as JSON
// every statsEvery.
const (
	readyLine   = "ready"
	statsPrefix = "stats "
	statsEvery  = 250 * time.Millisecond
)

// The delivery example's foods, the stock each is topped up to, and the
// reservation timings of a chaos run.
var foods = []struct{ id, name string }{{"pizza", "Pizza margherita"}, {"ramen", "Shoyu ramen"}, {"salad", "Greek salad"}}

const (
	restockTo        = 40
	deliveryExpiry   = 10 * time.Second
	deliveryDeadline = time.Second
)

// NodeStats is what a node process reports of the faults it injected.
type NodeStats struct {
	// Published counts messages the node handed to the broker, copies
	// included; Duplicated the copies its faulty broker made, Delayed
	// those of them held back to be published later.
	Published, Duplicated, Delayed int
	// Failed counts the deliveries or calls the service failed on purpose
	// (a transient error on first delivery, a 503).
	Failed int
}

func (s NodeStats) add(o NodeStats) NodeStats {
	return NodeStats{s.Published + o.Published, s.Duplicated + o.Duplicated, s.Delayed + o.Delayed, s.Failed + o.Failed}
}

// nodeConfig is a node's command line.
type nodeConfig struct {
	role, db, nats, addr, dir  string
	storeURL, deliveryURL      string
	duplicate, delay, failRate float64
	seed                       uint64
	customers, agents          int
	deliverAfter               time.Duration
	shopMode                   string
}

func (c *nodeConfig) args() []string {
	a := []string{"--role", c.role, "--addr", c.addr}
	add := func(k, v string) {
		if v != "" {
			a = append(a, "--"+k, v)
		}
	}
	add("db", c.db)
	add("nats", c.nats)
	add("dir", c.dir)
	add("store-url", c.storeURL)
	add("delivery-url", c.deliveryURL)
	a = append(a, "--duplicate", fmt.Sprint(c.duplicate), "--delay", fmt.Sprint(c.delay),
		"--fail-rate", fmt.Sprint(c.failRate), "--seed", fmt.Sprint(c.seed),
		"--customers", fmt.Sprint(c.customers), "--agents", fmt.Sprint(c.agents),
		"--deliver-after", c.deliverAfter.String())
	add("shop-mode", c.shopMode)
	return a
}

func parseNode(args []string, stderr io.Writer) (nodeConfig, error) {
	var c nodeConfig
	fs := flag.NewFlagSet("troupe chaos node", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.role, "role", "", "what the process runs: nats, shop-order, shop-customer, delivery-order, delivery-store or delivery-dispatch")
	fs.StringVar(&c.db, "db", "", "the service's PostgreSQL database URL")
	fs.StringVar(&c.nats, "nats", "", "the NATS server's URL")
	fs.StringVar(&c.addr, "addr", "", "HTTP address to serve on (for nats: the client port)")
	fs.StringVar(&c.dir, "dir", "", "the NATS server's data directory")
	fs.StringVar(&c.storeURL, "store-url", "", "the Store's base URL (delivery-order)")
	fs.StringVar(&c.deliveryURL, "delivery-url", "", "the Delivery service's base URL (delivery-order)")
	fs.Float64Var(&c.duplicate, "duplicate", 0, "share of published messages the broker publishes twice")
	fs.Float64Var(&c.delay, "delay", 0, "share of those copies held back and published later")
	fs.Float64Var(&c.failRate, "fail-rate", 0, "share of deliveries or calls the service fails on purpose, once")
	fs.Uint64Var(&c.seed, "seed", 1, "seed of the injected faults")
	fs.IntVar(&c.customers, "customers", 0, "customers to create on first start (shop-customer)")
	fs.IntVar(&c.agents, "agents", 0, "agents to create on first start (delivery-dispatch)")
	fs.DurationVar(&c.deliverAfter, "deliver-after", 100*time.Millisecond, "how long an agent is out with a placed order")
	fs.StringVar(&c.shopMode, "shop-mode", string(sorder.Orchestrated), "how the shop runs CreateOrder: orchestrated or choreographed")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if _, err := sorder.ParseMode(c.shopMode); err != nil {
		return c, fmt.Errorf("chaos node: --shop-mode: %w", err)
	}
	switch c.role {
	case RoleNATS:
		if c.dir == "" || c.addr == "" {
			return c, errors.New("chaos node: nats needs --dir and --addr")
		}
	case RoleShopOrder, RoleShopCustomer, RoleDeliveryStore, RoleDeliveryDispatch, RoleDeliveryOrder:
		if c.db == "" || c.nats == "" || c.addr == "" {
			return c, fmt.Errorf("chaos node: %s needs --db, --nats and --addr", c.role)
		}
		if c.role == RoleDeliveryOrder && (c.storeURL == "" || c.deliveryURL == "") {
			return c, errors.New("chaos node: delivery-order needs --store-url and --delivery-url")
		}
	default:
		return c, fmt.Errorf("chaos node: unknown role %q", c.role)
	}
	return c, nil
}

// service is a started example service.
type service interface {
	Stop(ctx context.Context) error
	Handler() http.Handler
}

// RunNode runs one process of a chaos run, as the command line args say:
// the NATS server, or one service of an example on its own database. It
// writes "ready" on stdout once it serves, then its NodeStats every 250 ms,
// and runs until ctx ends. The harness (Run) starts these processes and
// kills them.
func RunNode(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseNode(args, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", cfg.role)
	if cfg.role == RoleNATS {
		b, err := natsjs.New(ctx, natsjs.Config{DataDir: cfg.dir, ListenAddr: cfg.addr, Logger: log})
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, readyLine)
		<-ctx.Done()
		return b.Close()
	}

	db, err := sqldb.Open(ctx, cfg.db, &sqldb.Config{MaxConns: 24})
	if err != nil {
		return err
	}
	defer db.Close()
	nb, err := natsjs.New(ctx, natsjs.Config{URL: cfg.nats, Logger: log})
	if err != nil {
		return err
	}
	defer nb.Close()
	fb, err := faulty.Wrap(nb, faulty.Config{Duplicate: cfg.duplicate, Delay: cfg.delay, Reorder: true, Seed: cfg.seed})
	if err != nil {
		return err
	}
	svc, failed, loop, err := startService(ctx, cfg, db, fb, log)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		svc.Stop(sctx)
	}()
	stopAudit, err := startAudit(ctx, db, nb, cfg.role, log)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		stopAudit(sctx)
	}()
	if loop != nil {
		lctx, stopLoop := context.WithCancel(ctx)
		var loops sync.WaitGroup
		loops.Go(func() { loop(lctx) })
		defer loops.Wait() // before the service stops
		defer stopLoop()
	}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: svc.Handler(), ReadHeaderTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { srv.Serve(ln) })
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	fmt.Fprintln(stdout, readyLine)

	report := func() {
		st := fb.Stats()
		b, _ := json.Marshal(NodeStats{Published: st.Published, Duplicated: st.Duplicated, Delayed: st.Delayed, Failed: failed()})
		fmt.Fprintf(stdout, "%s%s\n", statsPrefix, b)
	}
	t := time.NewTicker(statsEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			report()
			return nil
		case <-t.C:
			report()
		}
	}
}

// startService migrates the role's database and starts its service, with
// what the run seeds on first start. failed counts the service's own
// injected failures; loop, when not nil, is work to run beside the service
// until ctx ends.
func startService(ctx context.Context, cfg nodeConfig, db *sqldb.DB, b *faulty.Broker, log *slog.Logger) (svc service, failed func() int, loop func(context.Context), err error) {
	backoff := retry.Exponential{Min: 20 * time.Millisecond, Max: 500 * time.Millisecond}
	none := func() int { return 0 }
	switch cfg.role {
	case RoleShopOrder:
		if err := sorder.Migrate(ctx, db); err != nil {
			return nil, nil, nil, err
		}
		// A short deadline makes the saga send its commands again while a
		// participant is down, so that the participant's barrier, not only
		// its inbox, meets repeated commands.
		s, err := sorder.New(db, b, sorder.Config{Mode: sorder.Mode(cfg.shopMode), Logger: log, Deadline: time.Second})
		if err != nil {
			return nil, nil, nil, err
		}
		return s, none, nil, s.Start(ctx)
	case RoleShopCustomer:
		if err := customer.Migrate(ctx, db); err != nil {
			return nil, nil, nil, err
		}
		s, err := customer.New(db, b, customer.Config{Logger: log, FailRate: cfg.failRate, Seed: cfg.seed, Backoff: backoff.Delay,
			Choreographed: sorder.Mode(cfg.shopMode) == sorder.Choreographed})
		if err != nil {
			return nil, nil, nil, err
		}
		if err := s.Start(ctx); err != nil {
			return nil, nil, nil, err
		}
		if cs, err := s.List(ctx); err != nil || len(cs) > 0 {
			return s, s.Injected, nil, err
		}
		for i := range cfg.customers {
			c := customer.Customer{ID: customerID(i), Name: fmt.Sprintf("Customer %d", i), CreditLimit: customerLimit(i)}
			if err := s.Create(ctx, c); err != nil {
				return s, s.Injected, nil, err
			}
		}
		return s, s.Injected, nil, nil
	case RoleDeliveryOrder:
		if err := dorder.Migrate(ctx, db); err != nil {
			return nil, nil, nil, err
		}
		s, err := dorder.New(db, b, dorder.Config{Logger: log, Menu: dorder.HTTPMenu(cfg.storeURL, nil), DeliveryURL: cfg.deliveryURL,
			Expiry: deliveryExpiry, Deadline: deliveryDeadline, Backoff: backoff.Delay})
		if err != nil {
			return nil, nil, nil, err
		}
		return s, none, nil, s.Start(ctx)
	case RoleDeliveryStore:
		if err := store.Migrate(ctx, db); err != nil {
			return nil, nil, nil, err
		}
		s, err := store.New(db, b, store.Config{Logger: log, FailConfirms: cfg.failRate, Seed: cfg.seed, Backoff: backoff.Delay})
		if err != nil {
			return nil, nil, nil, err
		}
		if err := s.Start(ctx); err != nil {
			return nil, nil, nil, err
		}
		return s, s.Injected, func(ctx context.Context) { restock(ctx, s, log) }, nil
	case RoleDeliveryDispatch:
		if err := dispatch.Migrate(ctx, db); err != nil {
			return nil, nil, nil, err
		}
		s, err := dispatch.New(db, b, dispatch.Config{Logger: log, DeliverAfter: cfg.deliverAfter, Unavailable: cfg.failRate, Seed: cfg.seed})
		if err != nil {
			return nil, nil, nil, err
		}
		if err := s.Start(ctx); err != nil {
			return nil, nil, nil, err
		}
		if as, err := s.Agents(ctx); err != nil || len(as) > 0 {
			return s, s.Injected, nil, err
		}
		ids := make([]string, cfg.agents)
		for i := range ids {
			ids[i] = fmt.Sprintf("agent-%02d", i+1)
		}
		return s, s.Injected, nil, s.AddAgents(ctx, ids...)
	}
	return nil, nil, nil, fmt.Errorf("chaos node: unknown role %q", cfg.role)
}

// restock tops each food up to restockTo free packets once a second, so
// that a long run keeps placing orders instead of selling out, while
// bursts still find some foods sold out.
func restock(ctx context.Context, s *store.Service, log *slog.Logger) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		fs, err := s.Foods(ctx)
		if err != nil && ctx.Err() == nil {
			log.Warn("restock: read the foods", "err", err)
		}
		free := map[string]int{}
		for _, f := range fs {
			free[f.ID] = f.Free
		}
		for _, f := range foods {
			if n := restockTo - free[f.id]; err == nil && n > 0 {
				if err := s.AddFood(ctx, f.id, f.name, n); err != nil && ctx.Err() == nil {
					log.Warn("restock", "food", f.id, "err", err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// customerID and customerLimit name the shop's customers and give their
// credit limits: 2,000.00 to 20,000.00, enough for a long run's orders
// (about 11.00 each) not to exhaust them; the orders over a limit are
// made so on purpose.
func customerID(i int) string { return fmt.Sprintf("cust-%03d", i) }

func customerLimit(i int) int64 { return 200_000 + int64(i%10)*200_000 }
