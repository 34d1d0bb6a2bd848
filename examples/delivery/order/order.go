// Package order is the Order service of the food-delivery example. It
// takes orders (POST /orders) for a quantity of one food, creates each
// PENDING, and runs the place-order saga, which reserves, all or nothing,
// the order's packets at the Store service and an agent at the Delivery
// service, each held for a while then confirmed (saga.Reservations):
//
//   - phase 1 asks at once for the packets (over the broker) and an agent
//     (over HTTP), each held until an expiry;
//   - phase 2 confirms every hold, retrying while the expiry leaves time;
//   - the order is PLACED (OnCompleted) only when every packet and the
//     agent are assigned to it; otherwise NOT_PLACED (OnCompensated) with
//     the reason — sold out, no agent free, or a confirmation that could
//     not be made in time — and nothing stays held: the saga cancels what
//     it reserved, and each participant's expiry releases a hold the saga
//     could not reach.
//
// So a customer sees "Order placed" only for an order that can be
// fulfilled. A PLACED order's OrderPlaced event leaves through the outbox
// in the saga's last transaction, for the Delivery service to send the
// agent out.
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
	"strings"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/examples/internal/background"
	"github.com/troupedev/troupe/examples/internal/wake"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Wire names: topics, events and the saga's names. They are part of the
// service's contract and never change.
const (
	// Source is the service's CloudEvents source.
	Source = "/delivery/order"
	// ReplyTopic receives the Store's replies to the saga.
	ReplyTopic = "delivery.order.replies"
	// EventTopic carries the service's events.
	EventTopic = dispatch.OrderEventTopic
	// EventPlaced announces a placed order (data: dispatch.Placed).
	EventPlaced = dispatch.OrderPlaced
	// ReservationsName names the saga's reservations: the packets'
	// reservations are "order.packet1", "order.packet2"..., the agent's
	// "order.agent".
	ReservationsName = "order"
)

// SagaName names the place-order saga of an order of quantity packets:
// each quantity has its own steps (one Try and one Confirm per packet).
func SagaName(quantity int) string { return fmt.Sprintf("delivery.place-order.%d", quantity) }

// State is an order's state. Its values are stored and shown by the API.
type State string

// The states: PENDING until the saga ends.
const (
	Pending   State = "PENDING"
	Placed    State = "PLACED"
	NotPlaced State = "NOT_PLACED"
)

// Ended reports whether s is final.
func (s State) Ended() bool { return s == Placed || s == NotPlaced }

// The reasons of a NOT_PLACED order, as the API shows them.
const (
	ReasonSoldOut  = "sold out"
	ReasonNoAgent  = "no delivery agent free"
	ReasonExpired  = "a reservation expired before it was confirmed"
	ReasonTimedOut = "a reservation could not be confirmed in time"
	reasonUnknown  = "could not reserve"
	maxReasonShown = 300
)

// Order is an order as stored.
type Order struct {
	ID       string `json:"id"`
	FoodID   string `json:"food_id"`
	Quantity int    `json:"quantity"`
	State    State  `json:"state"`
	// Reason says why a NOT_PLACED order was not placed.
	Reason string `json:"reason,omitempty"`
	// Packets and Agent are what was assigned to a PLACED order.
	Packets   []string  `json:"packets,omitempty"`
	Agent     string    `json:"agent,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Menu tells whether a food is on the Store's menu. It stands in, in this
// one-process example, for a call to the Store's GET /foods/{id}: the
// Store service implements it (store.Service.OnMenu). An error is the
// Store being unreachable: the order is refused with ErrMenuUnavailable.
type Menu interface {
	OnMenu(ctx context.Context, foodID string) (bool, error)
}

// Errors callers test with errors.Is.
var (
	// ErrNotFound: no order has this id.
	ErrNotFound = errors.New("order: not found")
	// ErrMenuUnavailable: the menu could not be read, so the order was
	// not taken; try again.
	ErrMenuUnavailable = errors.New("order: the menu is unavailable")
	// ErrIdempotencyKeyReused: the request's IdempotencyKey created an
	// order for a different request (another food or quantity).
	ErrIdempotencyKeyReused = errors.New("order: the Idempotency-Key was used with a different request")
)

// Config configures the service.
type Config struct {
	// Menu is the Store's menu, checked before an order is taken.
	// Required.
	Menu Menu
	// DeliveryURL is the base URL of the Delivery service's API (its
	// reservation endpoints, dispatch.TryPath and dispatch.ConfirmPath,
	// hang off it). Required.
	DeliveryURL string
	// Expiry is how long the Store and the Delivery service hold a packet
	// or an agent before the saga confirms it. Default 2 minutes; it must
	// cover the Trys' and Confirms' deadlines (saga.Reservations checks).
	Expiry time.Duration
	// Deadline is each Try's deadline (and each Confirm attempt's over the
	// broker); MaxAttempts caps a Try's sends or calls. Default 10 s and 3.
	Deadline    time.Duration
	MaxAttempts int
	// Consumers is how many subscriptions of the consumer group handle
	// the Store's replies at once. Default 4 on PostgreSQL, 1 on SQLite.
	Consumers int
	// Clock drives the saga's deadlines. Default: the system clock.
	Clock timer.Clock
	// Backoff is the delay before an HTTP call to the Delivery service is
	// made again after it failed (timer.Config.Backoff). Default: the
	// timer scheduler's, from 1 s.
	Backoff func(attempt int) time.Duration
	// Logger receives the service's errors. Default: discard.
	Logger *slog.Logger
}

// MaxQuantity is the most packets one order may ask for.
const MaxQuantity = 3

// Service is the Order service on its database.
type Service struct {
	db  *sqldb.DB
	b   broker.Broker
	cfg Config

	relay *outbox.Relay
	sched *timer.Scheduler
	ib    *inbox.Inbox
	orch  *saga.Orchestrator
	defs  map[int]*saga.Definition[sagaData] // by quantity
	subs  []broker.Subscription
	bg    *background.Group

	waiters wake.Waiters
}

// sagaData is the place-order saga's data.
type sagaData struct {
	OrderID  string `json:"order_id"`
	FoodID   string `json:"food_id"`
	Quantity int    `json:"quantity"`
	// Packets, Agent and AgentReservation are read from the Trys' replies.
	Packets          []string `json:"packets,omitempty"`
	Agent            string   `json:"agent,omitempty"`
	AgentReservation string   `json:"agent_reservation,omitempty"`
}

var migrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_orders",
	SQL: `CREATE TABLE delivery_orders (
  id         TEXT PRIMARY KEY,
  food_id    TEXT NOT NULL,
  quantity   INTEGER NOT NULL,
  state      TEXT NOT NULL,
  reason     TEXT NOT NULL DEFAULT '',
  packets    TEXT NOT NULL DEFAULT '',
  agent      TEXT NOT NULL DEFAULT '',
  created_at TIMESTAMP NOT NULL,
  updated_at TIMESTAMP NOT NULL
);
CREATE INDEX delivery_orders_state ON delivery_orders (state)`,
}, {
	// An order placed with an Idempotency-Key keeps it, unique, with the
	// fingerprint of its request; NULL (no key) never conflicts.
	Version: 2,
	Name:    "add_idempotency_key",
	SQL: `ALTER TABLE delivery_orders ADD COLUMN idempotency_key TEXT;
ALTER TABLE delivery_orders ADD COLUMN request_fingerprint TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX delivery_orders_idempotency_key ON delivery_orders (idempotency_key)`,
}}

// Migrate creates the service's tables, with those of the saga, the
// outbox, the inbox and the timers, in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate, timer.Migrate, saga.Migrate} {
		if err := m(ctx, db); err != nil {
			return err
		}
	}
	return db.Migrate(ctx, "delivery.order", migrations)
}

// New returns the service on db (migrated by Migrate), publishing through
// b. Start starts its work.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	var errs []error
	if db == nil || b == nil {
		errs = append(errs, errors.New("New needs a database and a broker"))
	}
	if cfg.Menu == nil {
		errs = append(errs, errors.New("no Menu"))
	}
	if cfg.DeliveryURL == "" {
		errs = append(errs, errors.New("no DeliveryURL"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("order: %w", err)
	}
	if cfg.Expiry == 0 {
		cfg.Expiry = 2 * time.Minute
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
	s := &Service{db: db, b: b, cfg: cfg, defs: map[int]*saga.Definition[sagaData]{}}
	var err error
	if s.relay, err = outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	// A transition may schedule an HTTP call (to the Delivery service) or
	// write commands (to the Store): after each, the scheduler and the
	// relay look at once rather than at their next poll.
	s.sched, err = timer.New(db, timer.Config{Clock: cfg.Clock, Logger: cfg.Logger, Backoff: cfg.Backoff, OnFired: func(fired []timer.Fired) {
		s.relay.Notify()
		s.sched.Notify()
		for _, f := range fired {
			s.waiters.Wake(firedSaga(f))
		}
	}})
	if err != nil {
		return nil, err
	}
	if s.ib, err = inbox.New(db, inbox.Config{AfterCommit: func() { s.relay.Notify(); s.sched.Notify() }, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.orch, err = saga.New(db, s.sched, s.ib, saga.Config{Source: Source, ReplyTopic: ReplyTopic, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	for q := 1; q <= MaxQuantity; q++ {
		def, err := s.placeOrderSaga(q)
		if err != nil {
			return nil, err
		}
		if err := s.orch.Register(def); err != nil {
			return nil, err
		}
		s.defs[q] = def
	}
	return s, nil
}

// placeOrderSaga is the place-order saga of an order of quantity packets:
// the packets at the Store over the broker, the agent at the Delivery
// service over HTTP, reserved then confirmed together.
func (s *Service) placeOrderSaga(quantity int) (*saga.Definition[sagaData], error) {
	var res []saga.Reserve[sagaData]
	for i := 1; i <= quantity; i++ {
		res = append(res, saga.Reserve[sagaData]{
			Name:  fmt.Sprintf("packet%d", i),
			Topic: store.CommandTopic, TryCommand: store.TryPacket, ConfirmCommand: store.ConfirmPacket,
			Input: func(d *sagaData) any { return reserve.SagaRequest{Pool: store.Pool(d.FoodID), Owner: d.OrderID} },
			OnReserved: func(d *sagaData, r *saga.ReplyMsg) error {
				rep, err := decodeReply(r)
				d.Packets = append(d.Packets, rep.Resource)
				return err
			},
			Deadline: s.cfg.Deadline, MaxAttempts: s.cfg.MaxAttempts,
		})
	}
	base := strings.TrimSuffix(s.cfg.DeliveryURL, "/")
	res = append(res, saga.Reserve[sagaData]{
		Name:   "agent",
		TryURL: base + dispatch.TryPath, ConfirmURL: base + dispatch.ConfirmPath,
		Input: func(d *sagaData) any { return reserve.SagaRequest{Pool: dispatch.AgentPool, Owner: d.OrderID} },
		OnReserved: func(d *sagaData, r *saga.ReplyMsg) error {
			rep, err := decodeReply(r)
			d.Agent, d.AgentReservation = rep.Resource, rep.Reservation
			return err
		},
		Deadline: s.cfg.Deadline, MaxAttempts: s.cfg.MaxAttempts,
	})
	steps, err := saga.Reservations[sagaData]{Name: ReservationsName, Expiry: s.cfg.Expiry, Resources: res}.Steps()
	if err != nil {
		return nil, fmt.Errorf("order: %w", err)
	}
	return &saga.Definition[sagaData]{
		Name:          SagaName(quantity),
		Steps:         steps,
		OnCompleted:   s.placed,
		OnCompensated: s.notPlaced,
	}, nil
}

func decodeReply(r *saga.ReplyMsg) (reserve.SagaReply, error) {
	var rep reserve.SagaReply
	if err := json.Unmarshal(r.Msg.Data, &rep); err != nil {
		return rep, fmt.Errorf("order: the reply to %s is no reserve.SagaReply: %w", r.Step, err)
	}
	return rep, nil
}

// placed ends an order PLACED, with what was assigned to it, and
// announces it, in the saga's last transaction.
func (s *Service) placed(ctx context.Context, tx sqldb.Tx, _ string, d *sagaData) error {
	if err := s.end(ctx, tx, d.OrderID, Placed, "", d.Packets, d.Agent); err != nil {
		return err
	}
	m, err := message.NewJSON(Source, EventPlaced, dispatch.Placed{OrderID: d.OrderID, Agent: d.Agent, Reservation: d.AgentReservation})
	if err != nil {
		return err
	}
	m.Subject, m.CorrelationID = d.OrderID, d.OrderID
	return outbox.Add(ctx, tx, EventTopic, m)
}

// notPlaced ends an order NOT_PLACED with the reason the saga failed.
func (s *Service) notPlaced(ctx context.Context, tx sqldb.Tx, _ string, d *sagaData, reason string) error {
	return s.end(ctx, tx, d.OrderID, NotPlaced, explain(reason), nil, "")
}

// explain turns the saga's reason into the customer's.
func explain(reason string) string {
	switch {
	case strings.Contains(reason, `pool "food:`) && strings.Contains(reason, "no free resource"):
		return ReasonSoldOut
	case strings.Contains(reason, `pool "`+dispatch.AgentPool+`"`) && strings.Contains(reason, "no free resource"):
		return ReasonNoAgent
	case strings.Contains(reason, "reservation expired"):
		return ReasonExpired
	case strings.Contains(reason, ReservationsName+".confirm."):
		return ReasonTimedOut
	}
	if len(reason) > maxReasonShown {
		reason = reason[:maxReasonShown] + "..."
	}
	return reasonUnknown + ": " + reason
}

// end moves a pending order to its final state, in tx.
func (s *Service) end(ctx context.Context, tx sqldb.Tx, id string, state State, reason string, packets []string, agent string) error {
	n, err := tx.Exec(ctx, `UPDATE delivery_orders SET state = $1, reason = $2, packets = $3, agent = $4, updated_at = $5
		WHERE id = $6 AND state = $7`, string(state), reason, strings.Join(packets, ","), agent, s.now(), id, string(Pending))
	if err != nil {
		return fmt.Errorf("order: end %s %s: %w", id, state, err)
	}
	if n != 1 {
		return fmt.Errorf("order: %s is not PENDING; cannot make it %s", id, state)
	}
	return nil
}

func (s *Service) now() time.Time { return s.sched.Now().UTC().Truncate(time.Microsecond) }

// Orchestrator returns the service's saga orchestrator, for operators:
// Get, List, History, RetryTx, AbortTx.
func (s *Service) Orchestrator() *saga.Orchestrator { return s.orch }

// Start serves the service until Stop: it subscribes to the saga's
// replies (consumer group "order"), and relays the outbox and fires the
// saga's deadlines and HTTP calls in the background.
func (s *Service) Start(ctx context.Context) error {
	if s.bg != nil {
		return errors.New("order: started already")
	}
	replies := s.waking(s.orch.Handler("order"))
	for range s.cfg.Consumers {
		sub, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: ReplyTopic, Group: "order"}, replies)
		if err != nil {
			background.StopAll(context.WithoutCancel(ctx), s.subs...)
			s.subs = nil
			return err
		}
		s.subs = append(s.subs, sub)
	}
	s.bg = background.Start(ctx, s.relay.Run, s.sched.Run)
	return nil
}

// Stop stops the subscriptions, then the relay and the scheduler, and
// waits for them.
func (s *Service) Stop(ctx context.Context) error {
	errs := []error{background.StopAll(ctx, s.subs...)}
	s.subs = nil
	errs = append(errs, s.bg.Stop())
	s.bg = nil
	return errors.Join(errs...)
}

// Place validates req, checks its food against the menu, and creates the
// order PENDING with its saga, in one local transaction, which it may
// share with orders placed at the same time (sqldb.DB.InGroupTx). An
// invalid request returns a *ValidationError (errors.Is ErrInvalid).
//
// With req.IdempotencyKey set, the key is stored with the order in that
// transaction, under a unique index. A Place whose key an order has
// already returns that order, as it is now, and creates nothing (no order,
// no saga), without asking the menu, or returns an error matching
// ErrIdempotencyKeyReused if that order was placed by a different request.
// Concurrent Places with one key create one order: the index lets one
// insert in, and the others read its order once it has committed.
func (s *Service) Place(ctx context.Context, req PlaceRequest) (Order, error) {
	o, _, err := s.place(ctx, req)
	return o, err
}

// place is Place, telling whether the order is the one req's key had
// created already.
func (s *Service) place(ctx context.Context, req PlaceRequest) (o Order, replayed bool, err error) {
	if err := req.Validate(); err != nil {
		return Order{}, false, err
	}
	var key any // NULL without a key: NULLs never conflict
	fingerprint := ""
	if req.IdempotencyKey != "" {
		key, fingerprint = req.IdempotencyKey, req.fingerprint()
		// A repeat is answered from the database alone, even while the
		// Store is unreachable.
		prev, found, err := orderByKey(ctx, s.db, req.IdempotencyKey, fingerprint)
		if err != nil || found {
			return prev, found, err
		}
	}
	ok, err := s.cfg.Menu.OnMenu(ctx, req.FoodID)
	if err != nil {
		return Order{}, false, fmt.Errorf("%w: %w", ErrMenuUnavailable, err)
	}
	if !ok {
		return Order{}, false, &ValidationError{Field: "food_id", Problem: fmt.Sprintf("no food %q on the menu (GET /foods lists it)", req.FoodID)}
	}
	now := s.now()
	o = Order{ID: message.NewID(), FoodID: req.FoodID, Quantity: req.Quantity, State: Pending, CreatedAt: now, UpdatedAt: now}
	var prev Order
	err = s.db.InGroupTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		replayed = false
		// On PostgreSQL an insert whose key another transaction has just
		// inserted waits for that one to end: it then inserts (the other
		// rolled back) or does nothing, never fails, so the transaction
		// stays usable for reading the other's order.
		n, err := tx.Exec(ctx, `INSERT INTO delivery_orders (id, food_id, quantity, state, created_at, updated_at, idempotency_key, request_fingerprint)
			VALUES ($1, $2, $3, $4, $5, $5, $6, $7) ON CONFLICT (idempotency_key) DO NOTHING`,
			o.ID, o.FoodID, o.Quantity, string(o.State), now, key, fingerprint)
		if err != nil {
			return err
		}
		if n == 0 {
			if key == nil {
				return fmt.Errorf("order %s was not inserted", o.ID)
			}
			var found bool
			prev, found, err = orderByKey(ctx, tx, req.IdempotencyKey, fingerprint)
			if err == nil && !found {
				err = fmt.Errorf("no order has Idempotency-Key %q, yet it conflicts", req.IdempotencyKey)
			}
			replayed = true
			return err
		}
		return s.defs[o.Quantity].StartTx(ctx, tx, s.orch, o.ID, sagaData{OrderID: o.ID, FoodID: o.FoodID, Quantity: o.Quantity})
	})
	switch {
	case errors.Is(err, ErrIdempotencyKeyReused):
		return Order{}, false, err
	case err != nil:
		return Order{}, false, fmt.Errorf("order: place: %w", err)
	case replayed:
		return prev, true, nil
	}
	s.relay.Notify()
	s.sched.Notify()
	return o, false, nil
}

// querier is what reads an order: the DB, or a transaction.
type querier interface {
	QueryRow(ctx context.Context, query string, args ...any) sqldb.Row
}

// orderByKey reads the order that key created, if any, and checks that
// fingerprint is its request's (ErrIdempotencyKeyReused if not).
func orderByKey(ctx context.Context, q querier, key, fingerprint string) (Order, bool, error) {
	var id, was string
	err := q.QueryRow(ctx, `SELECT id, request_fingerprint FROM delivery_orders WHERE idempotency_key = $1`, key).Scan(&id, &was)
	if errors.Is(err, sqldb.ErrNoRows) {
		return Order{}, false, nil
	}
	if err != nil {
		return Order{}, false, fmt.Errorf("order: read the order of Idempotency-Key %q: %w", key, err)
	}
	if was != fingerprint {
		return Order{}, false, fmt.Errorf("%w (key %q)", ErrIdempotencyKeyReused, key)
	}
	o, err := getOrder(ctx, q, id)
	return o, err == nil, err
}

// Get reads an order.
func (s *Service) Get(ctx context.Context, id string) (Order, error) { return getOrder(ctx, s.db, id) }

func getOrder(ctx context.Context, q querier, id string) (Order, error) {
	var o Order
	var state, packets string
	err := q.QueryRow(ctx, `SELECT id, food_id, quantity, state, reason, packets, agent, created_at, updated_at
		FROM delivery_orders WHERE id = $1`, id).
		Scan(&o.ID, &o.FoodID, &o.Quantity, &state, &o.Reason, &packets, &o.Agent, &o.CreatedAt, &o.UpdatedAt)
	if errors.Is(err, sqldb.ErrNoRows) {
		return Order{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err != nil {
		return Order{}, fmt.Errorf("order: read %q: %w", id, err)
	}
	o.State = State(state)
	if packets != "" {
		o.Packets = strings.Split(packets, ",")
	}
	o.CreatedAt, o.UpdatedAt = o.CreatedAt.UTC(), o.UpdatedAt.UTC()
	return o, nil
}

// firedSaga returns the saga a fired timer concerned: a deadline's
// message names it; an HTTP call's task has no message, and its id is
// "saga-http/<saga>/<step>/<op>".
func firedSaga(f timer.Fired) string {
	if f.Msg != nil {
		return f.Msg.Extensions[saga.ExtSagaID]
	}
	if rest, ok := strings.CutPrefix(f.ID, "saga-http/"); ok {
		id, _, _ := strings.Cut(rest, "/")
		return id
	}
	return ""
}

// waking wakes the callers awaiting the orders a batch of replies
// concerned, after the batch's transactions committed.
func (s *Service) waking(h broker.Handler) broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		h(ctx, batch)
		for _, d := range batch {
			if d.Msg != nil {
				s.waiters.Wake(d.Msg.Extensions[saga.ExtSagaID])
			}
		}
	}
}
