// Package dispatch is the Delivery service of the food-delivery example:
// it keeps the delivery agents, each an individual resource (package
// reserve) of the pool AgentPool, and sends one out with each placed
// order. Agents are scarce and come back: once an order is delivered, its
// agent's reservation is released (reserve.Reserver.Release) and the
// agent is free for the next order.
//
// It takes part in the Order service's place-order saga over HTTP, to
// show a participant that no broker reaches: the saga POSTs the agent's
// try and confirm (and their cancels) to TryPath and ConfirmPath, served by
// saga.Participant.HTTPHandler, where each call's barrier, its writes and
// its answer commit in one transaction, so a repeated call (a retry after
// a lost response) gets the first answer and has no second effect.
//
// It learns that an order was placed from the Order service's OrderPlaced
// event (inbox: once), and, with Config.DeliverAfter, schedules in that
// transaction a durable timer that marks the order delivered then — the
// example's stand-in for the agent riding there and back. An operator or
// an agent's app says so at once with Delivered.
package dispatch

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
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Wire names: the pool, command types, paths and events of the service's
// contract. They never change.
const (
	// Source is the service's CloudEvents source.
	Source = "/delivery/dispatch"
	// AgentPool is the reserve pool of the agents.
	AgentPool = "agents"
	// TryAgent holds a free agent (phase 1); its compensation releases it.
	TryAgent = "delivery.dispatch.agent.try"
	// ConfirmAgent assigns the held agent to the order (phase 2); its
	// compensation un-assigns it.
	ConfirmAgent = "delivery.dispatch.agent.confirm"
	// TryPath and ConfirmPath are where the saga POSTs the two phases.
	TryPath     = "/reservations/agent/try"
	ConfirmPath = "/reservations/agent/confirm"
	// OrderEventTopic and OrderPlaced are the Order service's event the
	// service reacts to, repeated here so that the services share a
	// contract, not a Go package.
	OrderEventTopic = "delivery.order.events"
	OrderPlaced     = "delivery.order.placed"
	// deliveredHandler names the timer handler that ends a delivery.
	deliveredHandler = "delivery.dispatch.delivered"
)

// Placed is the data of an OrderPlaced event: the order and the agent's
// reservation, which its delivery releases.
type Placed struct {
	OrderID     string `json:"order_id"`
	Agent       string `json:"agent"`
	Reservation string `json:"agent_reservation"`
}

// Agent is an agent as the service sees it.
type Agent struct {
	ID string `json:"id"`
	// State is free, held (an order in flight) or assigned (delivering).
	State reserve.ResourceState `json:"state"`
	// Order is the order it is held or assigned for ("" when free).
	Order string `json:"order,omitempty"`
}

// ErrNotFound is returned by Delivered for an order no agent was assigned
// to.
var ErrNotFound = errors.New("dispatch: no agent assigned to the order")

// Config configures the service. The zero value gives the defaults.
type Config struct {
	// Clock drives the agents' expiry timers and the deliveries. Default:
	// the system clock.
	Clock timer.Clock
	// Logger receives the service's errors. Default: discard.
	Logger *slog.Logger
	// DeliverAfter, when positive, is how long after an order is placed
	// its agent is back and free again: the service subscribes to the
	// Order service's events and schedules each delivery's end. Default 0:
	// an agent stays assigned until Delivered.
	DeliverAfter time.Duration
	// Unavailable is the share (0..1) of calls to ConfirmPath answered 503
	// before any work, as an overloaded service would (the demo's injected
	// fault): the saga calls again. Default 0.
	Unavailable float64
	// Seed seeds the fault injection. Default 1.
	Seed uint64
}

// Service is the Delivery service on its database.
type Service struct {
	db  *sqldb.DB
	b   broker.Broker
	cfg Config

	sched *timer.Scheduler
	ib    *inbox.Inbox
	part  *saga.Participant
	res   *reserve.Reserver
	subs  []broker.Subscription
	bg    *background.Group

	mu       sync.Mutex
	rng      *rand.Rand
	injected int
}

// Migrate creates the service's tables, with those of the inbox, the
// timers, the saga participant's answers and the reservations, in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{inbox.Migrate, timer.Migrate, saga.Migrate, reserve.Migrate} {
		if err := m(ctx, db); err != nil {
			return err
		}
	}
	return nil
}

// New returns the service on db (migrated by Migrate). Start starts its
// work; Handler serves its HTTP API.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("dispatch: New needs a database and a broker")
	}
	if cfg.Unavailable < 0 || cfg.Unavailable > 1 {
		return nil, fmt.Errorf("dispatch: Unavailable %v: want 0..1", cfg.Unavailable)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	s := &Service{db: db, b: b, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0xa6e7))}
	var err error
	if s.sched, err = timer.New(db, timer.Config{Clock: cfg.Clock, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.res, err = reserve.New(db, s.sched, reserve.Config{}); err != nil {
		return nil, err
	}
	if err := s.sched.Handle(deliveredHandler, s.onDelivered); err != nil {
		return nil, err
	}
	// A delivery scheduled by an event wakes the scheduler, which then
	// waits for it rather than for its next poll.
	if s.ib, err = inbox.New(db, inbox.Config{Logger: cfg.Logger, AfterCommit: s.sched.Notify}); err != nil {
		return nil, err
	}
	if s.part, err = saga.NewParticipant(s.ib, Source); err != nil {
		return nil, err
	}
	if err := s.res.HandleSaga(s.part, TryAgent, ConfirmAgent); err != nil {
		return nil, err
	}
	return s, nil
}

// Start runs the service until Stop: the agents' expiry timers and the
// deliveries' ends in the background and, with Config.DeliverAfter, the
// subscription to the Order service's events (consumer group
// "dispatch").
func (s *Service) Start(ctx context.Context) error {
	if s.bg != nil {
		return errors.New("dispatch: started already")
	}
	if s.cfg.DeliverAfter > 0 {
		sub, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: OrderEventTopic, Group: "dispatch"}, s.ib.Handler("dispatch-orders", s.onOrderEvent))
		if err != nil {
			return err
		}
		s.subs = []broker.Subscription{sub}
	}
	s.bg = background.Start(ctx, s.sched.Run)
	return nil
}

// Stop stops the subscription and the timers, and waits for them.
func (s *Service) Stop(ctx context.Context) error {
	errs := []error{background.StopAll(ctx, s.subs...)}
	s.subs = nil
	errs = append(errs, s.bg.Stop())
	s.bg = nil
	return errors.Join(errs...)
}

// AddAgents adds agents, free, to AgentPool; an agent already there is
// left as it is.
func (s *Service) AddAgents(ctx context.Context, ids ...string) error {
	return s.res.Add(ctx, AgentPool, ids...)
}

// Agents lists the agents, by id, with the order each is out for.
func (s *Service) Agents(ctx context.Context) ([]Agent, error) {
	rs, err := s.res.Resources(ctx, AgentPool)
	if err != nil {
		return nil, err
	}
	out := make([]Agent, len(rs))
	for i, r := range rs {
		out[i] = Agent{ID: r.ID, State: r.State, Order: r.Owner}
	}
	return out, nil
}

// Delivered ends the delivery of order orderID: its agent is free again.
// Saying it twice has no second effect. An order with no agent assigned
// (not placed, or unknown) gives an error matching ErrNotFound.
func (s *Service) Delivered(ctx context.Context, orderID string) (reserve.Reservation, error) {
	rs, err := s.res.List(ctx, reserve.Filter{Pool: AgentPool, Owner: orderID})
	if err != nil {
		return reserve.Reservation{}, err
	}
	for _, r := range rs {
		if r.State == reserve.Confirmed || r.State == reserve.Released {
			return s.res.Release(ctx, r.ID)
		}
	}
	return reserve.Reservation{}, fmt.Errorf("%w: %q", ErrNotFound, orderID)
}

// onOrderEvent schedules the end of a placed order's delivery, in the
// transaction that records the event in the inbox: once, durably.
func (s *Service) onOrderEvent(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	if m.Type != OrderPlaced {
		return nil
	}
	var p Placed
	if err := json.Unmarshal(m.Data, &p); err != nil || p.Reservation == "" {
		return inbox.Permanent(fmt.Errorf("dispatch: malformed %s data (%v)", m.Type, err))
	}
	t := message.New(Source, deliveredHandler, nil)
	t.ID, t.Subject = "delivered/"+p.OrderID, p.Reservation
	err := s.sched.ScheduleTx(ctx, tx, s.sched.Now().Add(s.cfg.DeliverAfter), timer.ToHandler(deliveredHandler), t)
	if errors.Is(err, timer.ErrExists) {
		return nil
	}
	return err
}

// onDelivered releases the agent of a delivery that has ended.
func (s *Service) onDelivered(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	_, err := s.res.ReleaseTx(ctx, tx, f.Msg.Subject)
	if errors.Is(err, reserve.ErrNotConfirmed) || errors.Is(err, reserve.ErrNotFound) {
		return timer.Permanent(err)
	}
	return err
}

// inject reports whether to answer a call 503, with probability
// Unavailable.
func (s *Service) inject() bool {
	if s.cfg.Unavailable == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rng.Float64() >= s.cfg.Unavailable {
		return false
	}
	s.injected++
	return true
}

// Injected returns how many calls the service answered 503 on purpose.
func (s *Service) Injected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.injected
}

// Reserver returns the service's reservations of agents, for operators:
// Get, List, Resources.
func (s *Service) Reserver() *reserve.Reserver { return s.res }
