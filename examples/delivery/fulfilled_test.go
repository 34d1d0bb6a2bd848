package delivery_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/order"
)

// A body with a stray closing bracket after the order is not an order:
// 400, and no order is created.
func TestDeliveryHTTP_AStrayBracketAfterTheOrderIs400(t *testing.T) {
	h := newHarness(t, "sqlite", setup{packets: 1, agents: 1})
	srv := httptest.NewServer(h.s.Handler())
	defer srv.Close()
	for _, body := range []string{`{"food_id": "pizza", "quantity": 1}}`, `{"food_id": "pizza", "quantity": 1}]`} {
		resp, err := http.Post(srv.URL+"/orders", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		var b struct{ Error string }
		err = json.NewDecoder(resp.Body).Decode(&b)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusBadRequest || !strings.Contains(b.Error, "unexpected data") {
			t.Errorf("%s: %d %+v (%v), want 400 saying unexpected data", body, resp.StatusCode, b, err)
		}
	}
	if tot, err := h.s.Count(h.ctx); err != nil || tot.Placed+tot.Pending+len(tot.NotPlaced) != 0 {
		t.Fatalf("orders after bad requests: %+v, %v; want none", tot, err)
	}
}

// Check compares what a PLACED order shows the customer with what the
// Store and the Delivery service assigned to it: packets of another food,
// or another agent than the one assigned, are violations.
func TestDelivery_CheckSeesAPlacedOrderShowingWhatWasNotAssignedToIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1})
			placed := h.await(h.place("pizza", 1).ID)
			if placed.State != order.Placed {
				t.Fatalf("order %s %q, want PLACED", placed.State, placed.Reason)
			}
			h.checkInvariants()
			o := h.cfg.OrderDB
			for _, tc := range []struct{ name, col, bad, good string }{
				{"packets of another food", "food_id", "soup", placed.FoodID},
				{"another agent", "agent", "nobody", placed.Agent},
				{"another packet", "packets", "pizza-999", strings.Join(placed.Packets, ",")},
			} {
				if _, err := o.Exec(h.ctx, `UPDATE delivery_orders SET `+tc.col+` = $1 WHERE id = $2`, tc.bad, placed.ID); err != nil {
					t.Fatal(err)
				}
				v, err := h.s.Check(h.ctx)
				if err != nil {
					t.Fatal(err)
				}
				if len(v) != 1 || v[0].Invariant != delivery.InvPlacedFulfilled {
					t.Errorf("%s: Check found %v, want one %q", tc.name, v, delivery.InvPlacedFulfilled)
				}
				if _, err := o.Exec(h.ctx, `UPDATE delivery_orders SET `+tc.col+` = $1 WHERE id = $2`, tc.good, placed.ID); err != nil {
					t.Fatal(err)
				}
			}
			h.checkInvariants()
		})
	}
}
