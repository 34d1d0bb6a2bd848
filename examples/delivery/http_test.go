package delivery_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
)

// Bad input is answered 400 with a message that names the field at fault,
// and no order is created.
func TestDeliveryHTTP_BadOrdersAre400WithTheFieldNamed(t *testing.T) {
	h := newHarness(t, "sqlite", setup{packets: 1, agents: 1})
	srv := httptest.NewServer(h.s.Handler())
	defer srv.Close()
	for _, tc := range []struct {
		name, body, field, says string
	}{
		{"unknown food", `{"food_id": "sushi", "quantity": 1}`, "food_id", `no food "sushi" on the menu`},
		{"zero quantity", `{"food_id": "pizza", "quantity": 0}`, "quantity", "must be between 1 and 3"},
		{"no quantity", `{"food_id": "pizza"}`, "quantity", "must be between 1 and 3"},
		{"too many", `{"food_id": "pizza", "quantity": 4}`, "quantity", "must be between 1 and 3"},
		{"no food", `{"quantity": 1}`, "food_id", "required"},
		{"quantity as text", `{"food_id": "pizza", "quantity": "two"}`, "quantity", "want int"},
		{"unknown field", `{"food_id": "pizza", "quantity": 1, "tip": 5}`, "tip", "unknown field"},
		{"malformed JSON", `{"food_id": "pizza",`, "", "malformed JSON"},
		{"empty body", ``, "", "empty body"},
		{"trailing data", `{"food_id": "pizza", "quantity": 1} {}`, "", "unexpected data"},
	} {
		resp, err := http.Post(srv.URL+"/orders", "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		var body struct{ Error, Field string }
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusBadRequest || body.Field != tc.field || !strings.Contains(body.Error, tc.says) {
			t.Errorf("%s: %d %+v (%v), want 400 naming field %q and saying %q", tc.name, resp.StatusCode, body, err, tc.field, tc.says)
		}
	}
	if tot, err := h.s.Count(h.ctx); err != nil || tot.Placed+tot.Pending+len(tot.NotPlaced) != 0 {
		t.Fatalf("orders after bad requests: %+v, %v; want none", tot, err)
	}
}

// agentCall POSTs one side of the agent's reservation to the Delivery
// service, as the saga does, and returns the status and body.
func (h *harness) agentCall(path, sagaID string, op saga.Op) (int, string) {
	h.t.Helper()
	body := `{"reservation": "order.agent", "expiry_ms": 60000, "input": {"pool": "agents", "owner": "` + sagaID + `"}}`
	req, err := http.NewRequest(http.MethodPost, h.s.DeliveryURL()+path, strings.NewReader(body))
	if err != nil {
		h.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(saga.HeaderSagaID, sagaID)
	req.Header.Set(saga.HeaderStep, "order.try.agent")
	if path == dispatch.ConfirmPath {
		req.Header.Set(saga.HeaderStep, "order.confirm.agent")
	}
	req.Header.Set(saga.HeaderOp, op.String())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// Over HTTP, a repeated Try, Confirm or Cancel gets the first answer and
// has no second effect; a Cancel that arrives before its Try succeeds
// with nothing to release, and the late Try is refused, so the agent is
// never held by an order that gave up.
func TestDeliveryHTTP_RepeatedAndEarlyCallsHaveOneEffect(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{agents: 2})
			if code, _ := h.agentCall(dispatch.TryPath, "early", saga.Compensation); code != http.StatusOK {
				t.Fatalf("Cancel before its Try: %d, want 200", code)
			}
			if code, body := h.agentCall(dispatch.TryPath, "early", saga.Action); code != http.StatusConflict {
				t.Fatalf("the late Try: %d %q, want 409 (refused)", code, body)
			}
			var first string
			for i := range 2 {
				code, body := h.agentCall(dispatch.TryPath, "twice", saga.Action)
				if code != http.StatusOK || (i == 1 && body != first) {
					t.Fatalf("Try %d: %d %q, want 200 with the first answer %q", i+1, code, body, first)
				}
				first = body
			}
			for i := range 2 {
				if code, body := h.agentCall(dispatch.ConfirmPath, "twice", saga.Action); code != http.StatusOK {
					t.Fatalf("Confirm %d: %d %q, want 200", i+1, code, body)
				}
			}
			agents, err := h.s.Delivery().Agents(h.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if agents[0].State != reserve.ResourceAssigned || agents[0].Order != "twice" || agents[1].State != reserve.ResourceFree {
				t.Fatalf("agents %+v: want one assigned to \"twice\", the other free", agents)
			}
			for i := range 2 {
				if code, _ := h.agentCall(dispatch.ConfirmPath, "twice", saga.Compensation); code != http.StatusOK {
					t.Fatalf("Cancel %d of the Confirm: %d, want 200", i+1, code)
				}
			}
			if agents, _ := h.s.Delivery().Agents(h.ctx); agents[0].State != reserve.ResourceFree || agents[1].State != reserve.ResourceFree {
				t.Fatalf("agents %+v after the Cancels: want both free", agents)
			}
		})
	}
}

// answer is an answer to POST /orders.
type answer struct {
	status int
	header http.Header
	order  order.Order
	// Error and Field are a refusal's.
	Error, Field string
}

// postOrder POSTs body to srv's /orders with one Idempotency-Key header
// line per key (none: no header).
func postOrder(srv *httptest.Server, body string, keys ...string) (answer, error) {
	req, err := http.NewRequest(http.MethodPost, srv.URL+"/orders", strings.NewReader(body))
	if err != nil {
		return answer{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	for _, k := range keys {
		req.Header.Add(order.HeaderIdempotencyKey, k)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	a := answer{status: resp.StatusCode, header: resp.Header}
	if resp.StatusCode == http.StatusCreated {
		err = json.Unmarshal(b, &a.order)
	} else {
		err = json.Unmarshal(b, &a)
	}
	if err != nil {
		return a, fmt.Errorf("answer %d %q: %w", resp.StatusCode, b, err)
	}
	return a, nil
}

func (h *harness) post(srv *httptest.Server, body string, keys ...string) answer {
	h.t.Helper()
	a, err := postOrder(srv, body, keys...)
	if err != nil {
		h.t.Fatal(err)
	}
	return a
}

// count counts the rows of one of the Order database's tables.
func (h *harness) count(table string) int {
	h.t.Helper()
	var n int
	if err := h.cfg.OrderDB.QueryRow(h.ctx, `SELECT count(*) FROM `+table).Scan(&n); err != nil {
		h.t.Fatal(err)
	}
	return n
}

const pizzaOrder = `{"food_id": "pizza", "quantity": 1}`

// A client that got no answer sends its POST /orders again with the same
// Idempotency-Key: it gets the order the first request created, at the
// same Location, marked Idempotent-Replayed, whether the body's spacing or
// field order changed and whether the key is quoted as the IETF draft
// writes it or bare as Stripe's clients send it, even while the Store
// (the menu) is down; no second order or saga is made, no second packet
// or agent held.
func TestDeliveryHTTP_ARepeatWithTheSameIdempotencyKeyMakesNoSecondOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 2})
			srv := httptest.NewServer(h.s.Handler())
			t.Cleanup(srv.Close)
			first := h.post(srv, pizzaOrder, "order-7f3a")
			if first.status != http.StatusCreated || first.header.Get("Location") != "/orders/"+first.order.ID ||
				first.header.Get(order.HeaderIdempotentReplayed) != "" {
				t.Fatalf("first POST: %d %v %+v; want 201 with the order's Location, not replayed", first.status, first.header, first.order)
			}
			if got := h.await(first.order.ID); got.State != order.Placed || len(got.Packets) != 1 {
				t.Fatalf("order %+v, want PLACED with one packet", got)
			}
			if err := h.s.StopStore(); err != nil {
				t.Fatal(err)
			}
			respaced := `{"quantity":1,"food_id":"pizza"}`
			for _, key := range []string{"order-7f3a", `"order-7f3a"`} {
				again := h.post(srv, respaced, key)
				if again.status != http.StatusCreated || again.order.ID != first.order.ID || again.order.State != order.Placed ||
					again.header.Get("Location") != "/orders/"+first.order.ID || again.header.Get(order.HeaderIdempotentReplayed) != "true" {
					t.Fatalf("repeat with key %s: %d %v %+v; want 201 with order %s as it is now (PLACED), replayed", key, again.status, again.header, again.order, first.order.ID)
				}
			}
			if a := h.post(srv, pizzaOrder, "new-key"); a.status != http.StatusServiceUnavailable {
				t.Fatalf("a new key with the Store down: %d %+v; want 503 (the menu is asked)", a.status, a)
			}
			if orders, sagas := h.count("delivery_orders"), h.count("troupe_sagas"); orders != 1 || sagas != 1 {
				t.Fatalf("%d orders, %d sagas; want 1 and 1", orders, sagas)
			}
		})
	}
}

// Eight clients racing with one Idempotency-Key make one order and one
// saga: the key's unique index lets one request in, and every other
// answers with its order; the one order holds one packet and one agent.
func TestDeliveryHTTP_ConcurrentRequestsWithOneIdempotencyKeyMakeOneOrderAndOneSaga(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 3, agents: 3})
			srv := httptest.NewServer(h.s.Handler())
			t.Cleanup(srv.Close)
			const clients = 8
			var answers [clients]answer
			var errs [clients]error
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range clients {
				wg.Go(func() {
					<-start
					answers[i], errs[i] = postOrder(srv, pizzaOrder, "race-1")
				})
			}
			close(start)
			wg.Wait()
			if err := errors.Join(errs[:]...); err != nil {
				t.Fatal(err)
			}
			created := 0
			for i, a := range answers {
				if a.status != http.StatusCreated || a.order.ID != answers[0].order.ID {
					t.Fatalf("client %d: %d %+v; want 201 with order %s, as client 0", i, a.status, a, answers[0].order.ID)
				}
				if a.header.Get(order.HeaderIdempotentReplayed) == "" {
					created++
				}
			}
			if created != 1 {
				t.Errorf("%d answers not marked replayed; want the one that created the order", created)
			}
			if got := h.await(answers[0].order.ID); got.State != order.Placed || len(got.Packets) != 1 {
				t.Fatalf("order %+v, want PLACED with one packet", got)
			}
			if orders, sagas := h.count("delivery_orders"), h.count("troupe_sagas"); orders != 1 || sagas != 1 {
				t.Fatalf("%d orders, %d sagas; want 1 and 1", orders, sagas)
			}
			h.checkInvariants()
		})
	}
}

// An Idempotency-Key sent with another request than the one that first
// used it (another food, another quantity) is refused, with 422 naming
// the header over HTTP and ErrIdempotencyKeyReused from Place; the key's
// order stays the only one.
func TestDeliveryHTTP_AnIdempotencyKeyReusedForAnotherRequestIs422(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1})
			srv := httptest.NewServer(h.s.Handler())
			t.Cleanup(srv.Close)
			if a := h.post(srv, pizzaOrder, "k-1"); a.status != http.StatusCreated {
				t.Fatalf("first POST: %d %+v", a.status, a)
			}
			for _, body := range []string{`{"food_id": "soup", "quantity": 1}`, `{"food_id": "pizza", "quantity": 2}`} {
				a := h.post(srv, body, "k-1")
				if a.status != http.StatusUnprocessableEntity || a.Field != order.HeaderIdempotencyKey || !strings.Contains(a.Error, "different request") {
					t.Errorf("POST %s with the key: %d %+v; want 422 naming field %s", body, a.status, a, order.HeaderIdempotencyKey)
				}
			}
			_, err := h.s.Order().Place(h.ctx, order.PlaceRequest{FoodID: "pizza", Quantity: 3, IdempotencyKey: "k-1"})
			if !errors.Is(err, order.ErrIdempotencyKeyReused) {
				t.Errorf("Place with the key and another quantity: %v; want ErrIdempotencyKeyReused", err)
			}
			if n := h.count("delivery_orders"); n != 1 {
				t.Fatalf("%d orders, want 1", n)
			}
		})
	}
}

// An Idempotency-Key that is empty, longer than 255 characters, not
// printable ASCII, sent twice or badly quoted is refused with 400 naming
// the header, and places no order; 255 printable characters are a key.
func TestDeliveryHTTP_AnInvalidIdempotencyKeyIs400NamingTheHeader(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 1, agents: 1})
			srv := httptest.NewServer(h.s.Handler())
			t.Cleanup(srv.Close)
			for _, tc := range []struct {
				name string
				keys []string
			}{
				{"empty", []string{""}},
				{"empty quotes", []string{`""`}},
				{"256 characters", []string{strings.Repeat("k", 256)}},
				{"not ASCII", []string{"clé"}},
				{"a tab", []string{"a\tb"}},
				{"two keys", []string{"a", "b"}},
				{"a bad escape in quotes", []string{`"a\b"`}},
			} {
				a := h.post(srv, pizzaOrder, tc.keys...)
				if a.status != http.StatusBadRequest || a.Field != order.HeaderIdempotencyKey {
					t.Errorf("%s: %d %+v; want 400 naming field %s", tc.name, a.status, a, order.HeaderIdempotencyKey)
				}
			}
			if n := h.count("delivery_orders"); n != 0 {
				t.Fatalf("%d orders after invalid keys, want none", n)
			}
			if a := h.post(srv, pizzaOrder, strings.Repeat("~", 255)); a.status != http.StatusCreated {
				t.Fatalf("a key of 255 characters: %d %+v; want 201", a.status, a)
			}
		})
	}
}

// Without an Idempotency-Key, POST /orders is as it was: the same body
// twice places two orders.
func TestDeliveryHTTP_WithoutAnIdempotencyKeyEachPostPlacesAnOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 2})
			srv := httptest.NewServer(h.s.Handler())
			t.Cleanup(srv.Close)
			a, b := h.post(srv, pizzaOrder), h.post(srv, pizzaOrder)
			if a.status != http.StatusCreated || b.status != http.StatusCreated || a.order.ID == b.order.ID ||
				b.header.Get(order.HeaderIdempotentReplayed) != "" {
				t.Fatalf("two POSTs: %d %s and %d %s; want 201 twice with two orders", a.status, a.order.ID, b.status, b.order.ID)
			}
			if orders, sagas := h.count("delivery_orders"), h.count("troupe_sagas"); orders != 2 || sagas != 2 {
				t.Fatalf("%d orders and %d sagas, want 2 and 2", orders, sagas)
			}
		})
	}
}
