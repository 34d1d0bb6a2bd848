package timer

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/troupedev/troupe/retry"
)

// Clock tells the time and waits. The scheduler reads every time through it
// (what is due, retry delays, HTTP leases), so tests move time forward
// instead of sleeping.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// After returns a channel that receives the time once d has passed.
	After(d time.Duration) <-chan time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Defaults of Config fields.
const (
	DefaultBatchSize       = 500
	DefaultPollInterval    = 500 * time.Millisecond
	DefaultLeaseTTL        = 30 * time.Second
	DefaultPastTolerance   = time.Second
	DefaultMaxAttempts     = 10
	DefaultHTTPConcurrency = 8
	DefaultHTTPTimeout     = 10 * time.Second
	DefaultMinBackoff      = time.Second
	DefaultMaxBackoff      = 5 * time.Minute
)

// ErrInvalidConfig is matched by the error New returns for a bad Config.
var ErrInvalidConfig = errors.New("timer: invalid config")

// Config tunes a Scheduler. The zero value gives the defaults.
type Config struct {
	// Clock is read for every time the scheduler uses. Default: the system
	// clock.
	Clock Clock

	// Logger receives handler failures, HTTP failures and loop errors.
	// Default: discard.
	Logger *slog.Logger

	// Owner names this scheduler in logs and in HTTP leases. Default: host
	// name and process id.
	Owner string

	// BatchSize is the most timers one transaction fires. Default 500.
	BatchSize int

	// PollInterval is the longest the scheduler waits before looking for
	// due timers again. It waits less when it knows of a timer due sooner,
	// or when Notify wakes it; so PollInterval matters only for timers that
	// another process scheduled to fall due before this one's next look.
	// Default 500 ms.
	PollInterval time.Duration

	// LeaseTTL bounds how long a claim lasts without its holder. A batch
	// fired in a transaction holds its timers' row locks; on PostgreSQL the
	// transaction is ended by the server if it sits idle for LeaseTTL (a
	// hung or partitioned holder), and at once if the holder's process
	// dies. An HTTP task is leased for LeaseTTL while its call runs; a
	// holder that dies mid-call is replaced after LeaseTTL, which must
	// exceed the longest HTTP timeout. Default 30 s.
	LeaseTTL time.Duration

	// PastTolerance is how far in the past a due time given to ScheduleTx
	// may lie and still count as "now" (the caller computed it a moment
	// ago). An earlier time is refused with ErrInPast. Default 1 s.
	PastTolerance time.Duration

	// MaxAttempts is how many times a local handler or an HTTP task is tried
	// before the timer is marked failed and kept for an operator (see
	// Failed and RetryTx). An HTTPTask may set its own. Default 10.
	MaxAttempts int

	// Backoff is the delay before attempt n+1 after attempt n failed.
	// Default: exponential from 1 s, doubling, capped at 5 min, with up to
	// half of each delay random.
	Backoff func(attempt int) time.Duration

	// OnFired, when set, is called after each transaction that fired timers
	// has committed, with what it fired. Use it to wake the outbox relay
	// (Relay.Notify) so fired messages leave at once, and for metrics. It
	// must not block, and must be safe for concurrent use: HTTP tasks
	// report from their own goroutines.
	OnFired func([]Fired)

	// HTTPClient makes the calls of HTTP tasks. It must not follow
	// redirects unless the tasks' URLs are trusted to. Default: a client
	// of the scheduler's own, with http.DefaultTransport's settings, that
	// does not follow redirects (a 3xx is a failure); Run closes its idle
	// connections when it returns.
	HTTPClient *http.Client

	// FireConcurrency is how many firing transactions run at once in this
	// scheduler. Default 1, which fires in strict due order. A batch's
	// handlers run one after another, each statement a round trip, so on
	// PostgreSQL 2 to 4 multiply the throughput of handler timers (measured
	// here: 9-10k/s with 1, 35k/s with 2); batches are then claimed in due
	// order but may commit out of it. On SQLite, which has one writer, more
	// than 1 gains nothing.
	FireConcurrency int

	// HTTPConcurrency is how many HTTP calls run at once. Default 8.
	HTTPConcurrency int

	// HTTPTimeout bounds one HTTP call when its task sets no Timeout.
	// Default 10 s.
	HTTPTimeout time.Duration
}

func (cfg Config) withDefaults() Config {
	if cfg.Clock == nil {
		cfg.Clock = systemClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Owner == "" {
		host, _ := os.Hostname()
		cfg.Owner = host + "-" + strconv.Itoa(os.Getpid())
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.PastTolerance == 0 {
		cfg.PastTolerance = DefaultPastTolerance
	}
	if cfg.MaxAttempts == 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if cfg.Backoff == nil {
		cfg.Backoff = retry.Exponential{}.Delay
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{
			Transport:     http.DefaultTransport.(*http.Transport).Clone(),
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	if cfg.FireConcurrency == 0 {
		cfg.FireConcurrency = 1
	}
	if cfg.HTTPConcurrency == 0 {
		cfg.HTTPConcurrency = DefaultHTTPConcurrency
	}
	if cfg.HTTPTimeout == 0 {
		cfg.HTTPTimeout = DefaultHTTPTimeout
	}
	return cfg
}

func (cfg Config) validate() error {
	var errs []error
	if cfg.BatchSize < 0 {
		errs = append(errs, fmt.Errorf("BatchSize %d is negative", cfg.BatchSize))
	}
	if cfg.PollInterval < 0 {
		errs = append(errs, fmt.Errorf("PollInterval %v is negative", cfg.PollInterval))
	}
	if cfg.LeaseTTL < 0 {
		errs = append(errs, fmt.Errorf("LeaseTTL %v is negative", cfg.LeaseTTL))
	}
	if cfg.PastTolerance < 0 {
		errs = append(errs, fmt.Errorf("PastTolerance %v is negative", cfg.PastTolerance))
	}
	if cfg.MaxAttempts < 0 {
		errs = append(errs, fmt.Errorf("MaxAttempts %d is negative", cfg.MaxAttempts))
	}
	if cfg.FireConcurrency < 0 {
		errs = append(errs, fmt.Errorf("FireConcurrency %d is negative", cfg.FireConcurrency))
	}
	if cfg.HTTPConcurrency < 0 {
		errs = append(errs, fmt.Errorf("HTTPConcurrency %d is negative", cfg.HTTPConcurrency))
	}
	if cfg.HTTPTimeout < 0 {
		errs = append(errs, fmt.Errorf("HTTPTimeout %v is negative", cfg.HTTPTimeout))
	}
	lease, timeout := cfg.LeaseTTL, cfg.HTTPTimeout
	if lease == 0 {
		lease = DefaultLeaseTTL
	}
	if timeout == 0 {
		timeout = DefaultHTTPTimeout
	}
	if lease > 0 && timeout > 0 && lease <= timeout {
		errs = append(errs, fmt.Errorf("LeaseTTL %v must exceed HTTPTimeout %v: a call still running when its lease ends would be made again by another scheduler", lease, timeout))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return nil
}
