package shop_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
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
