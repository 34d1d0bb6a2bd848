// Package shop wires the online shop: the Order service (package order)
// and the Customer service (package customer), each on its own database,
// over one broker. The CreateOrder business transaction runs between them
// either as an orchestrated saga or as a choreography of events (order.Mode).
//
// The services would run as separate processes in production; the shop
// runs them in one so that the example, the demo (troupe demo), the
// benchmark (troupe bench saga) and the tests can start, stop and restart
// each one and then check the shop's invariants (Check).
//
// To try it:
//
//	go run ./examples/shop/cmd/shop            # SQLite files, embedded NATS, HTTP on 127.0.0.1:8080
//	curl -s -XPOST localhost:8080/customers -d '{"id":"c1","name":"Ada","credit_limit":10000}'
//	curl -s -XPOST localhost:8080/orders -d '{"customer_id":"c1","items":[{"sku":"tea","quantity":2,"unit_price":1250}]}'
//	curl -s 'localhost:8080/orders/<id>?wait=5s'
package shop

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// Config configures a shop.
type Config struct {
	// OrderDB and CustomerDB are the services' databases. Required.
	OrderDB, CustomerDB *sqldb.DB
	// Broker connects them. Required.
	Broker broker.Broker
	// Order and Customer configure the services. When the Order service
	// runs choreographed, so does the Customer service
	// (customer.Config.Choreographed).
	Order    order.Config
	Customer customer.Config
}

// Shop is the two services, running.
type Shop struct {
	cfg Config

	mu       sync.Mutex
	order    *running[*order.Service]
	customer *running[*customer.Service]
}

// service is what the shop starts and stops.
type service interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// running is a started service.
type running[S service] struct{ svc S }

func (r *running[S]) stop() error {
	if r == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return r.svc.Stop(ctx)
}

// Start migrates both databases and starts both services. Stop them with
// Stop.
func Start(ctx context.Context, cfg Config) (*Shop, error) {
	if cfg.OrderDB == nil || cfg.CustomerDB == nil || cfg.Broker == nil {
		return nil, errors.New("shop: Start needs both databases and a broker")
	}
	if err := order.Migrate(ctx, cfg.OrderDB); err != nil {
		return nil, fmt.Errorf("shop: migrate the Order database: %w", err)
	}
	if err := customer.Migrate(ctx, cfg.CustomerDB); err != nil {
		return nil, fmt.Errorf("shop: migrate the Customer database: %w", err)
	}
	if cfg.Order.Mode == order.Choreographed {
		cfg.Customer.Choreographed = true
	}
	s := &Shop{cfg: cfg}
	if err := s.StartCustomer(ctx); err != nil {
		return nil, err
	}
	if err := s.StartOrder(ctx); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// StartOrder starts the Order service (again, after StopOrder).
func (s *Shop) StartOrder(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.order != nil {
		return errors.New("shop: the Order service is running")
	}
	svc, err := order.New(s.cfg.OrderDB, s.cfg.Broker, s.cfg.Order)
	if err != nil {
		return err
	}
	if err := svc.Start(ctx); err != nil {
		return err
	}
	s.order = &running[*order.Service]{svc: svc}
	return nil
}

// StopOrder stops the Order service, as a crash would between two
// transactions: what it committed stays, what it had not is redone by the
// next instance.
func (s *Shop) StopOrder() error {
	s.mu.Lock()
	r := s.order
	s.order = nil
	s.mu.Unlock()
	return r.stop()
}

// StartCustomer starts the Customer service (again, after StopCustomer).
func (s *Shop) StartCustomer(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.customer != nil {
		return errors.New("shop: the Customer service is running")
	}
	svc, err := customer.New(s.cfg.CustomerDB, s.cfg.Broker, s.cfg.Customer)
	if err != nil {
		return err
	}
	if err := svc.Start(ctx); err != nil {
		return err
	}
	s.customer = &running[*customer.Service]{svc: svc}
	return nil
}

// StopCustomer stops the Customer service.
func (s *Shop) StopCustomer() error {
	s.mu.Lock()
	r := s.customer
	s.customer = nil
	s.mu.Unlock()
	return r.stop()
}

// Stop stops both services.
func (s *Shop) Stop() error {
	var errOrder error
	var wg sync.WaitGroup
	wg.Go(func() { errOrder = s.StopOrder() })
	errCustomer := s.StopCustomer()
	wg.Wait()
	return errors.Join(errOrder, errCustomer)
}

// Order returns the running Order service, or nil.
func (s *Shop) Order() *order.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.order == nil {
		return nil
	}
	return s.order.svc
}

// Customer returns the running Customer service, or nil.
func (s *Shop) Customer() *customer.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.customer == nil {
		return nil
	}
	return s.customer.svc
}

// Handler serves both services' HTTP APIs (/orders..., /customers...),
// routing to whichever instance is running; 503 while one is stopped.
func (s *Shop) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var h http.Handler
		switch {
		case strings.HasPrefix(r.URL.Path, "/orders"):
			if o := s.Order(); o != nil {
				h = o.Handler()
			}
		case strings.HasPrefix(r.URL.Path, "/customers"):
			if c := s.Customer(); c != nil {
				h = c.Handler()
			}
		default:
			http.NotFound(w, r)
			return
		}
		if h == nil {
			http.Error(w, "service restarting", http.StatusServiceUnavailable)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// Totals counts orders by state.
type Totals struct {
	Approved, Rejected, Cancelled, Pending int
	// Sagas counts orchestrated sagas by status.
	Sagas map[saga.Status]int
}

// Count reads the totals from the Order database.
func (s *Shop) Count(ctx context.Context) (Totals, error) {
	t := Totals{Sagas: map[saga.Status]int{}}
	rows, err := s.cfg.OrderDB.Query(ctx, `SELECT state, count(*) FROM shop_orders GROUP BY state`)
	if err != nil {
		return t, err
	}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			rows.Close()
			return t, err
		}
		switch order.State(st) {
		case order.Approved:
			t.Approved = n
		case order.Rejected:
			t.Rejected = n
		case order.Cancelled:
			t.Cancelled = n
		case order.Pending:
			t.Pending = n
		}
	}
	if err := rows.Close(); err != nil {
		return t, err
	}
	rows, err = s.cfg.OrderDB.Query(ctx, `SELECT status, count(*) FROM troupe_sagas GROUP BY status`)
	if err != nil {
		return t, err
	}
	defer rows.Close()
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return t, err
		}
		t.Sagas[saga.Status(st)] = n
	}
	return t, rows.Err()
}

// The invariants CheckDatabases reads, by name, in the order it reports
// them.
const (
	InvEveryOrderEnded  = "every order ended"
	InvEverySagaEnded   = "every saga ended"
	InvEveryFlowEnded   = "every flow ended"
	InvOutboxDelivered  = "every outbox message delivered"
	InvStateMatchesSaga = "order state matches its saga"
	InvReservedApproved = "reserved credit = approved orders"
	InvWithinLimit      = "reserved credit within the limit"
)

// Violation is a broken invariant.
type Violation struct {
	// Invariant names the rule (one of the Inv constants).
	Invariant string
	// Detail says where and how it is broken.
	Detail string
}

func (v Violation) String() string { return v.Invariant + ": " + v.Detail }

// Check reads both databases and returns every broken invariant of a
// quiescent shop: CheckDatabases on the shop's databases.
func (s *Shop) Check(ctx context.Context) ([]Violation, error) {
	return CheckDatabases(ctx, s.cfg.OrderDB, s.cfg.CustomerDB)
}

// CheckDatabases reads the Order and the Customer databases, and only
// them, and returns every broken invariant of a quiescent shop (no order
// in flight), so a process that did not run the services (a checker, a
// fault-injection harness) can call it:
//
//   - every order has ended (none PENDING), every saga has ended
//     (completed or compensated; none running, compensating or parked),
//     and every choreographed flow has ended;
//   - every message written to either service's outbox has been
//     delivered to the broker (none with delivered_at unset);
//   - each order's state matches its saga's (APPROVED ⇔ completed);
//   - for every customer, reserved credit equals the sum of its approved
//     orders' totals (no credit reserved twice, none leaked by a
//     cancelled or rejected order);
//   - no customer's reserved credit exceeds its limit.
func CheckDatabases(ctx context.Context, orderDB, customerDB *sqldb.DB) ([]Violation, error) {
	var out []Violation
	add := func(inv, format string, args ...any) {
		out = append(out, Violation{Invariant: inv, Detail: fmt.Sprintf(format, args...)})
	}
	var pending, unfinished int
	if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM shop_orders WHERE state = $1`, string(order.Pending)).Scan(&pending); err != nil {
		return nil, err
	}
	if pending > 0 {
		add(InvEveryOrderEnded, "%d orders are still PENDING", pending)
	}
	if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM troupe_sagas WHERE status NOT IN ($1, $2)`,
		string(saga.Completed), string(saga.Compensated)).Scan(&unfinished); err != nil {
		return nil, err
	}
	if unfinished > 0 {
		add(InvEverySagaEnded, "%d sagas are running, compensating or parked", unfinished)
	}
	// Choreographed orders are tracked as flows; each must have ended too
	// (the tracker reads the events after the fact, so a check right after
	// the last order ended may see it a little behind).
	var running int
	if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM troupe_flows WHERE status = 'running'`).Scan(&running); err != nil {
		return nil, err
	}
	if running > 0 {
		add(InvEveryFlowEnded, "%d choreographed flows are still running", running)
	}
	for _, db := range []struct {
		name string
		db   *sqldb.DB
	}{{"Order", orderDB}, {"Customer", customerDB}} {
		var undelivered int
		if err := db.db.QueryRow(ctx, `SELECT count(*) FROM `+outbox.Table+` WHERE delivered_at IS NULL`).Scan(&undelivered); err != nil {
			return nil, err
		}
		if undelivered > 0 {
			add(InvOutboxDelivered, "%s database: %d outbox messages are not delivered", db.name, undelivered)
		}
	}
	var mismatched int
	if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM shop_orders o JOIN troupe_sagas g ON g.id = o.id
		WHERE (o.state = $1) <> (g.status = $2)`, string(order.Approved), string(saga.Completed)).Scan(&mismatched); err != nil {
		return nil, err
	}
	if mismatched > 0 {
		add(InvStateMatchesSaga, "%d orders are APPROVED without a completed saga, or the reverse", mismatched)
	}
	approved := map[string]int64{}
	rows, err := orderDB.Query(ctx, `SELECT customer_id, sum(total) FROM shop_orders WHERE state = $1 GROUP BY customer_id`, string(order.Approved))
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var c string
		var sum int64
		if err := rows.Scan(&c, &sum); err != nil {
			rows.Close()
			return nil, err
		}
		approved[c] = sum
	}
	if err := rows.Close(); err != nil {
		return nil, err
	}
	rows, err = customerDB.Query(ctx, `SELECT id, credit_limit, reserved FROM shop_customers ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var limit, reserved int64
		if err := rows.Scan(&id, &limit, &reserved); err != nil {
			return nil, err
		}
		if reserved != approved[id] {
			add(InvReservedApproved, "customer %s has %d reserved, its approved orders total %d", id, reserved, approved[id])
		}
		if reserved > limit {
			add(InvWithinLimit, "customer %s has %d reserved over a limit of %d", id, reserved, limit)
		}
	}
	return out, rows.Err()
}
