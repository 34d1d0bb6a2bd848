package shop_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var (
	dialects = []string{"sqlite", "postgres"}
	modes    = []order.Mode{order.Orchestrated, order.Choreographed}
)

// harness is a shop on two fresh databases of one dialect and an embedded
// NATS JetStream server.
type harness struct {
	t          *testing.T
	ctx        context.Context
	shop       *shop.Shop
	orderDB    *sqldb.DB
	customerDB *sqldb.DB
	broker     broker.Broker
}

type option func(*shop.Config)

func newHarness(t *testing.T, kind string, opts ...option) *harness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	nb, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nb.Close() })
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
	cfg := shop.Config{OrderDB: open("order"), CustomerDB: open("customer"), Broker: nb}
	for _, o := range opts {
		o(&cfg)
	}
	s, err := shop.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("stop the shop: %v", err)
		}
	})
	h := &harness{t: t, ctx: ctx, shop: s, orderDB: cfg.OrderDB, customerDB: cfg.CustomerDB, broker: cfg.Broker}
	for i, limit := range []int64{10_000, 1_000_000} {
		if err := s.Customer().Create(ctx, customer.Customer{ID: fmt.Sprintf("c%d", i+1), Name: "test", CreditLimit: limit}); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

func withMode(m order.Mode) option { return func(c *shop.Config) { c.Order.Mode = m } }

func (h *harness) place(customerID string, total int64) order.Order {
	h.t.Helper()
	o, err := h.shop.Order().Place(h.ctx, order.PlaceRequest{CustomerID: customerID, Items: []order.Item{{SKU: "tea", Quantity: 1, UnitPrice: total}}})
	if err != nil {
		h.t.Fatal(err)
	}
	return o
}

// await waits for an order to end, through whichever Order service runs.
func (h *harness) await(id string) order.Order {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(h.ctx, time.Minute)
	defer cancel()
	for {
		svc := h.shop.Order()
		if svc == nil {
			h.t.Fatal("the Order service is not running")
		}
		o, err := svc.Await(ctx, id)
		if err != nil {
			h.t.Fatalf("await order %s: %v (last seen %s)", id, err, o.State)
		}
		return o
	}
}

// checkInvariants checks the shop's invariants once the messages still
// travelling after the last order ended (a choreography's release, the
// flow tracker's copies) have arrived: it asks until they hold, and reports
// what is broken after a minute.
func (h *harness) checkInvariants() {
	h.t.Helper()
	var v []shop.Violation
	deadline := time.Now().Add(time.Minute)
	for {
		var err error
		if v, err = h.shop.Check(h.ctx); err != nil {
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

func (h *harness) reserved(customerID string) int64 {
	h.t.Helper()
	c, err := h.shop.Customer().Get(h.ctx, customerID)
	if err != nil {
		h.t.Fatal(err)
	}
	return c.Reserved
}

func TestShop_OrdersAreApprovedWithinTheCreditLimitAndRejectedBeyondIt(t *testing.T) {
	for _, kind := range dialects {
		for _, mode := range modes {
			t.Run(kind+"/"+string(mode), func(t *testing.T) {
				h := newHarness(t, kind, withMode(mode))
				ok := h.place("c1", 2_500)
				over := h.place("c1", 9_000) // 2,500 + 9,000 > 10,000
				unknown := h.place("nobody", 100)
				if got := h.await(ok.ID); got.State != order.Approved {
					t.Errorf("order within the limit: %s (%s), want APPROVED", got.State, got.Reason)
				}
				got := h.await(over.ID)
				if got.State != order.Rejected || got.Reason != "credit limit exceeded" {
					t.Errorf("order over the limit: %s %q, want REJECTED for the credit limit", got.State, got.Reason)
				}
				if got := h.await(unknown.ID); got.State != order.Rejected || !strings.Contains(got.Reason, "unknown customer") {
					t.Errorf("order of an unknown customer: %s %q, want REJECTED naming the customer", got.State, got.Reason)
				}
				if r := h.reserved("c1"); r != 2_500 {
					t.Errorf("c1 has %d reserved, want 2500", r)
				}
				h.checkInvariants()
				if mode == order.Choreographed {
					// Each order is one flow, read from both services' events.
					flows := h.shop.Order().Flows()
					for id, want := range map[string]flow.Status{ok.ID: flow.Completed, over.ID: flow.Failed} {
						f, err := flows.Get(h.ctx, id)
						if err != nil {
							t.Fatal(err)
						}
						hist, err := flows.History(h.ctx, id)
						if err != nil {
							t.Fatal(err)
						}
						var types []string
						for _, e := range hist {
							types = append(types, e.Type)
						}
						if f.Status != want || f.Name != order.FlowName || len(f.Services) != 2 || len(hist) != 3 {
							t.Errorf("flow of order %s: %+v with %v, want %s across both services in 3 events", id, f, types, want)
						}
					}
				}
			})
		}
	}
}

func TestShop_CancellingWhileCreditIsReservedReleasesIt(t *testing.T) {
	for _, kind := range dialects {
		for _, mode := range modes {
			t.Run(kind+"/"+string(mode), func(t *testing.T) {
				h := newHarness(t, kind, withMode(mode))
				// With the Customer service down, the order stays PENDING
				// while the customer cancels it.
				if err := h.shop.StopCustomer(); err != nil {
					t.Fatal(err)
				}
				o := h.place("c1", 4_000)
				if _, err := h.shop.Order().Cancel(h.ctx, o.ID); err != nil {
					t.Fatal(err)
				}
				if err := h.shop.StartCustomer(h.ctx); err != nil {
					t.Fatal(err)
				}
				got := h.await(o.ID)
				if got.State != order.Cancelled {
					t.Fatalf("cancelled order ended %s (%s), want CANCELLED", got.State, got.Reason)
				}
				// The release travels after the order's end in the
				// choreography: wait for it.
				waitFor(t, "the reserved credit released", func() bool { return h.reserved("c1") == 0 })
				if _, err := h.shop.Order().Cancel(h.ctx, o.ID); !errors.Is(err, order.ErrNotCancellable) {
					t.Errorf("cancelling an ended order: %v, want ErrNotCancellable", err)
				}
				h.checkInvariants()
			})
		}
	}
}

func TestShop_RestartingTheOrderServiceMidRunEndsEveryOrder(t *testing.T) {
	for _, kind := range dialects {
		for _, mode := range modes {
			t.Run(kind+"/"+string(mode), func(t *testing.T) {
				h := newHarness(t, kind, withMode(mode))
				const n = 60
				ids := make([]string, n)
				for i := range n {
					total := int64(1 + i%7)
					if i%10 == 9 {
						total = 20_000 // over c1's limit
					}
					ids[i] = h.place("c1", total).ID
					if i == n/2 {
						// Replies to the first half are in flight: restart.
						if err := h.shop.StopOrder(); err != nil {
							t.Fatal(err)
						}
						if err := h.shop.StartOrder(h.ctx); err != nil {
							t.Fatal(err)
						}
					}
				}
				rejected := 0
				for _, id := range ids {
					if h.await(id).State == order.Rejected {
						rejected++
					}
				}
				if rejected != n/10 {
					t.Errorf("%d orders rejected, want the %d over the limit", rejected, n/10)
				}
				h.checkInvariants()
			})
		}
	}
}

func TestShop_DuplicatedDelayedAndReorderedMessagesReserveCreditOnce(t *testing.T) {
	for _, kind := range dialects {
		for _, mode := range modes {
			t.Run(kind+"/"+string(mode), func(t *testing.T) {
				var fb *faulty.Broker
				h := newHarness(t, kind, withMode(mode), func(c *shop.Config) {
					var err error
					// Every message twice, a third of the copies late, each
					// batch shuffled.
					fb, err = faulty.Wrap(c.Broker, faulty.Config{Duplicate: 1, Delay: 0.3, Reorder: true, Seed: 42})
					if err != nil {
						t.Fatal(err)
					}
					c.Broker = fb
				})
				var wg sync.WaitGroup
				var mu sync.Mutex
				var ids []string
				for w := range 4 {
					wg.Go(func() {
						for i := range 10 {
							total := int64(10 + w + i)
							if i == 5 {
								total = 2_000_000 // over both limits
							}
							o := h.place(fmt.Sprintf("c%d", 1+w%2), total)
							mu.Lock()
							ids = append(ids, o.ID)
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				for _, id := range ids {
					h.await(id)
				}
				if err := fb.Flush(h.ctx); err != nil {
					t.Fatal(err)
				}
				st := fb.Stats()
				if st.Duplicated == 0 || st.Delayed == 0 {
					t.Fatalf("no fault injected: %+v", st)
				}
				h.checkInvariants()
				tot, err := h.shop.Count(h.ctx)
				if err != nil {
					t.Fatal(err)
				}
				if tot.Rejected != 4 || tot.Approved != 36 {
					t.Errorf("orders: %+v, want 36 approved and the 4 over the limit rejected", tot)
				}
			})
		}
	}
}

func TestShop_AParticipantThatNeverAnswersMakesTheSagaCompensate(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			clock := clocktest.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
			const deadline = 5 * time.Second
			h := newHarness(t, kind, func(c *shop.Config) {
				c.Order = order.Config{Mode: order.Orchestrated, Deadline: deadline, MaxAttempts: 2, Clock: clock}
			})
			if err := h.shop.StopCustomer(); err != nil {
				t.Fatal(err)
			}
			o := h.place("c1", 1_000)
			orch := h.shop.Order().Orchestrator()
			// Two sends of the action, each unanswered by its deadline.
			for attempt := 1; attempt <= 2; attempt++ {
				waitHistory(t, orch, o.ID, "reserve-credit", saga.Action.String(), attempt, "sent")
				clock.Advance(deadline)
			}
			// The action counts as failed; as it may have run, its step is
			// compensated. The participant comes back now.
			waitHistory(t, orch, o.ID, "reserve-credit", saga.Compensation.String(), 1, "sent")
			if err := h.shop.StartCustomer(h.ctx); err != nil {
				t.Fatal(err)
			}
			got := h.await(o.ID)
			if got.State != order.Rejected || !strings.Contains(got.Reason, "no reply") {
				t.Errorf("order ended %s %q, want REJECTED for want of a reply", got.State, got.Reason)
			}
			// The participant received both actions and the compensation,
			// in order: it reserved once and released once.
			waitFor(t, "the participant to handle all three commands", func() bool {
				var n int
				h.customerDB.QueryRow(h.ctx, `SELECT count(*) FROM troupe_inbox WHERE consumer = 'customer'`).Scan(&n)
				return n == 3
			})
			if r := h.reserved("c1"); r != 0 {
				t.Errorf("c1 has %d reserved after the compensation, want 0", r)
			}
			h.checkInvariants()
		})
	}
}

func TestShop_MalformedOrdersAreRefusedWith400NamingTheField(t *testing.T) {
	h := newHarness(t, "sqlite")
	srv := httptest.NewServer(h.shop.Handler())
	t.Cleanup(srv.Close)
	tests := []struct {
		name, body, field, problem string
	}{
		{"not JSON", `{"customer_id": "c1", "items": [`, "", "malformed JSON"},
		{"empty body", ``, "", "empty body"},
		{"no customer", `{"items": [{"sku": "tea", "quantity": 1, "unit_price": 100}]}`, "customer_id", "required"},
		{"no items", `{"customer_id": "c1", "items": []}`, "items", "at least one"},
		{"zero quantity", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 1, "unit_price": 100}, {"sku": "cake", "quantity": 0, "unit_price": 100}]}`, "items[1].quantity", "between 1 and"},
		{"negative price", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 1, "unit_price": -5}]}`, "items[0].unit_price", "between 1 and"},
		{"quantity as a string", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": "2", "unit_price": 100}]}`, "items.quantity", "want int64"},
		{"unknown field", `{"customer_id": "c1", "colour": "red", "items": [{"sku": "tea", "quantity": 1, "unit_price": 100}]}`, "colour", "unknown field"},
		{"two objects", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 1, "unit_price": 100}]} {}`, "", "after the JSON object"},
		{"a stray brace after the object", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 1, "unit_price": 100}]}}`, "", "after the JSON object"},
		{"a stray bracket after the object", `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 1, "unit_price": 100}]}]`, "", "after the JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := http.Post(srv.URL+"/orders", "application/json", strings.NewReader(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d (%s), want 400", resp.StatusCode, body)
			}
			want := fmt.Sprintf(`"field": %q`, tt.field)
			if tt.field == "" {
				want = `"error"`
			}
			if !strings.Contains(string(body), want) || !strings.Contains(string(body), tt.problem) || (tt.field == "" && strings.Contains(string(body), `"field"`)) {
				t.Errorf("body %s: want field %q and %q", body, tt.field, tt.problem)
			}
		})
	}
	tot, err := h.shop.Count(h.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if tot.Approved+tot.Rejected+tot.Cancelled+tot.Pending != 0 || len(tot.Sagas) != 0 {
		t.Errorf("refused requests stored something: %+v", tot)
	}
	// And a valid one goes through, to show the refusals were about the
	// body, not the route.
	resp, err := http.Post(srv.URL+"/orders", "application/json", strings.NewReader(`{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 2, "unit_price": 1250}]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated || !strings.HasPrefix(resp.Header.Get("Location"), "/orders/") {
		t.Errorf("valid order: status %d, Location %q; want 201 and the order's URL", resp.StatusCode, resp.Header.Get("Location"))
	}
}

// waitFor polls cond until it holds, failing t after a minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitHistory waits for a saga's history to record event for a step, side
// and attempt.
func waitHistory(t *testing.T, o *saga.Orchestrator, id, step, op string, attempt int, event string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s %s attempt %d: %s", step, op, attempt, event), func() bool {
		hist, err := o.History(context.Background(), id)
		if err != nil {
			return false
		}
		for _, e := range hist {
			if e.Step == step && e.Op == op && e.Attempt == attempt && e.Event == event {
				return true
			}
		}
		return false
	})
}

func TestShop_CheckReportsCreditThatDoesNotMatchTheApprovedOrders(t *testing.T) {
	h := newHarness(t, "sqlite")
	o := h.place("c1", 500)
	if got := h.await(o.ID); got.State != order.Approved {
		t.Fatalf("order %s, want APPROVED", got.State)
	}
	h.checkInvariants()
	// A reservation applied twice, as a consumer without an inbox would.
	if _, err := h.customerDB.Exec(h.ctx, `UPDATE shop_customers SET reserved = reserved + 500 WHERE id = 'c1'`); err != nil {
		t.Fatal(err)
	}
	v, err := h.shop.Check(h.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 1 || v[0].Invariant != "reserved credit = approved orders" || !strings.Contains(v[0].Detail, "c1 has 1000 reserved") {
		t.Errorf("Check found %v, want c1's doubled reservation", v)
	}
}

func TestShop_PlaceAndAwaitReturnsEachOrderEnded(t *testing.T) {
	for _, kind := range dialects {
		for _, mode := range modes {
			t.Run(kind+"/"+string(mode), func(t *testing.T) {
				h := newHarness(t, kind, withMode(mode))
				ctx, cancel := context.WithTimeout(h.ctx, time.Minute)
				defer cancel()
				svc := h.shop.Order()
				req := func(total int64, key string) order.PlaceRequest {
					return order.PlaceRequest{CustomerID: "c1", IdempotencyKey: key, Items: []order.Item{{SKU: "tea", Quantity: 1, UnitPrice: total}}}
				}
				ok, err := svc.PlaceAndAwait(ctx, req(2_500, "key-1"))
				if err != nil || ok.State != order.Approved {
					t.Fatalf("order within the limit: %s (%s), %v; want APPROVED", ok.State, ok.Reason, err)
				}
				over, err := svc.PlaceAndAwait(ctx, req(9_000, ""))
				if err != nil || over.State != order.Rejected {
					t.Fatalf("order over the limit: %s (%s), %v; want REJECTED", over.State, over.Reason, err)
				}
				// A repeat of a keyed request awaits the order the key placed.
				again, err := svc.PlaceAndAwait(ctx, req(2_500, "key-1"))
				if err != nil || again.ID != ok.ID || again.State != order.Approved {
					t.Fatalf("repeat of key-1: order %s %s, %v; want %s APPROVED", again.ID, again.State, err, ok.ID)
				}
				if _, err := svc.PlaceAndAwait(ctx, order.PlaceRequest{CustomerID: "c1"}); !errors.Is(err, order.ErrInvalid) {
					t.Errorf("an order without items: %v, want ErrInvalid", err)
				}
				if r := h.reserved("c1"); r != 2_500 {
					t.Errorf("c1 has %d reserved, want 2500", r)
				}
				// A wait that runs out ends with the context's error.
				short, cancelShort := context.WithCancel(ctx)
				cancelShort()
				if o, err := svc.PlaceAndAwait(short, req(100, "")); !errors.Is(err, context.Canceled) {
					t.Errorf("with its context cancelled: %s %s, %v; want context.Canceled", o.ID, o.State, err)
				}
			})
		}
	}
}
