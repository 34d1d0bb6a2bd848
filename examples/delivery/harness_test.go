package delivery_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// harness is the example on three fresh databases of one dialect and an
// embedded NATS JetStream server, with pizza (Packets of them), soup
// (none) and Agents agents.
type harness struct {
	t   *testing.T
	ctx context.Context
	s   *delivery.Services
	cfg delivery.Config
	// clock is the services' fake clock, nil on the system clock.
	clock *clocktest.Clock
}

// setup says what a harness starts with.
type setup struct {
	packets, agents int
	fakeClock       bool
	// wrap, when set, wraps the broker (to inject faults).
	wrap func(broker.Broker) broker.Broker
	// cfg, when set, edits the configuration.
	cfg func(*delivery.Config)
}

func newHarness(t *testing.T, kind string, su setup) *harness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	nb, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nb.Close() })
	var b broker.Broker = nb
	if su.wrap != nil {
		b = su.wrap(nb)
	}
	open := func(name string) *sqldb.DB {
		url := "sqlite://" + filepath.Join(t.TempDir(), name+".db")
		if kind == "postgres" {
			url = pgtest.URL(t)
		}
		db, err := sqldb.Open(ctx, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	cfg := delivery.Config{OrderDB: open("order"), StoreDB: open("store"), DeliveryDB: open("delivery"), Broker: b}
	h := &harness{t: t, ctx: ctx}
	if su.fakeClock {
		h.clock = clocktest.New(time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC))
		cfg.Order.Clock, cfg.Store.Clock, cfg.Delivery.Clock = h.clock, h.clock, h.clock
	}
	if su.cfg != nil {
		su.cfg(&cfg)
	}
	s, err := delivery.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("stop the services: %v", err)
		}
	})
	h.s, h.cfg = s, cfg
	if err := s.Store().AddFood(ctx, "pizza", "Pizza", su.packets); err != nil {
		t.Fatal(err)
	}
	if err := s.Store().AddFood(ctx, "soup", "Soup", 0); err != nil {
		t.Fatal(err)
	}
	if su.agents > 0 {
		ids := make([]string, su.agents)
		for i := range ids {
			ids[i] = fmt.Sprintf("agent-%02d", i+1)
		}
		if err := s.Delivery().AddAgents(ctx, ids...); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// place places an order through the running Order service.
func (h *harness) place(food string, quantity int) order.Order {
	h.t.Helper()
	o, err := h.s.Order().Place(h.ctx, order.PlaceRequest{FoodID: food, Quantity: quantity})
	if err != nil {
		h.t.Fatal(err)
	}
	return o
}

// await waits for an order to end.
func (h *harness) await(id string) order.Order {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(h.ctx, time.Minute)
	defer cancel()
	o, err := h.s.Order().Await(ctx, id)
	if err != nil {
		h.t.Fatalf("await order %s: %v (last seen %s)", id, err, o.State)
	}
	return o
}

// history returns the saga of order id's history as "step op attempt
// event" lines.
func (h *harness) history(id string) []string {
	h.t.Helper()
	hs, err := h.s.Order().Orchestrator().History(h.ctx, id)
	if err != nil {
		h.t.Fatal(err)
	}
	out := make([]string, len(hs))
	for i, e := range hs {
		out[i] = fmt.Sprintf("%s %s %d %s", e.Step, e.Op, e.Attempt, e.Event)
	}
	return out
}

// waitHistory waits until the saga of order id has entry in its history.
func (h *harness) waitHistory(id, entry string) {
	h.t.Helper()
	waitUntil(h.t, fmt.Sprintf("%q in the history of %s", entry, id), func() bool { return slices.Contains(h.history(id), entry) },
		func() string { return fmt.Sprintf("history %q", h.history(id)) })
}

// checkInvariants fails the test with every invariant Check finds broken,
// once the messages still travelling after the last order ended (the
// replies to cancels, duplicates) have arrived.
func (h *harness) checkInvariants() {
	h.t.Helper()
	var v []delivery.Violation
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		if v, err = h.s.Check(h.ctx); err != nil {
			h.t.Fatal(err)
		}
		if len(v) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, x := range v {
		h.t.Errorf("invariant broken: %s", x)
	}
}

// waitUntil polls cond until it holds, failing the test after 30 s with
// what and, when set, detail's account.
func waitUntil(t *testing.T, what string, cond func() bool, detail func() string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			msg := "timed out waiting for " + what
			if detail != nil {
				msg += ": " + detail()
			}
			t.Fatal(msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
