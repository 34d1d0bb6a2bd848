// Package customer is the Customer service of the online shop: it keeps
// customers and their credit limits, and reserves credit for orders.
//
// It takes part in the CreateOrder business transaction in either style:
//
//   - orchestrated: a saga.Participant on CommandTopic handles the
//     ReserveCredit command's action (reserve) and compensation (release)
//     and replies to the Order service's saga;
//   - choreographed: it reacts to the Order service's events (an order
//     created: reserve; an order cancelled after its credit was reserved:
//     release) and publishes its own (credit reserved, credit limit
//     exceeded) through its outbox.
//
// In both, each message is handled once (the inbox), reserve and release for
// one order are ordered by a barrier (a release that overtakes its reserve
// is a no-op and the late reserve is refused), and every event leaves
// through the outbox in the transaction that changed the credit.
package customer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/internal/background"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// Wire names: topics and message types. They are part of the service's
// contract and never change.
const (
	// Source is the service's CloudEvents source.
	Source = "/shop/customer"
	// CommandTopic receives saga commands (orchestrated style).
	CommandTopic = "shop.customer.commands"
	// EventTopic carries the service's events (choreographed style).
	EventTopic = "shop.customer.events"
	// ReserveCredit is the saga command whose action reserves an order's
	// total and whose compensation releases it. Its data is Reservation.
	ReserveCredit = "shop.customer.reserve-credit"
	// CreditReserved is published when an order's credit was reserved.
	CreditReserved = "shop.customer.credit-reserved"
	// CreditLimitExceeded is published when an order would exceed its
	// customer's limit (or the customer is unknown); its data's Reason
	// says which.
	CreditLimitExceeded = "shop.customer.credit-limit-exceeded"
	// CreditReleased is published when a reservation was released.
	CreditReleased = "shop.customer.credit-released"
)

// Order events the service reacts to in the choreographed style. They are
// the Order service's wire names, repeated here so that the two services
// share a contract, not a Go package.
const (
	OrderEventTopic = "shop.order.events"
	OrderCreated    = "shop.order.created"
	OrderCancelled  = "shop.order.cancelled"
)

// barrierStep is the barrier's step name for an order's credit, in both
// styles.
const barrierStep = "reserve-credit"

// Reservation is the data of ReserveCredit commands and of the credit
// events: which order, which customer, how much.
type Reservation struct {
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	Amount     int64  `json:"amount"`
	// Reason explains a CreditLimitExceeded.
	Reason string `json:"reason,omitempty"`
}

// Customer is a customer as stored.
type Customer struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	CreditLimit int64  `json:"credit_limit"`
	// Reserved is the credit reserved by orders in progress or approved.
	Reserved int64 `json:"reserved"`
}

// ErrNotFound is returned for an unknown customer id.
var ErrNotFound = errors.New("customer: not found")

// Config configures the service.
type Config struct {
	// Logger receives the service's errors. Default: discard.
	Logger *slog.Logger
	// FailRate is the share (0..1) of commands and events whose first
	// delivery fails with a transient error before any write, to show
	// redelivery at work (the demo's injected participant failures).
	// Default 0.
	FailRate float64
	// Seed seeds the fault injection. Default 1.
	Seed uint64
	// Choreographed subscribes the service to the Order service's events,
	// to which it reacts in the choreographed style. Without it the
	// service serves only saga commands, and does not spend a transaction
	// on each order event it would ignore. Default false.
	Choreographed bool
	// Backoff is the inbox's redelivery delay after a transient failure
	// (inbox.Config.Backoff). Default: the inbox's.
	Backoff func(attempt int) time.Duration
}

// Service is the Customer service on its database.
type Service struct {
	db  *sqldb.DB
	b   broker.Broker
	cfg Config

	relay *outbox.Relay
	ib    *inbox.Inbox
	part  *saga.Participant
	subs  []broker.Subscription
	bg    *background.Group

	mu       sync.Mutex
	rng      *rand.Rand
	injected int
}

var migrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_customers",
	SQL: `CREATE TABLE shop_customers (
  id           TEXT PRIMARY KEY,
  name         TEXT NOT NULL,
  credit_limit BIGINT NOT NULL CHECK (credit_limit >= 0),
  reserved     BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0)
)`,
}}

// Migrate creates the service's tables, with the outbox's and the inbox's,
// in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate} {
		if err := m(ctx, db); err != nil {
			return err
		}
	}
	return db.Migrate(ctx, "shop.customer", migrations)
}

// New returns the service on db (migrated by Migrate), publishing through
// b. Run starts its work.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("customer: New needs a database and a broker")
	}
	if cfg.FailRate < 0 || cfg.FailRate > 1 {
		return nil, fmt.Errorf("customer: FailRate %v: want 0..1", cfg.FailRate)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	s := &Service{db: db, b: b, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x5eed))}
	var err error
	if s.relay, err = outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.ib, err = inbox.New(db, inbox.Config{AfterCommit: s.relay.Notify, Logger: cfg.Logger, Backoff: cfg.Backoff}); err != nil {
		return nil, err
	}
	if s.part, err = saga.NewParticipant(s.ib, Source); err != nil {
		return nil, err
	}
	if err := s.part.Handle(ReserveCredit, s.reserveAction, s.releaseCompensation); err != nil {
		return nil, err
	}
	return s, nil
}

// Start serves until Stop: it subscribes to CommandTopic and, when
// Config.Choreographed, OrderEventTopic (consumer group "customer"), and
// relays the outbox in the background.
func (s *Service) Start(ctx context.Context) error {
	if s.bg != nil {
		return errors.New("customer: started already")
	}
	cmds, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: CommandTopic, Group: "customer"}, s.part.Handler("customer"))
	if err != nil {
		return err
	}
	s.subs = []broker.Subscription{cmds}
	if s.cfg.Choreographed {
		events, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: OrderEventTopic, Group: "customer"}, s.ib.Handler("customer-events", s.onOrderEvent))
		if err != nil {
			cmds.Stop(context.WithoutCancel(ctx))
			return err
		}
		s.subs = append(s.subs, events)
	}
	s.bg = background.Start(ctx, s.relay.Run)
	return nil
}

// Stop stops the subscriptions, then the relay, and waits for them.
func (s *Service) Stop(ctx context.Context) error {
	errs := []error{background.StopAll(ctx, s.subs...)}
	s.subs = nil
	if s.bg != nil {
		errs = append(errs, s.bg.Stop())
		s.bg = nil
	}
	return errors.Join(errs...)
}

// Injected returns how many transient failures the service injected.
func (s *Service) Injected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.injected
}

// inject fails a first delivery with probability FailRate.
func (s *Service) inject(ctx context.Context) error {
	if s.cfg.FailRate == 0 {
		return nil
	}
	if m := message.CauseFrom(ctx); m == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rng.Float64() >= s.cfg.FailRate {
		return nil
	}
	s.injected++
	return errors.New("customer: injected transient failure")
}

// Create adds a customer.
func (s *Service) Create(ctx context.Context, c Customer) error {
	_, err := s.db.Exec(ctx, `INSERT INTO shop_customers (id, name, credit_limit, reserved) VALUES ($1, $2, $3, 0)`, c.ID, c.Name, c.CreditLimit)
	if err != nil {
		return fmt.Errorf("customer: create %q: %w", c.ID, err)
	}
	return nil
}

// Get reads a customer.
func (s *Service) Get(ctx context.Context, id string) (Customer, error) {
	var c Customer
	err := s.db.QueryRow(ctx, `SELECT id, name, credit_limit, reserved FROM shop_customers WHERE id = $1`, id).
		Scan(&c.ID, &c.Name, &c.CreditLimit, &c.Reserved)
	if errors.Is(err, sqldb.ErrNoRows) {
		return Customer{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	return c, err
}

// List reads every customer, by id.
func (s *Service) List(ctx context.Context) ([]Customer, error) {
	rows, err := s.db.Query(ctx, `SELECT id, name, credit_limit, reserved FROM shop_customers ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Customer
	for rows.Next() {
		var c Customer
		if err := rows.Scan(&c.ID, &c.Name, &c.CreditLimit, &c.Reserved); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// reserve reserves r.Amount of r.CustomerID's credit in tx; refused
// explains why it could not.
func reserve(ctx context.Context, tx sqldb.Tx, r Reservation) (refused string, err error) {
	if r.Amount <= 0 {
		return fmt.Sprintf("amount %d is not positive", r.Amount), nil
	}
	n, err := tx.Exec(ctx, `UPDATE shop_customers SET reserved = reserved + $1 WHERE id = $2 AND reserved + $1 <= credit_limit`, r.Amount, r.CustomerID)
	if err != nil {
		return "", err
	}
	if n == 1 {
		return "", nil
	}
	var exists int
	err = tx.QueryRow(ctx, `SELECT count(*) FROM shop_customers WHERE id = $1`, r.CustomerID).Scan(&exists)
	if err != nil {
		return "", err
	}
	if exists == 0 {
		return fmt.Sprintf("unknown customer %q", r.CustomerID), nil
	}
	return "credit limit exceeded", nil
}

// release gives back what reserve took.
func release(ctx context.Context, tx sqldb.Tx, r Reservation) error {
	_, err := tx.Exec(ctx, `UPDATE shop_customers SET reserved = reserved - $1 WHERE id = $2`, r.Amount, r.CustomerID)
	return err
}

func decode(m *message.Message) (Reservation, error) {
	var r Reservation
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return r, inbox.Permanent(fmt.Errorf("customer: malformed %s data: %w", m.Type, err))
	}
	if r.OrderID == "" || r.CustomerID == "" {
		return r, inbox.Permanent(fmt.Errorf("customer: %s without order_id or customer_id", m.Type))
	}
	return r, nil
}

// reserveAction is ReserveCredit's action (orchestrated style).
func (s *Service) reserveAction(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	if err := s.inject(ctx); err != nil {
		return saga.Reply{}, err
	}
	r, err := decode(cmd.Msg)
	if err != nil {
		return saga.Reply{}, err
	}
	refused, err := reserve(ctx, tx, r)
	if err != nil {
		return saga.Reply{}, err
	}
	if refused != "" {
		return saga.Failure(refused), nil
	}
	return saga.Success(nil), nil
}

// releaseCompensation is ReserveCredit's compensation (orchestrated
// style). The participant's barrier runs it only if the action reserved.
func (s *Service) releaseCompensation(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	if err := s.inject(ctx); err != nil {
		return saga.Reply{}, err
	}
	r, err := decode(cmd.Msg)
	if err != nil {
		return saga.Reply{}, err
	}
	return saga.Success(nil), release(ctx, tx, r)
}

// onOrderEvent reacts to the Order service's events (choreographed style).
func (s *Service) onOrderEvent(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	op := inbox.BarrierAction
	switch m.Type {
	case OrderCreated:
	case OrderCancelled:
		op = inbox.BarrierCompensation
	default:
		return nil // other order events do not concern credit
	}
	if err := s.inject(ctx); err != nil {
		return err
	}
	r, err := decode(m)
	if err != nil {
		return err
	}
	refused := ""
	out, err := s.ib.BarrierTx(ctx, tx, r.OrderID, barrierStep, op, func(ctx context.Context, tx sqldb.Tx) error {
		if op == inbox.BarrierCompensation {
			if err := release(ctx, tx, r); err != nil {
				return err
			}
			return s.publish(ctx, tx, CreditReleased, r)
		}
		var err error
		if refused, err = reserve(ctx, tx, r); err != nil {
			return err
		}
		if refused != "" {
			r.Reason = refused
			return s.publish(ctx, tx, CreditLimitExceeded, r)
		}
		return s.publish(ctx, tx, CreditReserved, r)
	})
	if err != nil {
		return err
	}
	switch out {
	case inbox.BarrierApplied:
		if refused != "" {
			// Nothing was reserved: a cancellation must not release.
			return s.ib.BarrierRefusedTx(ctx, tx, r.OrderID, barrierStep, op)
		}
	case inbox.BarrierRefused:
		// The order was cancelled before its credit was reserved: say so,
		// so that the Order service does not wait for an answer.
		r.Reason = "the order was cancelled before its credit was reserved"
		return s.publish(ctx, tx, CreditLimitExceeded, r)
	}
	// BarrierDuplicate: the first time's event is in the outbox already.
	// BarrierNullCompensation: nothing was reserved, nothing to release.
	return nil
}

// publish adds an event to the outbox in tx, caused by the message being
// handled (so it carries its correlation id).
func (s *Service) publish(ctx context.Context, tx sqldb.Tx, typ string, r Reservation) error {
	m, err := message.NewJSON(Source, typ, r)
	if err != nil {
		return err
	}
	m.Subject = r.OrderID
	message.InheritCause(ctx, m)
	return outbox.Add(ctx, tx, EventTopic, m)
}
