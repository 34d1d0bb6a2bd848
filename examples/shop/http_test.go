package shop_test

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

	"github.com/troupedev/troupe/examples/shop/order"
)

// GET /orders/{id}?wait=D answers with the order as it stands when the
// wait ends, however short the wait ("wait=0s": do not wait), and 404 for
// an unknown order: never 200 with an empty order.
func TestShop_GetOrderWithAnExpiredWaitAnswersTheOrderAsItIs(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			if err := h.shop.StopCustomer(); err != nil {
				t.Fatal(err)
			}
			o := h.place("c1", 100) // stays PENDING: no Customer service
			srv := httptest.NewServer(h.shop.Handler())
			t.Cleanup(srv.Close)
			for _, wait := range []string{"0s", "1ns"} {
				resp, err := http.Get(srv.URL + "/orders/" + o.ID + "?wait=" + wait)
				if err != nil {
					t.Fatal(err)
				}
				var got order.Order
				err = json.NewDecoder(resp.Body).Decode(&got)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK || got.ID != o.ID || got.State != order.Pending {
					t.Errorf("wait=%s: status %d, order %+v (%v); want 200 with the PENDING order", wait, resp.StatusCode, got, err)
				}
				resp, err = http.Get(srv.URL + "/orders/nope?wait=" + wait)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusNotFound {
					t.Errorf("wait=%s on an unknown order: status %d, want 404", wait, resp.StatusCode)
				}
			}
		})
	}
}

// GET /orders/{id}/saga shows the saga as an operator reads it: its state
// with its data as JSON, and its history entry by entry.
func TestShop_TheSagaOfAnOrderIsShownWithItsDataAndHistory(t *testing.T) {
	h := newHarness(t, "sqlite")
	o := h.place("c1", 100)
	if got := h.await(o.ID); got.State != order.Approved {
		t.Fatalf("order %s, want APPROVED", got.State)
	}
	srv := httptest.NewServer(h.shop.Handler())
	t.Cleanup(srv.Close)
	resp, err := http.Get(srv.URL + "/orders/" + o.ID + "/saga")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Saga struct {
			ID     string `json:"id"`
			Status string `json:"status"`
			Data   struct {
				OrderID string `json:"order_id"`
				Total   int64  `json:"total"`
			} `json:"data"`
		} `json:"saga"`
		History []struct {
			Seq   int    `json:"seq"`
			Step  string `json:"step"`
			Event string `json:"event"`
		} `json:"history"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Saga.ID != o.ID || got.Saga.Status != "completed" || got.Saga.Data.OrderID != o.ID || got.Saga.Data.Total != 100 {
		t.Errorf("saga %+v: want order %s's completed saga with its data", got.Saga, o.ID)
	}
	var events []string
	for _, e := range got.History {
		events = append(events, e.Step+" "+e.Event)
	}
	if len(got.History) == 0 || got.History[0].Seq != 1 || got.History[0].Event != "started" || got.History[len(got.History)-1].Event != "completed" {
		t.Errorf("history %v: want it from started to completed", events)
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
	if err := h.orderDB.QueryRow(h.ctx, `SELECT count(*) FROM `+table).Scan(&n); err != nil {
		h.t.Fatal(err)
	}
	return n
}

const teaOrder = `{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 2, "unit_price": 150}]}`

// A client that got no answer sends its POST /orders again with the same
// Idempotency-Key: it gets the order the first request created, at the
// same Location, marked Idempotent-Replayed, whether the body's spacing
// or field order changed and whether the key is quoted as the IETF draft
// writes it or bare as Stripe's clients send it; no second order, saga
// or credit reservation is made.
func TestShopHTTP_ARepeatWithTheSameIdempotencyKeyMakesNoSecondOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			srv := httptest.NewServer(h.shop.Handler())
			t.Cleanup(srv.Close)
			first := h.post(srv, teaOrder, "order-7f3a")
			if first.status != http.StatusCreated || first.header.Get("Location") != "/orders/"+first.order.ID ||
				first.header.Get(order.HeaderIdempotentReplayed) != "" {
				t.Fatalf("first POST: %d %v %+v; want 201 with the order's Location, not replayed", first.status, first.header, first.order)
			}
			respaced := `{"items":[{"unit_price":150,"quantity":2,"sku":"tea"}],"customer_id":"c1"}`
			for _, key := range []string{"order-7f3a", `"order-7f3a"`} {
				again := h.post(srv, respaced, key)
				if again.status != http.StatusCreated || again.order.ID != first.order.ID ||
					again.header.Get("Location") != "/orders/"+first.order.ID || again.header.Get(order.HeaderIdempotentReplayed) != "true" {
					t.Fatalf("repeat with key %s: %d %v %+v; want 201 with order %s, replayed", key, again.status, again.header, again.order, first.order.ID)
				}
			}
			if got := h.await(first.order.ID); got.State != order.Approved {
				t.Fatalf("order %s, want APPROVED", got.State)
			}
			if orders, sagas, reserved := h.count("shop_orders"), h.count("troupe_sagas"), h.reserved("c1"); orders != 1 || sagas != 1 || reserved != 300 {
				t.Fatalf("%d orders, %d sagas, %d credit reserved; want 1, 1 and 300", orders, sagas, reserved)
			}
		})
	}
}

// Eight clients racing with one Idempotency-Key make one order and one
// saga: the key's unique index lets one request in, and every other
// answers with its order.
func TestShopHTTP_ConcurrentRequestsWithOneIdempotencyKeyMakeOneOrderAndOneSaga(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			srv := httptest.NewServer(h.shop.Handler())
			t.Cleanup(srv.Close)
			const clients = 8
			var answers [clients]answer
			var errs [clients]error
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range clients {
				wg.Go(func() {
					<-start
					answers[i], errs[i] = postOrder(srv, teaOrder, "race-1")
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
			if got := h.await(answers[0].order.ID); got.State != order.Approved {
				t.Fatalf("order %s, want APPROVED", got.State)
			}
			if orders, sagas, reserved := h.count("shop_orders"), h.count("troupe_sagas"), h.reserved("c1"); orders != 1 || sagas != 1 || reserved != 300 {
				t.Fatalf("%d orders, %d sagas, %d credit reserved; want 1, 1 and 300", orders, sagas, reserved)
			}
			h.checkInvariants()
		})
	}
}

// An Idempotency-Key sent with another request than the one that first
// used it (another customer, other items) is refused, with 422 naming the
// header over HTTP and ErrIdempotencyKeyReused from Place; the key's order
// stays the only one.
func TestShopHTTP_AnIdempotencyKeyReusedForAnotherRequestIs422(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			srv := httptest.NewServer(h.shop.Handler())
			t.Cleanup(srv.Close)
			if a := h.post(srv, teaOrder, "k-1"); a.status != http.StatusCreated {
				t.Fatalf("first POST: %d %+v", a.status, a)
			}
			for _, body := range []string{
				`{"customer_id": "c2", "items": [{"sku": "tea", "quantity": 2, "unit_price": 150}]}`,
				`{"customer_id": "c1", "items": [{"sku": "tea", "quantity": 3, "unit_price": 150}]}`,
			} {
				a := h.post(srv, body, "k-1")
				if a.status != http.StatusUnprocessableEntity || a.Field != order.HeaderIdempotencyKey || !strings.Contains(a.Error, "different request") {
					t.Errorf("POST %s with the key: %d %+v; want 422 naming field %s", body, a.status, a, order.HeaderIdempotencyKey)
				}
			}
			_, err := h.shop.Order().Place(h.ctx, order.PlaceRequest{CustomerID: "c1", Items: []order.Item{{SKU: "tea", Quantity: 1, UnitPrice: 300}}, IdempotencyKey: "k-1"})
			if !errors.Is(err, order.ErrIdempotencyKeyReused) {
				t.Errorf("Place with the key and other items: %v; want ErrIdempotencyKeyReused", err)
			}
			if n := h.count("shop_orders"); n != 1 {
				t.Fatalf("%d orders, want 1", n)
			}
		})
	}
}

// An Idempotency-Key that is empty, longer than 255 characters, not
// printable ASCII, sent twice or badly quoted is refused with 400 naming
// the header, and places no order; 255 printable characters are a key.
func TestShopHTTP_AnInvalidIdempotencyKeyIs400NamingTheHeader(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			srv := httptest.NewServer(h.shop.Handler())
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
				a := h.post(srv, teaOrder, tc.keys...)
				if a.status != http.StatusBadRequest || a.Field != order.HeaderIdempotencyKey {
					t.Errorf("%s: %d %+v; want 400 naming field %s", tc.name, a.status, a, order.HeaderIdempotencyKey)
				}
			}
			if n := h.count("shop_orders"); n != 0 {
				t.Fatalf("%d orders after invalid keys, want none", n)
			}
			if a := h.post(srv, teaOrder, strings.Repeat("~", 255)); a.status != http.StatusCreated {
				t.Fatalf("a key of 255 characters: %d %+v; want 201", a.status, a)
			}
		})
	}
}

// Without an Idempotency-Key, POST /orders is as it was: the same body
// twice places two orders.
func TestShopHTTP_WithoutAnIdempotencyKeyEachPostPlacesAnOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			srv := httptest.NewServer(h.shop.Handler())
			t.Cleanup(srv.Close)
			a, b := h.post(srv, teaOrder), h.post(srv, teaOrder)
			if a.status != http.StatusCreated || b.status != http.StatusCreated || a.order.ID == b.order.ID ||
				b.header.Get(order.HeaderIdempotentReplayed) != "" {
				t.Fatalf("two POSTs: %d %s and %d %s; want 201 twice with two orders", a.status, a.order.ID, b.status, b.order.ID)
			}
			if orders, sagas := h.count("shop_orders"), h.count("troupe_sagas"); orders != 2 || sagas != 2 {
				t.Fatalf("%d orders and %d sagas, want 2 and 2", orders, sagas)
			}
		})
	}
}
