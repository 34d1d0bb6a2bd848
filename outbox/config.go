package outbox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"time"
)

// Mode says how a relay learns that there are rows to publish.
type Mode int

const (
	// Poll reads the outbox every PollInterval, and at once after
	// Relay.Notify.
	Poll Mode = iota + 1
	// Notify adds, on PostgreSQL, a LISTEN on the channel troupe_outbox,
	// which the outbox's insert trigger NOTIFYs at commit: the relay wakes
	// as soon as rows are committed, by any process. Polling stays on as a
	// fallback (every PollInterval). On SQLite, which has no notifications,
	// Notify behaves as Poll: wake the relay with Relay.Notify.
	Notify
)

// String returns "poll" or "notify".
func (m Mode) String() string {
	switch m {
	case Poll:
		return "poll"
	case Notify:
		return "notify"
	}
	return "Mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode returns the Mode named "poll" or "notify".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "poll":
		return Poll, nil
	case "notify":
		return Notify, nil
	}
	return 0, fmt.Errorf("%w: mode %q: want poll or notify", ErrInvalidConfig, s)
}

// Clock tells the time and waits; the relay reads every time through it, so
// tests can move time forward instead of sleeping.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// After returns a channel that receives the time once d has passed.
	After(d time.Duration) <-chan time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Defaults of RelayConfig fields.
const (
	DefaultPollIntervalPoll   = 100 * time.Millisecond
	DefaultPollIntervalNotify = time.Second
	DefaultBatchSize          = 500
	DefaultLeaseTTL           = 10 * time.Second
	DefaultMinBackoff         = 100 * time.Millisecond
	DefaultMaxBackoff         = 30 * time.Second
	DefaultRetention          = 24 * time.Hour
	DefaultRetentionInterval  = time.Minute
	DefaultRetentionBatch     = 1000
)

// ErrInvalidConfig is matched by the error NewRelay returns for a bad
// RelayConfig.
var ErrInvalidConfig = errors.New("outbox: invalid relay config")

// RelayConfig configures a Relay. The zero value gives the defaults.
type RelayConfig struct {
	// Mode is how the relay learns of new rows. Default: Notify on
	// PostgreSQL, Poll on SQLite.
	Mode Mode

	// PollInterval is how often the relay reads the outbox when nothing woke
	// it. Default 100ms in Poll mode, 1s in Notify mode (a fallback for a
	// lost notification).
	PollInterval time.Duration

	// BatchSize is the most rows read per partition per round; one round
	// publishes the rows of all the relay's partitions, one Publish call per
	// topic, and marks them delivered in one transaction. Default 500.
	BatchSize int

	// Owner names this relay instance in the lease table. Default: the host
	// name, the process id and a random suffix. Two running relays must not
	// share an owner name.
	Owner string

	// LeaseTTL is how long a relay's claim on a partition lasts without
	// renewal; it renews every LeaseTTL/3. A crashed relay's partitions are
	// taken over within LeaseTTL. Default 10s.
	LeaseTTL time.Duration

	// MinBackoff and MaxBackoff bound the wait after a failed round (the
	// broker or the database refused): it starts at MinBackoff and doubles
	// with each failure in a row, up to MaxBackoff. Defaults 100ms and 30s.
	MinBackoff time.Duration
	MaxBackoff time.Duration

	// Retention is how long delivered rows are kept before deletion.
	// Default 24h.
	Retention time.Duration

	// RetentionInterval is how often the relay deletes expired rows.
	// Default 1 minute.
	RetentionInterval time.Duration

	// RetentionBatch is the most rows one DELETE removes, so that pruning a
	// large backlog never holds long locks. Default 1000.
	RetentionBatch int

	// Clock is the relay's time source. Default: the system clock.
	Clock Clock

	// Logger receives the relay's warnings (failed rounds, lost leases).
	// Default: discard.
	Logger *slog.Logger
}

func (cfg RelayConfig) withDefaults(postgres bool) RelayConfig {
	if cfg.Mode == 0 {
		cfg.Mode = Poll
		if postgres {
			cfg.Mode = Notify
		}
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollIntervalPoll
		if cfg.Mode == Notify && postgres {
			cfg.PollInterval = DefaultPollIntervalNotify
		}
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.Owner == "" {
		host, _ := os.Hostname()
		var b [4]byte
		rand.Read(b[:])
		cfg.Owner = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.RetentionInterval == 0 {
		cfg.RetentionInterval = DefaultRetentionInterval
	}
	if cfg.RetentionBatch == 0 {
		cfg.RetentionBatch = DefaultRetentionBatch
	}
	if cfg.Clock == nil {
		cfg.Clock = systemClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

func (cfg RelayConfig) validate() error {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...))
	}
	if cfg.Mode != Poll && cfg.Mode != Notify {
		bad("Mode %d: want Poll or Notify", int(cfg.Mode))
	}
	if cfg.PollInterval < 0 {
		bad("PollInterval %s is negative", cfg.PollInterval)
	}
	if cfg.BatchSize < 0 {
		bad("BatchSize %d is negative", cfg.BatchSize)
	}
	if cfg.LeaseTTL < 0 {
		bad("LeaseTTL %s is negative", cfg.LeaseTTL)
	}
	if cfg.MinBackoff < 0 || cfg.MaxBackoff < 0 || cfg.MaxBackoff < cfg.MinBackoff {
		bad("backoff %s..%s: want 0 <= MinBackoff <= MaxBackoff", cfg.MinBackoff, cfg.MaxBackoff)
	}
	if cfg.Retention < 0 || cfg.RetentionInterval < 0 || cfg.RetentionBatch < 0 {
		bad("Retention, RetentionInterval and RetentionBatch must not be negative")
	}
	return errors.Join(errs...)
}
