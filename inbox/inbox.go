package inbox

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"log/slog"

	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/retry"
	"github.com/troupedev/troupe/sqldb"
)

// Component is the name under which the inbox's migrations are recorded in
// troupe_migrations.
const Component = "inbox"

//go:embed migrations
var migrationFS embed.FS

// Migrate creates or updates the inbox's table, troupe_inbox, in db. It is
// safe to call from several processes at once and at every start-up.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("inbox: load migrations: %w", err)
	}
	if err := db.Migrate(ctx, Component, migs); err != nil {
		return fmt.Errorf("inbox: migrate: %w", err)
	}
	return nil
}

// Defaults of Config fields.
const (
	DefaultRetention      = 7 * 24 * time.Hour
	DefaultPruneInterval  = time.Hour
	DefaultOutageHold     = time.Minute
	DefaultPruneBatchSize = 1000
)

// Config configures an Inbox. The zero value gives the defaults.
type Config struct {
	// Backoff returns how long to wait before redelivering a message whose
	// handler failed with a transient error on the given attempt (1 for the
	// first delivery). Default: ExponentialBackoff{}.Delay, which doubles from 1 s up to
	// 5 min with jitter.
	Backoff func(attempt int) time.Duration

	// MaxAttempts, when positive, makes the inbox dead-letter a message whose
	// handler fails on attempt MaxAttempts or later, with the handler's
	// error as the reason. Default 0: the broker decides, dead-lettering a
	// message Nak'ed on the subscription's last attempt (MaxDeliver) with a
	// reason that names the attempt but not the error. Set it to the
	// subscription's MaxDeliver to keep the error in the dead letter.
	MaxAttempts int

	// OutageHold is how long Handler holds a batch whose messages could not
	// be written because the database could not be reached (a transaction
	// could not begin or commit, for no fault of the messages), trying it
	// again after each Backoff, before it hands the messages back to the
	// broker (Nak). The messages are not at fault, so holding them spends
	// none of their deliveries, which a broker counts toward dead-lettering
	// (broker/natsjs's MaxDeliver): a database restart does not dead-letter
	// the messages in flight. The broker keeps held messages in progress.
	// A subscription's Stop ends the hold at once. Default 1 minute;
	// negative: hand them back at once.
	OutageHold time.Duration

	// Retention is how long an inbox row is kept after its message was
	// handled: a copy of the message delivered later than that is handled
	// again. It must exceed the longest time the broker may redeliver a
	// message after it was first handled (see the package documentation).
	// Default 7 days.
	Retention time.Duration

	// PruneInterval is how often Run deletes rows older than Retention.
	// Default 1 hour.
	PruneInterval time.Duration

	// PruneBatchSize is the most rows one DELETE removes, so pruning a large
	// backlog never holds locks for long. Default 1000.
	PruneBatchSize int

	// Now is the clock: it stamps handled_at and decides which rows are
	// past Retention. Default time.Now.
	Now func() time.Time

	// Logger receives handler errors and panics, and pruning failures.
	// Default: discard.
	Logger *slog.Logger

	// AfterCommit, when set, is called once after each batch of Handler
	// whose transactions committed at least one handled message. Set it to
	// the outbox relay's Notify, so that the messages handlers wrote leave
	// at once instead of at the relay's next poll. It must not block.
	AfterCommit func()
}

func (cfg Config) withDefaults() Config {
	if cfg.Backoff == nil {
		cfg.Backoff = ExponentialBackoff{}.Delay
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.OutageHold == 0 {
		cfg.OutageHold = DefaultOutageHold
	}
	if cfg.PruneInterval == 0 {
		cfg.PruneInterval = DefaultPruneInterval
	}
	if cfg.PruneBatchSize == 0 {
		cfg.PruneBatchSize = DefaultPruneBatchSize
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

func (cfg Config) validate() error {
	var errs []error
	if cfg.MaxAttempts < 0 {
		errs = append(errs, fmt.Errorf("MaxAttempts %d: want 0 (the broker decides) or more", cfg.MaxAttempts))
	}
	if cfg.Retention < 0 {
		errs = append(errs, fmt.Errorf("Retention %v: want a positive duration", cfg.Retention))
	}
	if cfg.PruneInterval < 0 {
		errs = append(errs, fmt.Errorf("PruneInterval %v: want a positive duration", cfg.PruneInterval))
	}
	if cfg.PruneBatchSize < 0 {
		errs = append(errs, fmt.Errorf("PruneBatchSize %d: want a positive size", cfg.PruneBatchSize))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("inbox: invalid config: %w", err)
	}
	return nil
}

// Inbox makes message handlers idempotent: it records each handled message
// in troupe_inbox in the handler's own transaction. It is safe for
// concurrent use; one Inbox serves any number of consumers and
// subscriptions.
type Inbox struct {
	db  *sqldb.DB
	cfg Config
}

// New returns an Inbox on db, whose tables Migrate has created.
func New(db *sqldb.DB, cfg Config) (*Inbox, error) {
	if db == nil {
		return nil, errors.New("inbox: nil *sqldb.DB")
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Inbox{db: db, cfg: cfg.withDefaults()}, nil
}

// ClaimTx records in tx that consumer handles m, and reports whether this
// is the first time: false means m was already handled (or is being handled
// by a transaction not yet committed, which ClaimTx then waits for on
// PostgreSQL). A message is known by its Source and ID, which CloudEvents
// makes unique together. ClaimTx is the building block of Handler, for
// consumers that begin their transactions themselves:
//
//	first, err := ib.ClaimTx(ctx, tx, "billing", m)
//	if err != nil || !first { return err }
//	... apply m's effect through tx ...
//
// The claim commits or rolls back with tx.
func (ib *Inbox) ClaimTx(ctx context.Context, tx sqldb.Tx, consumer string, m *message.Message) (bool, error) {
	n, err := tx.Exec(ctx,
		`INSERT INTO troupe_inbox (consumer, message_id, source, handled_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`,
		consumer, m.ID, m.Source, ib.cfg.Now().UTC())
	if err != nil {
		return false, fmt.Errorf("inbox: claim message %q from %q for consumer %q: %w", m.ID, m.Source, consumer, err)
	}
	return n == 1, nil
}

// ExponentialBackoff is the default retry policy: an exponential delay with
// jitter (see retry.Exponential).
type ExponentialBackoff = retry.Exponential
