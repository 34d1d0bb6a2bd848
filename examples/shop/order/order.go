// Package order is the Order service of the online shop. It takes orders
// (POST /orders), creates each PENDING, and runs the CreateOrder business
// transaction with the Customer service, which reserves the order's total
// against the customer's credit limit:
//
//   - Orchestrated (the default): the CreateOrder saga, a persistent state
//     machine in this service's database, sends ReserveCredit to the
//     Customer service, then runs its local "approve" step; the order ends
//     APPROVED, REJECTED (credit refused) or CANCELLED (the customer
//     cancelled while the saga ran: the reserved credit is released by the
//     saga's compensation).
//   - Choreographed: the service publishes OrderCreated; the Customer
//     service reacts and publishes CreditReserved or CreditLimitExceeded;
//     this service reacts to those, and publishes OrderCancelled when the
//     customer cancelled meanwhile, to which the Customer service reacts by
//     releasing the credit. No state machine: the business transaction is
//     the chain of events, tied by the order id as correlation id.
//
// Either way every change of an order and the messages it causes commit in
// one local transaction (the outbox), every message is handled once (the
// inbox), and the outcome events (approved, rejected, cancelled) are
// published for other services, such as an order history view.
//
// A client that got no answer to POST /orders (a reset connection, a
// timeout, a 503 while the service restarted) may send it again safely
// with the same Idempotency-Key header (PlaceRequest.IdempotencyKey): the
// key is stored with the order, under a unique index, in the order's own
// transaction, so a repeat, even one racing the first, gets the first's
// order and creates no second order and no second saga.
package order

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/internal/background"
	"github.com/troupedev/troupe/examples/internal/wake"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Wire names: topics, message types and the saga's name. They are part of
// the service's contract and never change.
const (
	// Source is the service's CloudEvents source.
	Source = "/shop/order"
	// EventTopic carries the service's events.
	EventTopic = customer.OrderEventTopic
	// ReplyTopic receives the saga's replies.
	ReplyTopic = "shop.order.replies"
	// EventCreated starts the choreographed flow (data:
	// customer.Reservation). The orchestrated flow does not publish it.
	EventCreated = customer.OrderCreated
	// EventApproved announces an approved order (data: Event).
	EventApproved = "shop.order.approved"
	// EventRejected announces a rejected order (data: Event).
	EventRejected = "shop.order.rejected"
	// EventCancelled announces an order cancelled after its credit was
	// reserved (data: Event, which is also a customer.Reservation: the
	// choreographed Customer service releases the credit).
	EventCancelled = customer.OrderCancelled
	// SagaName names the orchestrated CreateOrder saga.
	SagaName = "shop.create-order"
	// FlowName names the choreographed CreateOrder flow.
	FlowName = "shop.create-order"
)

// Mode is how the service runs the CreateOrder business transaction.
type Mode string

// The modes.
const (
	Orchestrated  Mode = "orchestrated"
	Choreographed Mode = "choreographed"
)

// ParseMode returns the mode named s.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case Orchestrated, Choreographed:
		return m, nil
	}
	return "", fmt.Errorf("order: unknown mode %q (want %q or %q)", s, Orchestrated, Choreographed)
}

// State is an order's state. Its values are stored and shown by the API.
type State string

// The states: PENDING until the business transaction ends.
const (
	Pending   State = "PENDING"
	Approved  State = "APPROVED"
	Rejected  State = "REJECTED"
	Cancelled State = "CANCELLED"
)

// Ended reports whether s is final.
func (s State) Ended() bool { return s == Approved || s == Rejected || s == Cancelled }

// Item is a line of an order.
type Item struct {
	SKU       string `json:"sku"`
	Quantity  int64  `json:"quantity"`
	UnitPrice int64  `json:"unit_price"` // in cents
}

// Order is an order as stored.
type Order struct {
	ID         string    `json:"id"`
	CustomerID string    `json:"customer_id"`
	Items      []Item    `json:"items"`
	Total      int64     `json:"total"` // in cents
	State      State     `json:"state"`
	Reason     string    `json:"reason,omitempty"`
	Mode       Mode      `json:"mode"`
	Cancel     bool      `json:"cancel_requested,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
}

// Event is the data of the outcome events.
type Event struct {
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	Amount     int64  `json:"amount"`
	Reason     string `json:"reason,omitempty"`
}

// Errors callers test with errors.Is.
var (
	// ErrNotFound: no order has this id.
	ErrNotFound = errors.New("order: not found")
	// ErrNotCancellable: the order has ended already.
	ErrNotCancellable = errors.New("order: only a pending order can be cancelled")
	// ErrIdempotencyKeyReused: the request's IdempotencyKey created an
	// order for a different request (another customer or other items).
	ErrIdempotencyKeyReused = errors.New("order: the Idempotency-Key was used with a different request")
	// errCancelled is the approve step's refusal.
	errCancelled = errors.New("cancelled by the customer")
)

// Config configures the service.
type Config struct {
	// Mode is how new orders run. Replies and events of the other mode are
	// still handled, so orders placed before a restart in another mode
	// finish. Default Orchestrated.
	Mode Mode
	// Deadline is how long the saga awaits the Customer service's reply
	// before sending the command again. Default 10s.
	Deadline time.Duration
	// MaxAttempts is how many times the saga sends a command before it
	// gives up (and compensates). Default 3.
	MaxAttempts int
	// Consumers is how many subscriptions of the consumer group handle
	// replies and events at once. Transitions of one saga are serialized
	// by its row lock; different sagas' run in parallel. Default 4 on
	// PostgreSQL, 1 on SQLite (whose write transactions take turns).
	Consumers int
	// Clock drives the saga's deadlines. Default: the system clock.
	Clock timer.Clock
	// Logger receives the service's errors. Default: discard.
	Logger *slog.Logger
}

// Service is the Order service on its database.
type Service struct {
	db  *sqldb.DB
	b   broker.Broker
	cfg Config

	relay *outbox.Relay
	sched *timer.Scheduler
	ib    *inbox.Inbox
	orch  *saga.Orchestrator
	def   *saga.Definition[sagaData]
	flows *flow.Tracker
	subs  []broker.Subscription
	bg    *background.Group

	waiters wake.Waiters
	placer  *sqldb.Batcher[placement, placed]
}

// sagaData is the CreateOrder saga's data.
type sagaData struct {
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	Total      int64  `json:"total"`
}

var migrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_orders",
	SQL: `CREATE TABLE shop_orders (
  id               TEXT PRIMARY KEY,
  customer_id      TEXT NOT NULL,
  items            TEXT NOT NULL,
  total            BIGINT NOT NULL,
  state            TEXT NOT NULL,
  reason           TEXT NOT NULL DEFAULT '',
  mode             TEXT NOT NULL,
  cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
  created_at       TIMESTAMP NOT NULL,
  updated_at       TIMESTAMP NOT NULL
);
CREATE INDEX shop_orders_customer ON shop_orders (customer_id, state)`,
}, {
	// An order placed with an Idempotency-Key keeps it, unique, with the
	// fingerprint of its request; NULL (no key) never conflicts.
	Version: 2,
	Name:    "add_idempotency_key",
	SQL: `ALTER TABLE shop_orders ADD COLUMN idempotency_key TEXT;
ALTER TABLE shop_orders ADD COLUMN request_fingerprint TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX shop_orders_idempotency_key ON shop_orders (idempotency_key)`,
}}

// Migrate creates the service's tables, with those of the saga, the
// outbox, the inbox and the timers, in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate, timer.Migrate, saga.Migrate, flow.Migrate} {
		if err := m(ctx, db); err != nil {
			return err
		}
	}
	return db.Migrate(ctx, "shop.order", migrations)
}

// New returns the service on db (migrated by Migrate), publishing through
// b. Run starts its work.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("order: New needs a database and a broker")
	}
	if cfg.Mode == "" {
		cfg.Mode = Orchestrated
	}
	if _, err := ParseMode(string(cfg.Mode)); err != nil {
		return nil, err
	}
	if cfg.Deadline == 0 {
		cfg.Deadline = 10 * time.Second
	}
	if cfg.MaxAttempts == 0 {
		cfg.MaxAttempts = 3
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Consumers <= 0 {
		cfg.Consumers = 1
		if db.Dialect() == sqldb.Postgres {
			cfg.Consumers = 4
		}
	}
	s := &Service{db: db, b: b, cfg: cfg}
	s.placer = sqldb.NewBatcher(db, sqldb.BatcherConfig{}, s.placeAll)
	var err error
	if s.relay, err = outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	s.sched, err = timer.New(db, timer.Config{Clock: cfg.Clock, Logger: cfg.Logger, OnFired: func(fired []timer.Fired) {
		s.relay.Notify()
		for _, f := range fired {
			s.waiters.Wake(f.Msg.Extensions[saga.ExtSagaID])
		}
	}})
	if err != nil {
		return nil, err
	}
	if s.ib, err = inbox.New(db, inbox.Config{AfterCommit: s.relay.Notify, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.orch, err = saga.New(db, s.sched, s.ib, saga.Config{Source: Source, ReplyTopic: ReplyTopic, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	s.def = s.createOrderSaga()
	if err := s.orch.Register(s.def); err != nil {
		return nil, err
	}
	if s.flows, err = flow.New(db, flow.Config{Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if err := s.flows.Define(createOrderFlow); err != nil {
		return nil, err
	}
	return s, nil
}

// createOrderFlow reads the choreographed CreateOrder from the events of
// both services.
var createOrderFlow = flow.Definition{
	Name:      FlowName,
	Starts:    []string{EventCreated},
	Steps:     []string{customer.CreditReserved, customer.CreditLimitExceeded, customer.CreditReleased},
	Completes: []string{EventApproved},
	Fails:     []string{EventRejected, EventCancelled},
	Deadline:  time.Minute,
}

// Flows returns the tracker of choreographed CreateOrder flows (recorded
// while the service runs choreographed), for operators: Get, List,
// History.
func (s *Service) Flows() *flow.Tracker { return s.flows }

// Orchestrator returns the service's saga orchestrator, for operators:
// Get, List, History, RetryTx, AbortTx.
func (s *Service) Orchestrator() *saga.Orchestrator { return s.orch }

// createOrderSaga is the CreateOrder saga: reserve the credit at the
// Customer service, then approve unless the customer cancelled meanwhile.
func (s *Service) createOrderSaga() *saga.Definition[sagaData] {
	return &saga.Definition[sagaData]{
		Name:    SagaName,
		Version: 1,
		Steps: []saga.Step[sagaData]{{
			Name:    "reserve-credit",
			Topic:   customer.CommandTopic,
			Command: customer.ReserveCredit,
			Input: func(d *sagaData) any {
				return customer.Reservation{OrderID: d.OrderID, CustomerID: d.CustomerID, Amount: d.Total}
			},
			Deadline:    s.cfg.Deadline,
			MaxAttempts: s.cfg.MaxAttempts,
		}, {
			// The last step: approving is the order's end, in the
			// transaction of the step.
			Name: "approve",
			Local: func(ctx context.Context, tx sqldb.Tx, _ string, d *sagaData) error {
				// One statement when the order is approved, which is the
				// common case: the saga's data has what the event needs.
				n, err := tx.Exec(ctx, `UPDATE shop_orders SET state = $1, updated_at = $2
					WHERE id = $3 AND state = $4 AND cancel_requested = FALSE`,
					string(Approved), time.Now().UTC(), d.OrderID, string(Pending))
				if err != nil {
					return err
				}
				if n == 1 {
					return s.publishEnd(ctx, tx, d.OrderID, d.CustomerID, d.Total, Approved, "")
				}
				o, err := lockOrder(ctx, tx, d.OrderID)
				if err != nil {
					return err
				}
				if o.Cancel {
					return saga.Refuse(errCancelled)
				}
				return s.endLocked(ctx, tx, o, Approved, "") // fails: the order is not pending
			},
		}},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, _ string, d *sagaData, reason string) error {
			o, err := lockOrder(ctx, tx, d.OrderID)
			if err != nil {
				return err
			}
			if o.Cancel && reason == errCancelled.Error() {
				return s.endLocked(ctx, tx, o, Cancelled, reason)
			}
			return s.endLocked(ctx, tx, o, Rejected, reason)
		},
	}
}

// Start serves the service until Stop: it subscribes to the saga's replies
// and the Customer service's events (consumer group "order"), and relays
// the outbox and fires the saga's deadlines in the background.
func (s *Service) Start(ctx context.Context) error {
	if s.bg != nil {
		return errors.New("order: started already")
	}
	subscribe := func(topic, group string, h broker.Handler) error {
		sub, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: group}, h)
		if err != nil {
			background.StopAll(context.WithoutCancel(ctx), s.subs...)
			s.subs = nil
			return err
		}
		s.subs = append(s.subs, sub)
		return nil
	}
	replies := s.waking(s.orch.Handler("order"))
	events := s.waking(byOrder(s.ib.Handler("order-customer-events", s.onCustomerEvent)))
	for range s.cfg.Consumers {
		if err := subscribe(ReplyTopic, "order", replies); err != nil {
			return err
		}
		if err := subscribe(customer.EventTopic, "order", events); err != nil {
			return err
		}
	}
	if s.cfg.Mode == Choreographed {
		// The business transaction as one flow, read from both services'
		// events, in this service's database.
		for _, topic := range []string{EventTopic, customer.EventTopic} {
			sub, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "order-flows", MaxDeliver: 100}, s.flows.Handler())
			if err != nil {
				background.StopAll(context.WithoutCancel(ctx), s.subs...)
				s.subs = nil
				return err
			}
			s.subs = append(s.subs, sub)
		}
	}
	s.bg = background.Start(ctx, s.relay.Run, s.sched.Run)
	return nil
}

// Stop stops the subscriptions, then the relay and the scheduler, and
// waits for them.
func (s *Service) Stop(ctx context.Context) error {
	errs := []error{background.StopAll(ctx, s.subs...)}
	s.subs = nil
	if s.bg != nil {
		errs = append(errs, s.bg.Stop())
		s.bg = nil
	}
	return errors.Join(errs...)
}

// waking wakes the callers awaiting the orders a batch concerned, after
// the batch's transaction committed (h has returned).
func (s *Service) waking(h broker.Handler) broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		h(ctx, batch)
		for _, d := range batch {
			if d.Msg != nil {
				s.waiters.Wake(d.Msg.CorrelationID)
			}
		}
	}
}

// Place validates req, creates the order PENDING and starts its business
// transaction, in one local transaction, which it shares with the orders
// placed at the same time: they are placed together, one statement for
// all their orders, one for their sagas and so on (sqldb.Batcher,
// saga.Definition.StartManyTx). An invalid request returns a
// *ValidationError (errors.Is ErrInvalid).
//
// With req.IdempotencyKey set, the key is stored with the order in that
// transaction, under a unique index. A Place whose key an order has
// already returns that order, as it is now, and creates nothing (no order,
// no saga, no event), or returns an error matching
// ErrIdempotencyKeyReused if that order was placed by a different request.
// Concurrent Places with one key create one order: the index lets one
// insert in, and the others read its order once it has committed.
func (s *Service) Place(ctx context.Context, req PlaceRequest) (Order, error) {
	o, _, err := s.place(ctx, req, message.NewID())
	return o, err
}

// PlaceAndAwait places an order as Place does, then waits until it has
// ended, or ctx ends, and returns it: Place then Await, but the order is
// read once, when a change to it has committed, where Await must read it
// first to see whether it has ended already. (The caller waits for an id
// chosen before the order exists, so no change can slip by unseen.)
func (s *Service) PlaceAndAwait(ctx context.Context, req PlaceRequest) (Order, error) {
	id := message.NewID()
	woken := s.waiters.Add(id)
	defer s.waiters.Remove(id, woken)
	o, replayed, err := s.place(ctx, req, id)
	if err != nil {
		return Order{}, err
	}
	if replayed {
		return s.Await(ctx, o.ID) // the order req's key placed before
	}
	return s.await(ctx, o, woken, false)
}

// place is Place of an order with the given id, telling whether the order
// is instead the one req's key had created already.
func (s *Service) place(ctx context.Context, req PlaceRequest, id string) (o Order, replayed bool, err error) {
	if err := req.Validate(); err != nil {
		return Order{}, false, err
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	o = Order{ID: id, CustomerID: req.CustomerID, Items: req.Items, Total: req.total(),
		State: Pending, Mode: s.cfg.Mode, CreatedAt: now, UpdatedAt: now}
	items, err := json.Marshal(o.Items)
	if err != nil {
		return Order{}, false, err
	}
	var key any // NULL without a key: NULLs never conflict
	fingerprint := ""
	if req.IdempotencyKey != "" {
		key, fingerprint = req.IdempotencyKey, req.fingerprint()
	}
	// Orders placed at the same time are placed together, set-wise, in
	// one transaction (sqldb.Batcher).
	res, err := s.placer.Do(ctx, placement{order: o, items: string(items), key: key, fingerprint: fingerprint, cause: message.CauseFrom(ctx)})
	if err == nil {
		err = res.err
	}
	switch {
	case errors.Is(err, ErrIdempotencyKeyReused):
		return Order{}, false, err
	case err != nil:
		return Order{}, false, fmt.Errorf("order: place: %w", err)
	case res.replayed:
		return res.order, true, nil
	}
	s.relay.Notify()
	return o, false, nil
}

// placement is an order to place (placeAll), with its items as JSON and
// its Idempotency-Key (nil for none) and request's fingerprint.
type placement struct {
	order       Order
	items       string
	key         any
	fingerprint string
	cause       *message.Message // the message that caused the Place, if any (message.CauseFrom)
}

// placed is what became of a placement: the order it created, or the one
// its key had created already (replayed), or why neither.
type placed struct {
	order    Order
	replayed bool
	err      error
}

// placeAll places orders in tx, set-wise: one INSERT for the orders, and
// their sagas started together (saga.Definition.StartManyTx) or their
// OrderCreated events added by one outbox.Add. An order whose
// Idempotency-Key an order has already gets that order back, replayed,
// or ErrIdempotencyKeyReused, and starts nothing. On PostgreSQL an insert
// whose key another transaction has just inserted waits for that one to
// end: it then inserts (the other rolled back) or does nothing, never
// fails, so the transaction stays usable for reading the other's order.
func (s *Service) placeAll(ctx context.Context, tx sqldb.Tx, ps []placement) ([]placed, error) {
	// ctx is the batch's (its first caller's): each order's messages take
	// their own Place's cause instead.
	ctx = message.WithCause(ctx, nil)
	// The rows go in in key order, so that two transactions inserting
	// overlapping keys wait for each other instead of deadlocking.
	byKey := slices.Clone(ps)
	slices.SortStableFunc(byKey, func(a, b placement) int {
		ka, _ := a.key.(string)
		kb, _ := b.key.(string)
		return strings.Compare(ka, kb)
	})
	// Without keys no insert can conflict: on PostgreSQL the orders travel
	// with the sagas' start.
	keyed := slices.ContainsFunc(ps, func(p placement) bool { return p.key != nil })
	inserted := make(map[string]bool, len(ps))
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(byKey), len(byKey)) {
		var q strings.Builder
		q.WriteString(`INSERT INTO shop_orders (id, customer_id, items, total, state, mode, created_at, updated_at, idempotency_key, request_fingerprint) VALUES `)
		args := make([]any, 0, 9*(hi-lo))
		for i, p := range byKey[lo:hi] {
			if i > 0 {
				q.WriteString(", ")
			}
			n := len(args)
			fmt.Fprintf(&q, "($%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d, $%d)", n+1, n+2, n+3, n+4, n+5, n+6, n+7, n+7, n+8, n+9)
			o := p.order
			args = append(args, o.ID, o.CustomerID, p.items, o.Total, string(o.State), string(o.Mode), o.CreatedAt, p.key, p.fingerprint)
		}
		q.WriteString(` ON CONFLICT (idempotency_key) DO NOTHING`)
		if !keyed {
			if err := sqldb.ExecLater(ctx, tx, q.String(), args...); err != nil {
				return nil, err
			}
			for _, p := range byKey[lo:hi] {
				inserted[p.order.ID] = true
			}
			continue
		}
		rows, err := tx.Query(ctx, q.String()+` RETURNING id`, args...)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return nil, err
			}
			inserted[id] = true
		}
		if err := rows.Close(); err != nil {
			return nil, err
		}
	}
	out := make([]placed, len(ps))
	var starts []saga.Start[sagaData]
	var events []*message.Message
	for i, p := range ps {
		o := p.order
		if !inserted[o.ID] {
			if p.key == nil {
				return nil, fmt.Errorf("order %s was not inserted", o.ID)
			}
			prev, err := orderByKey(ctx, tx, p.key.(string), p.fingerprint)
			out[i] = placed{order: prev, replayed: true, err: err}
			continue
		}
		out[i] = placed{order: o}
		if o.Mode == Orchestrated {
			starts = append(starts, saga.Start[sagaData]{ID: o.ID, Data: sagaData{OrderID: o.ID, CustomerID: o.CustomerID, Total: o.Total}, Cause: p.cause})
			continue
		}
		m, err := message.NewJSON(Source, EventCreated, customer.Reservation{OrderID: o.ID, CustomerID: o.CustomerID, Amount: o.Total})
		if err != nil {
			return nil, err
		}
		m.Subject, m.CorrelationID = o.ID, o.ID
		if p.cause != nil {
			message.InheritCause(message.WithCause(ctx, p.cause), m)
		}
		events = append(events, m)
	}
	if len(starts) > 0 {
		if err := s.def.StartManyTx(ctx, tx, s.orch, starts); err != nil {
			return nil, err
		}
	}
	if len(events) > 0 {
		if err := outbox.Add(ctx, tx, EventTopic, events...); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// orderByKey reads, in tx, the order that key created, if fingerprint is
// its request's; ErrIdempotencyKeyReused if not.
func orderByKey(ctx context.Context, tx sqldb.Tx, key, fingerprint string) (Order, error) {
	var id, was string
	err := tx.QueryRow(ctx, `SELECT id, request_fingerprint FROM shop_orders WHERE idempotency_key = $1`, key).Scan(&id, &was)
	if err != nil {
		return Order{}, fmt.Errorf("read the order of Idempotency-Key %q: %w", key, err)
	}
	if was != fingerprint {
		return Order{}, fmt.Errorf("%w (key %q)", ErrIdempotencyKeyReused, key)
	}
	return scanOrder(tx.QueryRow(ctx, selectOrder+` WHERE id = $1`, id), id)
}

// Cancel asks to cancel a pending order. The order ends CANCELLED once its
// reserved credit is released, or REJECTED if the credit was refused
// anyway; an ended order returns ErrNotCancellable.
func (s *Service) Cancel(ctx context.Context, id string) (Order, error) {
	var o Order
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		if o, err = lockOrder(ctx, tx, id); err != nil {
			return err
		}
		if o.State != Pending {
			return fmt.Errorf("%w: order %s is %s", ErrNotCancellable, id, o.State)
		}
		o.Cancel = true
		_, err = tx.Exec(ctx, `UPDATE shop_orders SET cancel_requested = TRUE, updated_at = $1 WHERE id = $2`, time.Now().UTC(), id)
		return err
	})
	return o, err
}

// Get reads an order.
func (s *Service) Get(ctx context.Context, id string) (Order, error) {
	return scanOrder(s.db.QueryRow(ctx, selectOrder+` WHERE id = $1`, id), id)
}

// Await waits until the order has ended, or ctx ends, and returns it.
func (s *Service) Await(ctx context.Context, id string) (Order, error) {
	woken := s.waiters.Add(id)
	defer s.waiters.Remove(id, woken)
	return s.await(ctx, Order{ID: id}, woken, true)
}

// await waits for order o to end, reading it each time woken says a
// change to it committed, and first if readFirst; it returns the order
// read last when ctx ends.
func (s *Service) await(ctx context.Context, o Order, woken chan struct{}, readFirst bool) (Order, error) {
	// Ends that no reply or event of this process signals (another
	// instance handled it) are seen by asking again now and then.
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		if readFirst {
			got, err := s.Get(ctx, o.ID)
			if err != nil || got.State.Ended() {
				return got, err
			}
			o = got
		}
		readFirst = true
		select {
		case <-woken:
		case <-tick.C:
		case <-ctx.Done():
			return o, ctx.Err()
		}
	}
}

const selectOrder = `SELECT id, customer_id, items, total, state, reason, mode, cancel_requested, created_at, updated_at FROM shop_orders`

func scanOrder(row sqldb.Row, id string) (Order, error) {
	var o Order
	var items, state, mode string
	err := row.Scan(&o.ID, &o.CustomerID, &items, &o.Total, &state, &o.Reason, &mode, &o.Cancel, &o.CreatedAt, &o.UpdatedAt)
	if errors.Is(err, sqldb.ErrNoRows) {
		return Order{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err != nil {
		return Order{}, fmt.Errorf("order: read %q: %w", id, err)
	}
	o.State, o.Mode = State(state), Mode(mode)
	if err := json.Unmarshal([]byte(items), &o.Items); err != nil {
		return Order{}, fmt.Errorf("order: read the items of %q: %w", id, err)
	}
	return o, nil
}

// lockOrder reads an order in tx, locking its row on PostgreSQL (SQLite's
// write transactions are serialized).
func lockOrder(ctx context.Context, tx sqldb.Tx, id string) (Order, error) {
	q := selectOrder + ` WHERE id = $1`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	return scanOrder(tx.QueryRow(ctx, q, id), id)
}

// end moves a pending order to its final state and publishes the outcome,
// in tx.
func (s *Service) end(ctx context.Context, tx sqldb.Tx, id string, state State, reason string) error {
	o, err := lockOrder(ctx, tx, id)
	if err != nil {
		return err
	}
	return s.endLocked(ctx, tx, o, state, reason)
}

// endLocked is end of an order tx read and locked.
func (s *Service) endLocked(ctx context.Context, tx sqldb.Tx, o Order, state State, reason string) error {
	id := o.ID
	if o.State != Pending {
		return fmt.Errorf("order: %s is %s already; cannot make it %s", id, o.State, state)
	}
	// The row is locked and its count not needed: on PostgreSQL the update
	// travels with the transaction's next statement or its commit.
	if err := sqldb.ExecLater(ctx, tx, `UPDATE shop_orders SET state = $1, reason = $2, updated_at = $3 WHERE id = $4`,
		string(state), reason, time.Now().UTC(), id); err != nil {
		return err
	}
	return s.publishEnd(ctx, tx, id, o.CustomerID, o.Total, state, reason)
}

// publishEnd adds the event of an order's end to the outbox, in tx.
func (s *Service) publishEnd(ctx context.Context, tx sqldb.Tx, id, customerID string, total int64, state State, reason string) error {
	typ := map[State]string{Approved: EventApproved, Rejected: EventRejected, Cancelled: EventCancelled}[state]
	m, err := message.NewJSON(Source, typ, Event{OrderID: id, CustomerID: customerID, Amount: total, Reason: reason})
	if err != nil {
		return err
	}
	m.Subject = id
	if m.CorrelationID == "" && message.CauseFrom(ctx) == nil {
		m.CorrelationID = id
	}
	return outbox.Add(ctx, tx, EventTopic, m)
}

// onCustomerEvent reacts to the Customer service's events (choreographed
// style).
func (s *Service) onCustomerEvent(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	if m.Type != customer.CreditReserved && m.Type != customer.CreditLimitExceeded {
		return nil // CreditReleased ends nothing here
	}
	var r customer.Reservation
	if err := json.Unmarshal(m.Data, &r); err != nil || r.OrderID == "" {
		return inbox.Permanent(fmt.Errorf("order: malformed %s data (%v)", m.Type, err))
	}
	o, err := lockOrder(ctx, tx, r.OrderID)
	if errors.Is(err, ErrNotFound) {
		return inbox.Permanent(err)
	}
	if err != nil {
		return err
	}
	if o.State != Pending {
		return nil // a repeat: the order has ended
	}
	switch {
	case m.Type == customer.CreditLimitExceeded:
		return s.end(ctx, tx, o.ID, Rejected, r.Reason)
	case o.Cancel:
		// The credit was reserved while the customer cancelled: the
		// cancellation event makes the Customer service release it.
		return s.end(ctx, tx, o.ID, Cancelled, errCancelled.Error())
	default:
		return s.end(ctx, tx, o.ID, Approved, "")
	}
}

// byOrder handles a batch in the order of its orders' ids (the
// orchestrator's Handler does the same for replies), so that two consumers
// whose batches concern the same orders lock their rows in the same order
// instead of deadlocking. Each order's messages keep their order.
func byOrder(h broker.Handler) broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		slices.SortStableFunc(batch, func(a, b *broker.Delivery) int {
			return strings.Compare(correlation(a), correlation(b))
		})
		h(ctx, batch)
	}
}

func correlation(d *broker.Delivery) string {
	if d.Msg == nil {
		return ""
	}
	return d.Msg.CorrelationID
}
