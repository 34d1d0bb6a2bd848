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
