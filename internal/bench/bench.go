// Package bench runs Troupe's user-facing benchmarks (`troupe bench NAME`)
// and reports throughput and latency percentiles beside the configuration
// that produced them.
package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// Config is what every benchmark accepts. Benchmarks ignore fields that do
// not apply to them and say so in their result's Notes.
type Config struct {
	// DB is the database kind: "sqlite" or "postgres". Default "sqlite".
	DB string `json:"db"`
	// PostgresURL is the server to use with DB "postgres". Empty starts a
	// throwaway cluster from the installed PostgreSQL binaries.
	PostgresURL string `json:"-"`
	// Broker is "nats" (embedded), "nats://host:port", "kafka" (in-process
	// cluster) or "kafka://host:port[,host:port]". Default "nats".
	Broker string `json:"broker"`
	// Duration is how long the measured phase runs. Default 5s.
	Duration time.Duration `json:"-"`
	// Concurrency is the number of concurrent workers. Default 4.
	Concurrency int `json:"concurrency"`
	// Batch is the number of operations per batch, where a benchmark
	// batches. Default 100.
	Batch int `json:"batch"`
	// Rate is the total operations per second offered across all workers,
	// where a benchmark paces itself; 0 runs as fast as possible. With a
	// rate, latency is measured from when each batch was due, so a stall
	// counts against every batch it delayed.
	Rate int `json:"rate"`
	// Mode selects a variant of the benchmark, where it has several: for
	// outbox, the relay mode "poll", "notify" (the default) or "wal".
	// Empty gives the benchmark's default.
	Mode string `json:"mode,omitempty"`
	// SQLiteFullSync runs SQLite with synchronous=FULL: every commit waits
	// for its fsync, so it survives a power loss too. Default false:
	// synchronous=NORMAL, durable against a crash of the process only.
	SQLiteFullSync bool `json:"sqlite_full_sync,omitempty"`
	// DataDir holds the benchmark's files; empty uses a temporary directory
	// removed afterwards.
	DataDir string `json:"-"`
	// Progress receives progress lines; nil discards them.
	Progress io.Writer `json:"-"`
}

// WithDefaults returns cfg with unset fields given their defaults.
func (cfg Config) WithDefaults() Config {
	if cfg.DB == "" {
		cfg.DB = "sqlite"
	}
	if cfg.Broker == "" {
		cfg.Broker = "nats"
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 5 * time.Second
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 4
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 100
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	return cfg
}

// Validate reports every problem with cfg at once.
func (cfg Config) Validate() error {
	var errs []string
	if cfg.DB != "sqlite" && cfg.DB != "postgres" {
		errs = append(errs, fmt.Sprintf("--db %q: want sqlite or postgres", cfg.DB))
	}
	if cfg.Rate < 0 {
		errs = append(errs, fmt.Sprintf("--rate %d: want 0 (as fast as possible) or a positive rate", cfg.Rate))
	}
	if cfg.PostgresURL != "" && cfg.DB != "postgres" {
		errs = append(errs, "--postgres needs --db postgres")
	}
	if len(errs) > 0 {
		return fmt.Errorf("bench: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Result is one benchmark's outcome. Its JSON form is the last line of
// `troupe bench --json`.
type Result struct {
	// Name is the benchmark's name.
	Name string `json:"name"`
	// Ops is the number of completed operations in the measured phase.
	Ops int64 `json:"ops"`
	// Errors is the number of failed operations.
	Errors int64 `json:"errors"`
	// Seconds is the measured phase's length.
	Seconds float64 `json:"seconds"`
	// ThroughputPerS is Ops / Seconds.
	ThroughputPerS float64 `json:"throughput_per_s"`
	// P50Ms, P90Ms, P99Ms and MaxMs are latency percentiles in milliseconds.
	P50Ms float64 `json:"p50_ms"`
	P90Ms float64 `json:"p90_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
	// OfferedPerS is the rate asked for with --rate; 0 when unpaced.
	OfferedPerS float64 `json:"offered_per_s,omitempty"`
	// OmittedOps counts operations that were due before the end of a paced
	// run but never started, because the system could not keep up: the
	// offered rate was not reached, and their latency is missing from the
	// percentiles.
	OmittedOps int64 `json:"omitted_ops,omitempty"`
	// Unit names what one operation is ("message", "saga", ...).
	Unit string `json:"unit"`
	// Latency says what the latency measures.
	Latency string `json:"latency"`
	// Config is the configuration that produced the figures.
	Config Config `json:"config"`
	// Duration is Config.Duration as text.
	Duration string `json:"duration"`
	// GOMAXPROCS and NumCPU describe the machine's parallelism.
	GOMAXPROCS int `json:"gomaxprocs"`
	NumCPU     int `json:"num_cpu"`
	// GoVersion is the runtime's version.
	GoVersion string `json:"go_version"`
	// Notes holds anything else needed to read the figures (storage mode,
	// sync settings, fields of Config that did not apply).
	Notes []string `json:"notes,omitempty"`
}

// Benchmark is one runnable benchmark.
type Benchmark struct {
	// Name is the name used on the command line.
	Name string
	// Summary is one line for `troupe bench` without a name.
	Summary string
	// Run performs the benchmark.
	Run func(ctx context.Context, cfg Config) (*Result, error)
}

// Run runs b with cfg (defaults applied) and fills in the common fields of
// its result.
func Run(ctx context.Context, b Benchmark, cfg Config) (*Result, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	r, err := b.Run(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("bench %s: %w", b.Name, err)
	}
	r.Name = b.Name
	if cfg.Rate > 0 {
		r.OfferedPerS = float64(cfg.Rate)
	}
	r.Config = cfg
	r.Duration = cfg.Duration.String()
	r.GOMAXPROCS = runtime.GOMAXPROCS(0)
	r.NumCPU = runtime.NumCPU()
	r.GoVersion = runtime.Version()
	if r.Seconds > 0 {
		r.ThroughputPerS = float64(r.Ops) / r.Seconds
	}
	return r, nil
}

// Recorder collects latency samples from concurrent workers.
type Recorder struct {
	mu      sync.Mutex
	samples []time.Duration
	errors  int64
	omitted int64
}

// Omit counts n operations that were due but never started.
func (r *Recorder) Omit(n int) {
	r.mu.Lock()
	r.omitted += int64(n)
	r.mu.Unlock()
}

// Observe records one operation's latency.
func (r *Recorder) Observe(d time.Duration) {
	r.mu.Lock()
	r.samples = append(r.samples, d)
	r.mu.Unlock()
}

// ObserveN records n operations that shared one latency (a batch).
func (r *Recorder) ObserveN(d time.Duration, n int) {
	r.mu.Lock()
	for range n {
		r.samples = append(r.samples, d)
	}
	r.mu.Unlock()
}

// Error counts one failed operation.
func (r *Recorder) Error() {
	r.mu.Lock()
	r.errors++
	r.mu.Unlock()
}

// Fill sets r's counts and percentiles on res, for a measured phase of
// elapsed.
func (r *Recorder) Fill(res *Result, elapsed time.Duration) {
	r.mu.Lock()
	s := slices.Clone(r.samples)
	res.Errors = r.errors
	res.OmittedOps = r.omitted
	r.mu.Unlock()
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	res.Ops = int64(len(s))
	res.Seconds = elapsed.Seconds()
	res.P50Ms = ms(percentile(s, 0.50))
	res.P90Ms = ms(percentile(s, 0.90))
	res.P99Ms = ms(percentile(s, 0.99))
	if len(s) > 0 {
		res.MaxMs = ms(s[len(s)-1])
	}
}

// percentile returns the q-quantile of sorted samples (nearest rank).
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// WriteTable writes r for people: a small aligned table.
func WriteTable(w io.Writer, r *Result) {
	fmt.Fprintf(w, "%-18s %s\n", "benchmark", r.Name)
	fmt.Fprintf(w, "%-18s %d %ss in %.2fs (%d errors)\n", "completed", r.Ops, r.Unit, r.Seconds, r.Errors)
	fmt.Fprintf(w, "%-18s %.0f %ss/s\n", "throughput", r.ThroughputPerS, r.Unit)
	if r.OfferedPerS > 0 {
		fmt.Fprintf(w, "%-18s %.0f %ss/s offered; %d due but never started (not in the percentiles)\n", "rate", r.OfferedPerS, r.Unit, r.OmittedOps)
	}
	fmt.Fprintf(w, "%-18s p50 %.2f ms   p90 %.2f ms   p99 %.2f ms   max %.2f ms\n", "latency", r.P50Ms, r.P90Ms, r.P99Ms, r.MaxMs)
	fmt.Fprintf(w, "%-18s %s\n", "latency measures", r.Latency)
	rate := "max"
	if r.Config.Rate > 0 {
		rate = fmt.Sprintf("%d/s", r.Config.Rate)
	}
	fmt.Fprintf(w, "%-18s db=%s broker=%s duration=%s concurrency=%d batch=%d rate=%s GOMAXPROCS=%d CPUs=%d %s\n",
		"configuration", r.Config.DB, r.Config.Broker, r.Duration, r.Config.Concurrency, r.Config.Batch, rate, r.GOMAXPROCS, r.NumCPU, r.GoVersion)
	for _, n := range r.Notes {
		fmt.Fprintf(w, "%-18s %s\n", "note", n)
	}
}

// WriteJSON writes r as one line of JSON.
func WriteJSON(w io.Writer, r *Result) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// runPaced runs cfg.Concurrency workers from start until start +
// cfg.Duration, each calling the function newWorker returns for it once per
// batch, when the batch is due (paced by cfg.Rate; back to back without
// one). Worker w starts w milliseconds after start, so paced workers do not
// all fire at once. Batches that fell due but never started are counted on
// rec. runPaced returns when every worker has stopped.
func runPaced(ctx context.Context, cfg Config, start time.Time, rec *Recorder, newWorker func(w int) func(due time.Time)) {
	deadline := start.Add(cfg.Duration)
	var wg sync.WaitGroup
	for w := range cfg.Concurrency {
		batch := newWorker(w)
		wg.Go(func() {
			pace := NewPacer(cfg, start.Add(time.Duration(w)*time.Millisecond))
			defer func() { rec.Omit(pace.Missed(deadline) * cfg.Batch) }()
			for time.Now().Before(deadline) {
				due, ok := pace.Wait(ctx)
				if !ok || !due.Before(deadline) {
					return
				}
				batch(due)
			}
		})
	}
	wg.Wait()
}

// Pacer spaces one worker's batches so that all workers together offer
// cfg.Rate operations per second. Without a rate it never waits.
type Pacer struct {
	interval time.Duration
	next     time.Time
}

// NewPacer returns the pacer of one of cfg.Concurrency workers sending
// batches of cfg.Batch, starting at start.
func NewPacer(cfg Config, start time.Time) *Pacer {
	p := &Pacer{next: start}
	if cfg.Rate > 0 {
		p.interval = time.Duration(float64(time.Second) * float64(cfg.Batch*cfg.Concurrency) / float64(cfg.Rate))
	}
	return p
}

// Missed returns how many batches fell due before deadline but were never
// sent: the worker stopped behind its schedule.
func (p *Pacer) Missed(deadline time.Time) int {
	if p.interval == 0 || !p.next.Before(deadline) {
		return 0
	}
	return int((deadline.Sub(p.next) + p.interval - 1) / p.interval)
}

// Wait waits until the next batch is due and returns when it was due: the
// time to measure its latency from. It returns false when ctx ends first.
func (p *Pacer) Wait(ctx context.Context) (due time.Time, ok bool) {
	if p.interval == 0 {
		return time.Now(), ctx.Err() == nil
	}
	due = p.next
	p.next = p.next.Add(p.interval)
	if d := time.Until(due); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return due, false
		}
	}
	return due, ctx.Err() == nil
}
