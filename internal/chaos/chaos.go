package chaos

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/pgcluster"
	"github.com/troupedev/troupe/internal/servicedb"
	"github.com/troupedev/troupe/sqldb"
)

// The examples a run can drive.
const (
	Shop     = "shop"
	Delivery = "delivery"
)

// The kinds of fault the harness injects itself. The message faults
// (duplicates, delays, reordering) and the services' own injected
// failures are made inside the node processes and counted in NodeStats.
const (
	FaultKill     = "kill -9 of a service process"
	FaultBroker   = "kill -9 of the NATS server process"
	FaultPostgres = "PostgreSQL crash (pg_ctl stop -m immediate, start)"
)

// FaultKinds lists the harness's fault kinds, in the order a report
// shows them.
var FaultKinds = []string{FaultKill, FaultBroker, FaultPostgres}

// Config configures a run. The zero value gives the defaults.
type Config struct {
	// Duration is how long the workload runs while faults are injected.
	// Default 2 minutes.
	Duration time.Duration
	// Seed makes the workload and the fault schedule repeatable: the same
	// seed gives the same faults in the same order at the same moments
	// (the processes' interleaving still varies). Default: taken from the
	// clock, and reported.
	Seed uint64
	// Examples are the examples run, of Shop and Delivery. Default both.
	Examples []string
	// ShopMode is how the shop runs CreateOrder: as an orchestrated saga
	// or as a choreography of events. Default orchestrated.
	ShopMode order.Mode
	// Clients is how many clients place orders at once, per example.
	// Default 6.
	Clients int
	// FaultEvery is the mean time between two faults the harness injects.
	// Default 3 s.
	FaultEvery time.Duration
	// Duplicate is the share of messages each service's broker publishes
	// twice (half of those copies late, every batch shuffled). Default
	// 0.05.
	Duplicate float64
	// FailRate is the share of deliveries and calls the services fail on
	// purpose, once. Default 0.03.
	FailRate float64
	// QuiesceTimeout bounds the wait, after the workload, for every order
	// and saga to end. Default 3 minutes.
	QuiesceTimeout time.Duration
	// Dir keeps the run's files: each process's log, the NATS server's
	// data. Default: a temporary directory, removed after a run without
	// violations.
	Dir string
	// Command makes the command that runs a node process with the given
	// arguments (RunNode's). Default: this executable with "chaos node".
	Command func(args ...string) *exec.Cmd
	// Progress receives a line every 10 s while the workload runs.
	// Default: none.
	Progress io.Writer
}

func (c Config) withDefaults() (Config, error) {
	if c.Duration == 0 {
		c.Duration = 2 * time.Minute
	}
	if c.Seed == 0 {
		c.Seed = uint64(time.Now().UnixNano())
	}
	if len(c.Examples) == 0 {
		c.Examples = []string{Shop, Delivery}
	}
	if c.ShopMode == "" {
		c.ShopMode = order.Orchestrated
	}
	if c.Clients == 0 {
		c.Clients = 6
	}
	if c.FaultEvery == 0 {
		c.FaultEvery = 3 * time.Second
	}
	if c.Duplicate == 0 {
		c.Duplicate = 0.05
	}
	if c.FailRate == 0 {
		c.FailRate = 0.03
	}
	if c.QuiesceTimeout == 0 {
		c.QuiesceTimeout = 3 * time.Minute
	}
	if c.Command == nil {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("chaos: find this executable to run the nodes: %w", err)
		}
		c.Command = func(args ...string) *exec.Cmd {
			return exec.Command(exe, append([]string{"chaos", "node"}, args...)...)
		}
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	var errs []error
	if c.Duration < 0 || c.FaultEvery < 0 || c.QuiesceTimeout < 0 {
		errs = append(errs, fmt.Errorf("Duration %v, FaultEvery %v and QuiesceTimeout %v must not be negative", c.Duration, c.FaultEvery, c.QuiesceTimeout))
	}
	if c.Clients < 0 {
		errs = append(errs, fmt.Errorf("Clients %d is negative", c.Clients))
	}
	if c.Duplicate < 0 || c.Duplicate > 1 || c.FailRate < 0 || c.FailRate > 1 {
		errs = append(errs, fmt.Errorf("Duplicate %v and FailRate %v must be within 0..1", c.Duplicate, c.FailRate))
	}
	if _, err := order.ParseMode(string(c.ShopMode)); err != nil {
		errs = append(errs, err)
	}
	for _, e := range c.Examples {
		if e != Shop && e != Delivery {
			errs = append(errs, fmt.Errorf("unknown example %q (have %q and %q)", e, Shop, Delivery))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return c, fmt.Errorf("chaos: %w", err)
	}
	return c, nil
}

// run is one chaos run in progress.
type run struct {
	cfg     Config
	dir     string
	pg      *pgcluster.Cluster
	dbs     *servicedb.Set
	nats    *proc
	procs   map[string]*proc // the services, by role
	roles   []string         // the services' roles, in a fixed order
	urls    map[string]string
	natsURL string
	clients []*client

	mu     sync.Mutex
	faults map[string]int
	killed map[string]int // kills by role
}

// Run starts PostgreSQL, the NATS server and every service of the
// configured examples as separate processes, drives the workload for
// Duration while injecting faults on a seeded schedule, waits for the
// system to quiesce, and checks the invariants from the databases'
// contents. The returned Report's Violations must be empty; an error is a
// run that could not be carried out.
func Run(ctx context.Context, cfg Config) (_ *Report, err error) {
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	r := &run{cfg: cfg, procs: map[string]*proc{}, urls: map[string]string{}, faults: map[string]int{}, killed: map[string]int{}}
	rep := &Report{Seed: cfg.Seed, Duration: cfg.Duration, Examples: cfg.Examples, ShopMode: cfg.ShopMode, Faults: map[string]int{}}
	if r.dir = cfg.Dir; r.dir == "" {
		if r.dir, err = os.MkdirTemp("", "troupe-chaos-*"); err != nil {
			return nil, err
		}
	}
	rep.Dir = r.dir
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w (the processes' logs are in %s)", err, r.dir)
		}
	}()
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var supervisors sync.WaitGroup
	defer func() {
		cancel()
		supervisors.Wait()
		r.close()
	}()

	if err := r.startDatabases(runCtx); err != nil {
		return nil, err
	}
	rep.Setup = fmt.Sprintf("PostgreSQL on 127.0.0.1:%d (fsync on), one database per service; NATS JetStream in a process of its own; each service a process of its own",
		r.pg.Port())
	if err := r.startProcesses(runCtx, &supervisors); err != nil {
		return nil, err
	}

	// The workload and the faults, for Duration.
	wctx, stopWork := context.WithTimeout(runCtx, cfg.Duration)
	defer stopWork()
	start := time.Now()
	var work sync.WaitGroup
	for _, c := range r.clients {
		work.Go(func() { c.run(wctx) })
	}
	var faultErr error
	work.Go(func() { faultErr = r.injectFaults(wctx) })
	work.Go(func() { r.progress(wctx, start) })
	work.Wait()
	if faultErr != nil {
		return nil, faultErr
	}
	rep.Worked = time.Since(start)

	// Quiescence: every process up, then every order and saga ended.
	qstart := time.Now()
	qctx, stopQuiesce := context.WithTimeout(runCtx, cfg.QuiesceTimeout)
	defer stopQuiesce()
	for _, p := range r.all() {
		if err := p.waitReady(qctx); err != nil {
			return nil, fmt.Errorf("chaos: after the workload: %w", err)
		}
	}
	live, err := r.quiesce(qctx)
	if err != nil {
		return nil, err
	}
	rep.Quiesce = time.Since(qstart)
	rep.Violations = append(rep.Violations, live...)
	if len(live) > 0 {
		rep.Stuck = r.unfinished(runCtx)
	}
	safety, err := r.check(runCtx, false)
	if err != nil {
		return nil, err
	}
	rep.Violations = append(rep.Violations, safety...)
	lost, err := r.checkAcknowledged(runCtx)
	if err != nil {
		return nil, err
	}
	rep.Violations = append(rep.Violations, lost...)
	for _, c := range r.clients {
		for _, t := range c.replays() {
			rep.Violations = append(rep.Violations, c.example+": "+InvOneOrderPerKey+": "+t)
		}
	}
	if rep.Counts, err = r.count(runCtx); err != nil {
		return nil, err
	}
	if rep.DeadLettered, err = r.deadLettered(runCtx); err != nil {
		return nil, err
	}

	for _, p := range r.all() {
		p.stop()
	}
	r.mu.Lock()
	for k, n := range r.faults {
		rep.Faults[k] = n
	}
	rep.Kills = map[string]int{}
	for k, n := range r.killed {
		rep.Kills[k] = n
	}
	r.mu.Unlock()
	for _, c := range r.clients {
		rep.Clients = rep.Clients.add(c.stats())
	}
	for _, p := range r.all() {
		st, _, exits := p.summary()
		rep.Messages = rep.Messages.add(st)
		rep.Exits = append(rep.Exits, exits...)
	}
	if len(rep.Violations) == 0 && cfg.Dir == "" {
		os.RemoveAll(r.dir)
		rep.Dir = ""
	}
	return rep, nil
}

// startDatabases starts the PostgreSQL server and creates a database for
// each service.
func (r *run) startDatabases(ctx context.Context) error {
	pg, err := pgcluster.Start(ctx, pgcluster.Config{})
	if err != nil {
		return err
	}
	r.pg = pg
	dbs, err := servicedb.Open(ctx, servicedb.Config{Postgres: pg.URL("postgres"), Prefix: "chaos_", MaxConns: r.maxConns()}, r.services()...)
	if err != nil {
		return err
	}
	r.dbs = dbs
	return nil
}

func (r *run) maxConns() map[string]int {
	m := map[string]int{}
	for _, s := range r.services() {
		m[s] = 4
	}
	return m
}

// services returns the databases' names: one per service process.
func (r *run) services() []string {
	var out []string
	for _, e := range r.cfg.Examples {
		switch e {
		case Shop:
			out = append(out, RoleShopOrder, RoleShopCustomer)
		case Delivery:
			out = append(out, RoleDeliveryOrder, RoleDeliveryStore, RoleDeliveryDispatch)
		}
	}
	return out
}

// db returns the harness's own connection to role's database.
func (r *run) db(role string) *sqldb.DB { return r.dbs.DBs[role] }

// startProcesses starts the NATS server and the services, each supervised,
// and waits until they all serve.
func (r *run) startProcesses(ctx context.Context, supervisors *sync.WaitGroup) error {
	natsAddr, err := freeAddr()
	if err != nil {
		return err
	}
	natsURL := "nats://" + natsAddr
	r.natsURL = natsURL
	r.nats = newProc(RoleNATS, (&nodeConfig{role: RoleNATS, addr: natsAddr, dir: filepath.Join(r.dir, "nats")}).args(),
		r.cfg.Command, filepath.Join(r.dir, "nats.log"))
	r.roles = r.services()
	for _, role := range r.roles {
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		r.urls[role] = "http://" + addr
	}
	rng := rand.New(rand.NewPCG(r.cfg.Seed, 1))
	for i, role := range r.roles {
		nc := &nodeConfig{
			role: role, db: r.pg.URL(r.dbs.Names[role]), nats: natsURL, addr: strings.TrimPrefix(r.urls[role], "http://"),
			duplicate: r.cfg.Duplicate, delay: 0.5, failRate: r.cfg.FailRate, seed: r.cfg.Seed + uint64(i+1),
			customers: shopCustomers, agents: deliveryAgents, deliverAfter: 100 * time.Millisecond, shopMode: string(r.cfg.ShopMode),
		}
		if role == RoleDeliveryOrder {
			nc.storeURL, nc.deliveryURL = r.urls[RoleDeliveryStore], r.urls[RoleDeliveryDispatch]
		}
		r.procs[role] = newProc(role, nc.args(), r.cfg.Command, filepath.Join(r.dir, role+".log"))
	}
	supervisors.Go(func() { r.nats.supervise(ctx) })
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := r.nats.waitReady(sctx); err != nil {
		return fmt.Errorf("chaos: %w (see %s)", err, r.nats.logPath)
	}
	for _, role := range r.roles {
		p := r.procs[role]
		supervisors.Go(func() { p.supervise(ctx) })
		if err := p.waitReady(sctx); err != nil {
			return fmt.Errorf("chaos: %w (see %s)", err, p.logPath)
		}
	}
	for _, e := range r.cfg.Examples {
		for i := range r.cfg.Clients {
			r.clients = append(r.clients, newClient(fmt.Sprintf("%s-client-%d", e, i), e, r.urls, rand.New(rand.NewPCG(rng.Uint64(), uint64(i)))))
		}
	}
	return nil
}

// all returns every process: the broker, then the services.
func (r *run) all() []*proc {
	out := []*proc{r.nats}
	for _, role := range r.roles {
		out = append(out, r.procs[role])
	}
	return out
}

// injectFaults injects a fault at seeded moments until ctx ends: each
// kind once in the first rounds, in a seeded order, then a seeded choice.
// Faults do not overlap: each waits until what it hit serves again.
func (r *run) injectFaults(ctx context.Context) error {
	rng := rand.New(rand.NewPCG(r.cfg.Seed, 2))
	first := slices.Clone(FaultKinds)
	rng.Shuffle(len(first), func(i, j int) { first[i], first[j] = first[j], first[i] })
	for n := 0; ; n++ {
		gap := time.Duration((0.5 + rng.Float64()) * float64(r.cfg.FaultEvery))
		if !wait(ctx, gap) {
			return nil
		}
		kind := ""
		if n < len(first) {
			kind = first[n]
		} else {
			switch x := rng.IntN(10); {
			case x < 6:
				kind = FaultKill
			case x < 8:
				kind = FaultBroker
			default:
				kind = FaultPostgres
			}
		}
		downtime := time.Duration(rng.Int64N(int64(2 * time.Second)))
		victim := r.roles[rng.IntN(len(r.roles))]
		// Recovery is not bounded by the workload's end: a fault begun is
		// carried through, so that quiescence starts with every process up.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		var err error
		switch kind {
		case FaultKill:
			err = r.procs[victim].kill(fctx, downtime)
		case FaultBroker:
			err = r.nats.kill(fctx, downtime)
		case FaultPostgres:
			err = r.pg.Crash(fctx)
		}
		cancel()
		if err != nil {
			return fmt.Errorf("chaos: inject %s: %w", kind, err)
		}
		r.mu.Lock()
		r.faults[kind]++
		if kind == FaultKill {
			r.killed[victim]++
		}
		r.mu.Unlock()
	}
}

// progress writes a line every 10 s until ctx ends.
func (r *run) progress(ctx context.Context, start time.Time) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var cs ClientStats
		for _, c := range r.clients {
			cs = cs.add(c.stats())
		}
		r.mu.Lock()
		f := fmt.Sprintf("%d kills, %d broker kills, %d PostgreSQL crashes", r.faults[FaultKill], r.faults[FaultBroker], r.faults[FaultPostgres])
		r.mu.Unlock()
		fmt.Fprintf(r.cfg.Progress, "  %3.0fs  %d orders taken, %d ended, %d requests failed while a process was down; faults: %s\n",
			time.Since(start).Seconds(), cs.Taken, cs.Ended, cs.Failed, f)
	}
}

// close stops whatever is still running and closes the harness's
// connections.
func (r *run) close() {
	if r.dbs != nil {
		r.dbs.Close()
	}
	if r.pg != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		r.pg.Stop(ctx)
		cancel()
	}
}

// freeAddr returns a free loopback address.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
