package reserve

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

//go:embed migrations
var migrationFS embed.FS

// Component is the name under which the reservations' migrations are
// recorded in troupe_migrations.
const Component = "reserve"

// ExpireHandler is the name of the timer handler that releases a
// reservation at its expiry. New registers it with its scheduler. Only a
// scheduler with the handler fires expiry timers (the others leave them
// pending), so the processes that run schedulers on the database must
// create a Reserver for expiries to happen.
const ExpireHandler = "troupe.reserve.expire"

// expireType is the type of expiry timers' messages.
const expireType = "dev.troupe.reserve.expire"

// source is the CloudEvents source of expiry timers' messages.
const source = "/troupe/reserve"

// Errors callers test with errors.Is. ErrUnavailable, ErrReservationExpired
// and ErrCancelled are business refusals: each matches ErrRefused as well.
var (
	// ErrRefused is matched by every business refusal: the answer is final
	// for the reservation, and a repeated call gives it again. In a saga,
	// reply with a failure (the saga compensates) rather than retry.
	ErrRefused = errors.New("reserve: refused")
	// ErrUnavailable is returned by Try when no resource of the pool (or
	// not the one asked for) is free. The refusal is recorded with the
	// reservation: a repeated Try is refused again, even if a resource has
	// been freed since.
	ErrUnavailable = fmt.Errorf("%w: no free resource", ErrRefused)
	// ErrReservationExpired is returned by Confirm (and a repeated Try) for
	// a reservation whose expiry has passed: its resource is released, or
	// is being released, and is never assigned to it.
	ErrReservationExpired = fmt.Errorf("%w: reservation expired", ErrRefused)
	// ErrCancelled is returned by Try and Confirm for a reservation that
	// was cancelled, including by a Cancel that arrived before the Try.
	ErrCancelled = fmt.Errorf("%w: reservation cancelled", ErrRefused)

	// ErrNotFound is returned by Confirm and Get for a reservation id that
	// no Try or Cancel has recorded.
	ErrNotFound = errors.New("reserve: no such reservation")
	// ErrInUse is returned by Remove for a resource that a reservation
	// holds: its holder may still confirm it.
	ErrInUse = errors.New("reserve: resource is held")
	// ErrInvalid is matched by the error for a request that cannot be
	// served as given (an empty id, an expiry not in the future, a
	// reservation id reused for another pool or owner). Nothing is
	// written.
	ErrInvalid = errors.New("reserve: invalid request")
)

// State is a reservation's state, stored as its string.
type State string

// The states of a reservation.
const (
	// Held: the reservation holds its resource until ExpiresAt.
	Held State = "held"
	// Confirmed: its resource is assigned to its owner, for good (until a
	// Cancel releases it).
	Confirmed State = "confirmed"
	// Cancelled: released by Cancel, or cancelled before its Try.
	Cancelled State = "cancelled"
	// Expired: released at its expiry, by the timer or by a call that
	// found it past ExpiresAt.
	Expired State = "expired"
	// Refused: its Try found no free resource.
	Refused State = "refused"
)

// ResourceState is a resource's state, stored as its string.
type ResourceState string

// The states of a resource.
const (
	// ResourceFree: no reservation holds it; Try may take it.
	ResourceFree ResourceState = "free"
	// ResourceHeld: a held reservation holds it.
	ResourceHeld ResourceState = "held"
	// ResourceAssigned: a confirmed reservation's owner has it.
	ResourceAssigned ResourceState = "assigned"
)

// Reservation is one reservation as recorded.
type Reservation struct {
	// ID is the caller's id for the reservation, the key of idempotency.
	ID string
	// Pool is the pool it reserves in ("" for one cancelled before its Try).
	Pool string
	// Resource is the resource it holds or held ("" if it never held one).
	Resource string
	// Owner is who the resource is held or assigned for (an order).
	Owner string
	// State is where the reservation stands.
	State State
	// ExpiresAt is when a held reservation is released if not confirmed
	// (zero for one cancelled before its Try).
	ExpiresAt time.Time
	// CreatedAt and UpdatedAt are when it was recorded and last changed.
	CreatedAt, UpdatedAt time.Time
}

// Resource is one resource of a pool.
type Resource struct {
	// Pool and ID name it.
	Pool, ID string
	// State is free, held or assigned.
	State ResourceState
	// Reservation and Owner say who holds it ("" when free).
	Reservation, Owner string
	// UpdatedAt is when its state last changed.
	UpdatedAt time.Time
}

// Config tunes a Reserver. The zero value gives the defaults.
type Config struct {
	// Now is the clock that decides expiry and stamps rows. Default: the
	// scheduler's clock (timer.Scheduler.Now), which fires the expiry
	// timers.
	Now func() time.Time
}

// A Reserver holds individual resources for reservations that expire: Try
// holds a free resource until an expiry, Confirm assigns it, Cancel
// releases it, and a timer releases it at the expiry if neither came. It
// is safe for concurrent use.
type Reserver struct {
	db    *sqldb.DB
	sched *timer.Scheduler
	now   func() time.Time
}

// New returns a Reserver on db, whose reservation tables Migrate has
// created. sched must be a timer scheduler on the same database: expiry
// timers are scheduled in the transaction of each Try and fire in its
// transactions. New registers ExpireHandler with sched, so create one
// Reserver per scheduler (a second replaces the first's handler).
func New(db *sqldb.DB, sched *timer.Scheduler, cfg Config) (*Reserver, error) {
	if db == nil || sched == nil {
		return nil, fmt.Errorf("%w: New needs a database and a timer scheduler", ErrInvalid)
	}
	if cfg.Now == nil {
		cfg.Now = sched.Now
	}
	r := &Reserver{db: db, sched: sched, now: cfg.Now}
	if err := sched.Handle(ExpireHandler, r.expire); err != nil {
		return nil, err
	}
	return r, nil
}

// Migrate creates or updates the reservation tables in db. It is safe to
// call from several processes at once, at every start-up. The timer
// tables are migrated by timer.Migrate.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("reserve: %w", err)
	}
	return db.Migrate(ctx, Component, migs)
}

// stamp returns the clock's time as stored: UTC, to the microsecond (what
// PostgreSQL keeps), so a time read back equals the time written.
func stamp(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }
