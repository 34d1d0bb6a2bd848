// Package cli implements the troupe command. Commands write to the writers
// they are given, so they can be tested; main only wires them to the process.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"sort"
	"strings"
	"time"

	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/bench"
	"github.com/troupedev/troupe/internal/chaos"
	"github.com/troupedev/troupe/internal/demo"
)

const usage = `troupe keeps data consistent across services that each own a database.

Usage:
  troupe demo [flags]          run the demo on embedded defaults (SQLite, embedded NATS JetStream): the online shop
  troupe demo delivery [flags] run the food-delivery demo: expiring reservations of packets and agents
  troupe bench [NAME] [flags]  run a benchmark; without NAME, list them
  troupe chaos [flags]         run the examples as separate processes, kill and restart them, the broker and
                               PostgreSQL on a seeded schedule, then check the invariants; last line "violations: N"
  troupe version               print the version

Run "troupe COMMAND -h" for a command's flags.
`

// Main runs the troupe command with args (without the program name) and
// returns the process exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "demo":
		err = runDemo(ctx, args[1:], stdout, stderr)
	case "bench":
		err = runBench(ctx, args[1:], stdout, stderr)
	case "chaos":
		err = runChaos(ctx, args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "troupe", version())
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "troupe: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "troupe %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "delivery" {
		return runDeliveryDemo(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("troupe demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg demo.Config
	var mode string
	fs.StringVar(&cfg.DataDir, "data-dir", "", "keep the demo's databases and broker files here (default: a temporary directory, removed at the end)")
	fs.StringVar(&cfg.Postgres, "postgres", "", "run on PostgreSQL: URL of a server database on which the role may create databases (each service gets a fresh one, dropped at the end)")
	fs.StringVar(&mode, "mode", "orchestrated", "how CreateOrder runs: orchestrated (a saga) or choreographed (events)")
	fs.IntVar(&cfg.Orders, "orders", 2000, "how many orders the demo places")
	fs.IntVar(&cfg.Clients, "clients", 16, "how many clients place orders at once")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "seed of the workload and the injected faults")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	m, err := order.ParseMode(mode)
	if err != nil {
		return err
	}
	cfg.Mode, cfg.Out = m, stdout
	return demo.Run(ctx, cfg)
}

func runDeliveryDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("troupe demo delivery", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg demo.DeliveryConfig
	fs.StringVar(&cfg.DataDir, "data-dir", "", "keep the demo's databases and broker files here (default: a temporary directory, removed at the end)")
	fs.StringVar(&cfg.Postgres, "postgres", "", "run on PostgreSQL: URL of a server database on which the role may create databases (each service gets a fresh one, dropped at the end)")
	fs.IntVar(&cfg.Orders, "orders", 600, "how many orders the demo places")
	fs.IntVar(&cfg.Clients, "clients", 16, "how many clients place orders at once")
	fs.IntVar(&cfg.Packets, "packets", 300, "how many food packets the Store has, shared among 3 foods")
	fs.IntVar(&cfg.Agents, "agents", 10, "how many delivery agents there are")
	fs.DurationVar(&cfg.DeliverAfter, "deliver-after", 50*time.Millisecond, "how long an agent is out with a placed order before it is free again")
	fs.Uint64Var(&cfg.Seed, "seed", 1, "seed of the workload and the injected faults")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	return demo.RunDelivery(ctx, stdout, cfg)
}

func benchmarks() map[string]bench.Benchmark {
	m := map[string]bench.Benchmark{}
	for _, b := range []bench.Benchmark{bench.Broker(), bench.Commit(), bench.Outbox(), bench.Inbox(), bench.Saga(), bench.Delivery(), bench.Timer(bench.TimerOptions{})} {
		m[b.Name] = b
	}
	return m
}

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	all := benchmarks()
	if len(args) == 0 || strings.HasPrefix(args[0], "-") && (args[0] == "-h" || args[0] == "--help") {
		names := make([]string, 0, len(all))
		for n := range all {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintln(stdout, "Usage: troupe bench NAME [--db sqlite|postgres] [--postgres URL] [--broker SPEC] [--duration D] [--concurrency N] [--batch N] [--rate N] [--sqlite-sync normal|full] [--mode poll|notify|wal|drain|steady] [--pending N] [--target handler|topic] [--json]")
		fmt.Fprintln(stdout, "\nBenchmarks:")
		for _, n := range names {
			fmt.Fprintf(stdout, "  %-10s %s\n", n, all[n].Summary)
		}
		return nil
	}
	b, ok := all[args[0]]
	if !ok {
		return fmt.Errorf("unknown benchmark %q (run \"troupe bench\" for the list)", args[0])
	}
	fs := flag.NewFlagSet("troupe bench "+b.Name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg bench.Config
	var asJSON bool
	fs.StringVar(&cfg.DB, "db", "sqlite", "database: sqlite or postgres")
	fs.StringVar(&cfg.PostgresURL, "postgres", "", "PostgreSQL URL for --db postgres (default: start a throwaway cluster from the installed binaries)")
	fs.StringVar(&cfg.Broker, "broker", "nats", "broker: nats (embedded), nats://HOST:PORT, kafka (in-process cluster), kafka://HOST:PORT[,...]")
	fs.DurationVar(&cfg.Duration, "duration", 5*time.Second, "length of the measured phase")
	fs.IntVar(&cfg.Concurrency, "concurrency", 4, "concurrent workers")
	fs.IntVar(&cfg.Batch, "batch", 100, "operations per batch, where the benchmark batches")
	fs.StringVar(&cfg.Mode, "mode", "", "relay mode for the outbox benchmark: poll, notify (default) or wal (PostgreSQL only); for the timer benchmark: drain (default) or steady")
	fs.IntVar(&cfg.Rate, "rate", 0, "operations per second offered across all workers (0: as fast as possible); latency then counts from when each batch was due")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory for the benchmark's files (default: a temporary directory)")
	sqliteSync := fs.String("sqlite-sync", "normal", "SQLite durability: normal (WAL, no fsync per commit: survives a crash of the process) or full (an fsync per commit: survives a power loss)")
	fs.BoolVar(&asJSON, "json", false, "print the result as one JSON object on the last line")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the run (this process: the services and clients, not the database server) to this file")
	var timerOpts bench.TimerOptions
	if b.Name == "timer" {
		fs.IntVar(&timerOpts.Pending, "pending", 0, "timers loaded before the schedulers start (default 100000 with --mode drain, 1000000 with --mode steady)")
		fs.StringVar(&timerOpts.Target, "target", bench.TimerHandler, "what the timers fire into: handler (a local handler inserting a row) or topic (the outbox)")
	}
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	switch *sqliteSync {
	case "normal":
	case "full":
		cfg.SQLiteFullSync = true
	default:
		return fmt.Errorf("--sqlite-sync %q: want normal or full", *sqliteSync)
	}
	if b.Name == "timer" {
		b = bench.Timer(timerOpts)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	cfg.Progress = stderr
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	res, err := bench.Run(ctx, b, cfg)
	if err != nil {
		return err
	}
	if asJSON {
		return bench.WriteJSON(stdout, res)
	}
	bench.WriteTable(stdout, res)
	return nil
}

// errViolations is the error of a chaos run that found violations: the
// report has said what they are.
var errViolations = errors.New("invariants violated")

func runChaos(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "node" {
		return chaos.RunNode(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("troupe chaos", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg chaos.Config
	fs.DurationVar(&cfg.Duration, "duration", 2*time.Minute, "how long the workload runs while faults are injected")
	fs.Uint64Var(&cfg.Seed, "seed", 0, "seed of the workload and the fault schedule (default: from the clock; the report prints it)")
	examples := fs.String("examples", "shop,delivery", "examples to run: shop, delivery, or both")
	shopMode := fs.String("shop-mode", string(order.Orchestrated), "how the shop runs CreateOrder: orchestrated (a saga) or choreographed (events)")
	fs.IntVar(&cfg.Clients, "clients", 6, "clients placing orders at once, per example")
	fs.DurationVar(&cfg.FaultEvery, "fault-every", 3*time.Second, "mean time between two process faults")
	fs.Float64Var(&cfg.Duplicate, "duplicate", 0.05, "share of messages each service's broker publishes twice")
	fs.Float64Var(&cfg.FailRate, "fail-rate", 0.03, "share of deliveries and calls the services fail on purpose, once")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for the processes' logs and the broker's files (default: a temporary one, kept only when violations are found)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	cfg.Examples = strings.Split(*examples, ",")
	cfg.ShopMode = order.Mode(*shopMode)
	cfg.Progress = stdout
	fmt.Fprintf(stdout, "troupe chaos: %v of orders while processes are killed; seed %s\n", cfg.Duration, seedText(cfg.Seed))
	rep, err := chaos.Run(ctx, cfg)
	if err != nil {
		return err
	}
	rep.Write(stdout)
	if len(rep.Violations) > 0 {
		return fmt.Errorf("%w: %d (seed %d)", errViolations, len(rep.Violations), rep.Seed)
	}
	return nil
}

func seedText(seed uint64) string {
	if seed == 0 {
		return "from the clock"
	}
	return fmt.Sprint(seed)
}
