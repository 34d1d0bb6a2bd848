// Package store is the Store service of the food-delivery example: it
// keeps the menu's foods and, for each food, its packets, ready to hand
// to a courier. A packet is an individual resource (package reserve) of
// the pool Pool(food): an order reserves specific packets, not a count of
// stock.
//
// It takes part in the Order service's place-order saga over the broker:
// a saga.Participant on CommandTopic serves the packets' try / confirm /
// cancel (reserve.Reserver.HandleSaga), each command handled once (the
// inbox), its writes, its barrier and its reply committed together (the
// outbox). A packet held and never confirmed is released at its expiry by
// a durable timer, even if the Order service is never heard from again.
package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/internal/background"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// Wire names: the topic and command types of the service's contract. They
// never change.
const (
	// Source is the service's CloudEvents source.
	Source = "/delivery/store"
	// CommandTopic receives the saga's packet commands.
	CommandTopic = "delivery.store.commands"
	// TryPacket holds a free packet (phase 1); its compensation releases it.
	TryPacket = "delivery.store.packet.try"
	// ConfirmPacket assigns the held packet to the order (phase 2); its
	// compensation un-assigns it.
	ConfirmPacket = "delivery.store.packet.confirm"
)

// Pool is the reserve pool of a food's packets.
func Pool(foodID string) string { return "food:" + foodID }

// Food is a food of the menu, with its packets counted by state.
type Food struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// Free, Held and Assigned count its packets: free to reserve, held by
	// an order in flight, assigned to a placed order.
	Free     int `json:"free"`
	Held     int `json:"held"`
	Assigned int `json:"assigned"`
}

// ErrNotFound is returned for a food id not on the menu.
var ErrNotFound = errors.New("store: no such food")

// Config configures the service. The zero value gives the defaults.
type Config struct {
	// Clock drives the packets' expiry timers. Default: the system clock.
	Clock timer.Clock
	// Logger receives the service's errors. Default: discard.
	Logger *slog.Logger
	// FailConfirms is the share (0..1) of ConfirmPacket deliveries that
	// fail once with a transient error before any write, to show the
	// broker's redelivery within the reservation's expiry (the demo's
	// injected fault). Default 0.
	FailConfirms float64
	// Seed seeds the fault injection. Default 1.
	Seed uint64
	// Backoff is the inbox's redelivery delay after a transient failure
	// (inbox.Config.Backoff). Default: the inbox's.
	Backoff func(attempt int) time.Duration
	// Consumers is how many subscriptions of the consumer group take
	// commands at once. Default 4 on PostgreSQL, 1 on SQLite (whose write
	// transactions take turns).
	Consumers int
}

// Service is the Store service on its database.
type Service struct {
	db  *sqldb.DB
	b   broker.Broker
	cfg Config

	relay *outbox.Relay
	sched *timer.Scheduler
	ib    *inbox.Inbox
	part  *saga.Participant
	res   *reserve.Reserver
	subs  []broker.Subscription
	bg    *background.Group

	mu       sync.Mutex
	rng      *rand.Rand
	failed   map[string]bool // ids of the messages failed once
	injected int
}

var migrations = []sqldb.Migration{{
	Version: 1,
	Name:    "create_foods",
	SQL: `CREATE TABLE delivery_foods (
  id   TEXT PRIMARY KEY,
  name TEXT NOT NULL
)`,
}}

// Migrate creates the service's tables, with those of the outbox, the
// inbox, the timers and the reservations, in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate, timer.Migrate, reserve.Migrate} {
		if err := m(ctx, db); err != nil {
			return err
		}
	}
	return db.Migrate(ctx, "delivery.store", migrations)
}

// New returns the service on db (migrated by Migrate), replying through b.
// Start starts its work.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("store: New needs a database and a broker")
	}
	if cfg.FailConfirms < 0 || cfg.FailConfirms > 1 {
		return nil, fmt.Errorf("store: FailConfirms %v: want 0..1", cfg.FailConfirms)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	if cfg.Consumers <= 0 {
		cfg.Consumers = 1
		if db.Dialect() == sqldb.Postgres {
			cfg.Consumers = 4
		}
	}
	s := &Service{db: db, b: b, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x570e)), failed: map[string]bool{}}
	var err error
	if s.relay, err = outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.sched, err = timer.New(db, timer.Config{Clock: cfg.Clock, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	if s.res, err = reserve.New(db, s.sched, reserve.Config{}); err != nil {
		return nil, err
	}
	if s.ib, err = inbox.New(db, inbox.Config{AfterCommit: s.relay.Notify, Logger: cfg.Logger, Backoff: cfg.Backoff}); err != nil {
		return nil, err
	}
	if s.part, err = saga.NewParticipant(s.ib, Source); err != nil {
		return nil, err
	}
	if err := s.res.HandleSaga(s.part, TryPacket, ConfirmPacket); err != nil {
		return nil, err
	}
	return s, nil
}

// Start serves until Stop: it takes the saga's commands from CommandTopic
// (consumer group "store"), relays its replies, and fires the packets'
// expiry timers in the background.
func (s *Service) Start(ctx context.Context) error {
	if s.bg != nil {
		return errors.New("store: started already")
	}
	h := s.ib.Handler("store", s.handle)
	for range s.cfg.Consumers {
		sub, err := s.b.Subscribe(ctx, broker.SubscribeConfig{Topic: CommandTopic, Group: "store"}, h)
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

// Stop stops taking commands, then the relay and the expiry timers, and
// waits for them: what was committed stays, the rest waits in the broker
// for the next instance.
func (s *Service) Stop(ctx context.Context) error {
	errs := []error{background.StopAll(ctx, s.subs...)}
	s.subs = nil
	errs = append(errs, s.bg.Stop())
	s.bg = nil
	return errors.Join(errs...)
}

// handle serves one saga command, after the fault injection.
func (s *Service) handle(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	if err := s.inject(m); err != nil {
		return err
	}
	return s.part.HandleTx(ctx, tx, m)
}

// inject fails a ConfirmPacket delivery, once per message, with
// probability FailConfirms.
func (s *Service) inject(m *message.Message) error {
	if s.cfg.FailConfirms == 0 || m.Type != ConfirmPacket {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed[m.ID] || s.rng.Float64() >= s.cfg.FailConfirms {
		return nil
	}
	s.failed[m.ID] = true
	s.injected++
	return errors.New("store: injected transient failure")
}

// Injected returns how many transient failures the service injected.
func (s *Service) Injected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.injected
}

// AddFood puts a food on the menu with packets new packets, named
// "<id>-001", "<id>-002"...; adding to a food on the menu adds packets
// after those it has.
func (s *Service) AddFood(ctx context.Context, id, name string, packets int) error {
	if strings.TrimSpace(id) == "" || strings.TrimSpace(name) == "" || packets < 0 {
		return fmt.Errorf("store: AddFood needs an id, a name and a packet count of at least 0 (have %q, %q, %d)", id, name, packets)
	}
	return s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO delivery_foods (id, name) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = $2`, id, name); err != nil {
			return fmt.Errorf("store: add food %q: %w", id, err)
		}
		if packets == 0 {
			return nil
		}
		var have int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM troupe_resources WHERE pool = $1`, Pool(id)).Scan(&have); err != nil {
			return fmt.Errorf("store: count the packets of %q: %w", id, err)
		}
		ids := make([]string, packets)
		for i := range ids {
			ids[i] = fmt.Sprintf("%s-%03d", id, have+i+1)
		}
		return s.res.AddTx(ctx, tx, Pool(id), ids...)
	})
}

// Foods returns the menu, by id, with the packets of each food counted.
func (s *Service) Foods(ctx context.Context) ([]Food, error) {
	rows, err := s.db.Query(ctx, `SELECT f.id, f.name,
		  COALESCE(SUM(CASE WHEN r.state = 'free' THEN 1 ELSE 0 END), 0),
		  COALESCE(SUM(CASE WHEN r.state = 'held' THEN 1 ELSE 0 END), 0),
		  COALESCE(SUM(CASE WHEN r.state = 'assigned' THEN 1 ELSE 0 END), 0)
		FROM delivery_foods f LEFT JOIN troupe_resources r ON r.pool = 'food:' || f.id
		GROUP BY f.id, f.name ORDER BY f.id`)
	if err != nil {
		return nil, fmt.Errorf("store: list foods: %w", err)
	}
	defer rows.Close()
	var out []Food
	for rows.Next() {
		var f Food
		if err := rows.Scan(&f.ID, &f.Name, &f.Free, &f.Held, &f.Assigned); err != nil {
			return nil, fmt.Errorf("store: list foods: %w", err)
		}
		out = append(out, f)
	}
	return out, rows.Err()
}

// Food returns one food of the menu, or an error matching ErrNotFound.
func (s *Service) Food(ctx context.Context, id string) (Food, error) {
	foods, err := s.Foods(ctx)
	if err != nil {
		return Food{}, err
	}
	for _, f := range foods {
		if f.ID == id {
			return f, nil
		}
	}
	return Food{}, fmt.Errorf("%w: %q", ErrNotFound, id)
}

// OnMenu reports whether food id is on the menu. It is what the Order
// service asks before it takes an order (order.Menu).
func (s *Service) OnMenu(ctx context.Context, id string) (bool, error) {
	var n int
	if err := s.db.QueryRow(ctx, `SELECT count(*) FROM delivery_foods WHERE id = $1`, id).Scan(&n); err != nil {
		return false, fmt.Errorf("store: look up food %q: %w", id, err)
	}
	return n == 1, nil
}

// Reserver returns the service's reservations of packets, for operators:
// Get, List, Resources.
func (s *Service) Reserver() *reserve.Reserver { return s.res }
