package walrelay

import (
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
)

// Defaults of the Config fields.
const (
	// DefaultSlotName is the replication slot a Relay uses unless told otherwise.
	DefaultSlotName = "troupe_outbox"
	// DefaultPublication is the publication a Relay uses unless told otherwise.
	DefaultPublication = "troupe_outbox"
	// DefaultBatchSize is the most messages a Relay hands to one Publish round.
	DefaultBatchSize = 500
	// DefaultStandbyTimeout is the longest a Relay goes without telling the
	// server its confirmed position.
	DefaultStandbyTimeout = 10 * time.Second
	// DefaultRetryMin is the first backoff delay after a failure.
	DefaultRetryMin = 100 * time.Millisecond
	// DefaultRetryMax is the longest backoff delay.
	DefaultRetryMax = 5 * time.Second
)

// Config configures a Relay.
type Config struct {
	// URL is the PostgreSQL database holding the outbox table, such as
	// "postgres://troupe@db:5432/orders". The Relay opens a logical
	// replication connection to it (adding replication=database) and one
	// ordinary connection. The user needs the REPLICATION attribute (or to be
	// a superuser) and, the first time, the right to create a publication on
	// the outbox table. Required.
	URL string

	// Publisher receives the outbox messages. Required.
	Publisher broker.Publisher

	// SlotName is the logical replication slot: lower-case letters, digits
	// and '_', at most 63 characters, unique in the PostgreSQL cluster (slots
	// are cluster-wide, not per database). Every relay instance for one
	// database uses the same name; the slot is their shared position.
	// Default "troupe_outbox".
	SlotName string

	// Publication is the publication on the outbox table that the slot
	// decodes. Same character rules as SlotName. Default "troupe_outbox".
	Publication string

	// BatchSize is the most messages published in one round (one Publish
	// call per topic in the round) and marked delivered in one statement.
	// Default 500.
	BatchSize int

	// BatchWait is how long the relay waits for more messages to fill a
	// batch once it has some. Default 0: publish whatever has arrived at
	// once; batches still grow under load, since messages arriving during a
	// round wait for the next one.
	BatchWait time.Duration

	// StandbyTimeout is the longest the relay goes without sending the server
	// a status update with its confirmed position. The relay also sends one as
	// soon as a batch is acknowledged by the broker and whenever the server
	// asks, so this only bounds the quiet periods; keep it well under the
	// server's wal_sender_timeout (default 60s). Default 10s.
	StandbyTimeout time.Duration

	// RetryMin and RetryMax bound the exponential backoff after a failure:
	// a broker that refuses a batch, a lost connection, or a slot held by
	// another instance. Defaults 100ms and 5s.
	RetryMin, RetryMax time.Duration

	// Logger receives the relay's log. Default: discard.
	Logger *slog.Logger

	// Clock times backoff waits, batch waits and status updates. Default:
	// the system clock.
	Clock outbox.Clock

	// OnPublished, if set, is called after each batch the broker
	// acknowledged, before its position is confirmed to the server. It must
	// return quickly; it serves metrics and benchmarks. Default: none.
	OnPublished func(Published)
}

// Published describes a batch the broker acknowledged.
type Published struct {
	// Messages are the batch's messages, in relay order.
	Messages []*message.Message
	// CommitTimes holds, for each of Messages, the commit time of the
	// transaction that wrote it, as recorded by the server (zero for rows
	// read from the table at the start of a session).
	CommitTimes []time.Time
	// Acked is when the broker acknowledged the batch.
	Acked time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time                         { return time.Now() }
func (systemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// ErrInvalidConfig is matched by the error New returns for a bad Config.
var ErrInvalidConfig = errors.New("walrelay: invalid config")

var nameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (cfg Config) withDefaults() Config {
	if cfg.SlotName == "" {
		cfg.SlotName = DefaultSlotName
	}
	if cfg.Publication == "" {
		cfg.Publication = DefaultPublication
	}
	if cfg.BatchSize == 0 {
		cfg.BatchSize = DefaultBatchSize
	}
	if cfg.StandbyTimeout == 0 {
		cfg.StandbyTimeout = DefaultStandbyTimeout
	}
	if cfg.RetryMin == 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax == 0 {
		cfg.RetryMax = max(DefaultRetryMax, cfg.RetryMin)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = systemClock{}
	}
	return cfg
}

// validate reports every problem with a defaulted cfg at once.
func (cfg Config) validate() error {
	var errs []error
	if cfg.URL == "" {
		errs = append(errs, errors.New("URL is required"))
	} else if _, err := pgconn.ParseConfig(cfg.URL); err != nil {
		errs = append(errs, fmt.Errorf("URL: %w", err))
	}
	if cfg.Publisher == nil {
		errs = append(errs, errors.New("Publisher is required"))
	}
	if !nameRE.MatchString(cfg.SlotName) {
		errs = append(errs, fmt.Errorf("SlotName %q: want 1 to 63 of a-z, 0-9 and _", cfg.SlotName))
	}
	if !nameRE.MatchString(cfg.Publication) {
		errs = append(errs, fmt.Errorf("Publication %q: want 1 to 63 of a-z, 0-9 and _", cfg.Publication))
	}
	if cfg.BatchSize < 0 {
		errs = append(errs, fmt.Errorf("BatchSize %d: want a positive number", cfg.BatchSize))
	}
	if cfg.BatchWait < 0 {
		errs = append(errs, fmt.Errorf("BatchWait %v: want 0 or more", cfg.BatchWait))
	}
	if cfg.StandbyTimeout < 0 {
		errs = append(errs, fmt.Errorf("StandbyTimeout %v: want a positive duration", cfg.StandbyTimeout))
	}
	if cfg.RetryMin < 0 || cfg.RetryMax < cfg.RetryMin {
		errs = append(errs, fmt.Errorf("RetryMin %v, RetryMax %v: want 0 < RetryMin <= RetryMax", cfg.RetryMin, cfg.RetryMax))
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrInvalidConfig, errors.Join(errs...))
}
