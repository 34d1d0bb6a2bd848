// Package delivery wires the food-delivery example: three services, each
// on its own database — the Order service (package order), the Store
// service (package store: foods and their packets) and the Delivery
// service (package dispatch: the agents). An order is placed by a saga of
// reservations (saga.Reservations, package reserve): it holds the
// order's packets at the Store, reached over the broker, and an agent at
// the Delivery service, reached over HTTP, then confirms them; the
// customer sees PLACED only when every one is assigned, and NOT_PLACED
// otherwise, with nothing left held.
//
// The services would run as separate processes in production; the
// example runs them in one so that the demo (troupe demo delivery) and
// the tests can stop and restart each one mid-run and then check the
// invariants across the three databases (Check). The Delivery service's
// API listens on a port of its own (Config.DeliveryAddr), which the Order
// service calls; while the service is stopped it answers 503, as a load
// balancer with no instance behind it would.
//
// To try it:
//
//	go run ./examples/delivery/cmd/delivery     # SQLite files, embedded NATS, HTTP on 127.0.0.1:8081
//	curl -s localhost:8081/foods
//	curl -s -XPOST localhost:8081/orders -d '{"food_id":"pizza","quantity":2}'
//	curl -s 'localhost:8081/orders/<id>?wait=5s'
package delivery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/sqldb"
)

// Config configures the example.
type Config struct {
	// OrderDB, StoreDB and DeliveryDB are the services' databases.
	// Required.
	OrderDB, StoreDB, DeliveryDB *sqldb.DB
	// Broker connects the Order service and the Store. Required.
	Broker broker.Broker
	// DeliveryAddr is where the Delivery service's API listens, for the
	// Order service's calls. Default "127.0.0.1:0": a free port.
	DeliveryAddr string
	// Order, Store and Delivery configure the services. Start sets
	// Order.Menu (the running Store) and Order.DeliveryURL.
	Order    order.Config
	Store    store.Config
	Delivery dispatch.Config
}

// Services is the three services, running.
type Services struct {
	cfg Config
	ln  net.Listener
	srv *http.Server

	mu       sync.Mutex
	order    *order.Service
	store    *store.Service
	delivery *dispatch.Service
}

// Start migrates the three databases, starts the Delivery service's API,
// and starts the services. Stop them with Stop.
func Start(ctx context.Context, cfg Config) (*Services, error) {
	if cfg.OrderDB == nil || cfg.StoreDB == nil || cfg.DeliveryDB == nil || cfg.Broker == nil {
		return nil, errors.New("delivery: Start needs the three databases and a broker")
	}
	for _, m := range []struct {
		name    string
		migrate func(context.Context, *sqldb.DB) error
		db      *sqldb.DB
	}{{"Order", order.Migrate, cfg.OrderDB}, {"Store", store.Migrate, cfg.StoreDB}, {"Delivery", dispatch.Migrate, cfg.DeliveryDB}} {
		if err := m.migrate(ctx, m.db); err != nil {
			return nil, fmt.Errorf("delivery: migrate the %s database: %w", m.name, err)
		}
	}
	if cfg.DeliveryAddr == "" {
		cfg.DeliveryAddr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", cfg.DeliveryAddr)
	if err != nil {
		return nil, fmt.Errorf("delivery: listen for the Delivery service: %w", err)
	}
	s := &Services{cfg: cfg, ln: ln}
	s.cfg.Order.Menu = menu{s}
	s.cfg.Order.DeliveryURL = "http://" + ln.Addr().String()
	s.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var h http.Handler
		if d := s.Delivery(); d != nil {
			h = d.Handler()
		}
		serve(w, r, h)
	}), ReadHeaderTimeout: 5 * time.Second}
	go s.srv.Serve(ln)
	for _, start := range []func(context.Context) error{s.StartDelivery, s.StartStore, s.StartOrder} {
		if err := start(ctx); err != nil {
			s.Stop()
			return nil, err
		}
	}
	return s, nil
}

// DeliveryURL is the base URL of the Delivery service's API.
func (s *Services) DeliveryURL() string { return s.cfg.Order.DeliveryURL }

// menu is the running Store's menu: the Order service's stand-in for a
// call to GET /foods/{id}.
type menu struct{ s *Services }

func (m menu) OnMenu(ctx context.Context, foodID string) (bool, error) {
	st := m.s.Store()
	if st == nil {
		return false, errors.New("the Store service is down")
	}
	return st.OnMenu(ctx, foodID)
}

// service is what Services starts and stops.
type service interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// startService makes a service with make, starts it, and keeps it in
// *slot, unless one runs there already.
func startService[S service](ctx context.Context, s *Services, name string, slot *S, make func() (S, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var none S
	if any(*slot) != any(none) {
		return fmt.Errorf("delivery: the %s service is running", name)
	}
	svc, err := make()
	if err != nil {
		return err
	}
	if err := svc.Start(ctx); err != nil {
		return err
	}
	*slot = svc
	return nil
}

// stopService stops the service in *slot, if any, as a crash would
// between two transactions: what it committed stays, the rest is redone
// by the next instance.
func stopService[S service](s *Services, slot *S) error {
	s.mu.Lock()
	svc := *slot
	var none S
	*slot = none
	s.mu.Unlock()
	if any(svc) == any(none) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return svc.Stop(ctx)
}

// StartOrder starts the Order service (again, after StopOrder).
func (s *Services) StartOrder(ctx context.Context) error {
	return startService(ctx, s, "Order", &s.order, func() (*order.Service, error) {
		return order.New(s.cfg.OrderDB, s.cfg.Broker, s.cfg.Order)
	})
}

// StopOrder stops the Order service.
func (s *Services) StopOrder() error { return stopService(s, &s.order) }

// StartStore starts the Store service (again, after StopStore).
func (s *Services) StartStore(ctx context.Context) error {
	return startService(ctx, s, "Store", &s.store, func() (*store.Service, error) {
		return store.New(s.cfg.StoreDB, s.cfg.Broker, s.cfg.Store)
	})
}

// StopStore stops the Store service: its commands wait in the broker, its
// packets' expiry timers in its database.
func (s *Services) StopStore() error { return stopService(s, &s.store) }

// StartDelivery starts the Delivery service (again, after StopDelivery).
func (s *Services) StartDelivery(ctx context.Context) error {
	return startService(ctx, s, "Delivery", &s.delivery, func() (*dispatch.Service, error) {
		return dispatch.New(s.cfg.DeliveryDB, s.cfg.Broker, s.cfg.Delivery)
	})
}

// StopDelivery stops the Delivery service: its API answers 503 until it
// starts again.
func (s *Services) StopDelivery() error { return stopService(s, &s.delivery) }

// Stop stops the three services and the Delivery service's API.
func (s *Services) Stop() error {
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i, stop := range []func() error{s.StopOrder, s.StopStore, s.StopDelivery} {
		wg.Go(func() { errs[i] = stop() })
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		errs = append(errs, s.srv.Close())
	}
	return errors.Join(errs...)
}

// Order returns the running Order service, or nil.
func (s *Services) Order() *order.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.order
}

// Store returns the running Store service, or nil.
func (s *Services) Store() *store.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.store
}

// Delivery returns the running Delivery service, or nil.
func (s *Services) Delivery() *dispatch.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivery
}

// Handler serves the three services' HTTP APIs (/orders..., /foods...,
// /agents, /deliveries..., /reservations...), routing to whichever
// instance is running; 503 while one is stopped.
func (s *Services) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var h http.Handler
		switch p := r.URL.Path; {
		case strings.HasPrefix(p, "/orders"):
			if o := s.Order(); o != nil {
				h = o.Handler()
			}
		case strings.HasPrefix(p, "/foods"):
			if st := s.Store(); st != nil {
				h = st.Handler()
			}
		case strings.HasPrefix(p, "/agents"), strings.HasPrefix(p, "/deliveries"), strings.HasPrefix(p, "/reservations"):
			if d := s.Delivery(); d != nil {
				h = d.Handler()
			}
		default:
			http.NotFound(w, r)
			return
		}
		serve(w, r, h)
	})
}

// serve serves r with h, or answers 503 when h's service is down (nil).
func serve(w http.ResponseWriter, r *http.Request, h http.Handler) {
	if h == nil {
		http.Error(w, "service down", http.StatusServiceUnavailable)
		return
	}
	h.ServeHTTP(w, r)
}
