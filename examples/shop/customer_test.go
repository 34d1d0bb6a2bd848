package shop_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/message"
)

// The choreographed Customer service's contract, message by message: it
// reserves up to the limit exactly, refuses a non-positive amount, releases
// nothing for a cancelled order whose credit it refused, and answers an
// order created after its cancellation with a refusal instead of
// reserving credit that no cancellation would release.
func TestCustomer_ChoreographedReservationsRefusalsAndLateCreations(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, withMode("choreographed"))
			// The events are the test's own: no Order service reacts.
			if err := h.shop.StopOrder(); err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			got := map[string]customer.Reservation{} // by order id, with the event type as Reason prefix
			sub, err := h.broker.Subscribe(h.ctx, broker.SubscribeConfig{Topic: customer.EventTopic, Group: "test-observer"},
				func(_ context.Context, batch []*broker.Delivery) {
					mu.Lock()
					defer mu.Unlock()
					for _, d := range batch {
						var r customer.Reservation
						if json.Unmarshal(d.Msg.Data, &r) == nil {
							r.Reason = d.Msg.Type + ": " + r.Reason
							got[r.OrderID] = r
						}
						d.Ack()
					}
				})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { sub.Stop(context.Background()) })
			event := func(typ, orderID string, amount int64) *message.Message {
				m, err := message.NewJSON("/shop/order", typ, customer.Reservation{OrderID: orderID, CustomerID: "c1", Amount: amount})
				if err != nil {
					t.Fatal(err)
				}
				m.Subject, m.CorrelationID = orderID, orderID
				return m
			}
			publish := func(msgs ...*message.Message) {
				if err := h.broker.Publish(h.ctx, customer.OrderEventTopic, msgs...); err != nil {
					t.Fatal(err)
				}
			}
			answer := func(orderID string) string {
				waitFor(t, "an answer for "+orderID, func() bool {
					mu.Lock()
					defer mu.Unlock()
					_, ok := got[orderID]
					return ok
				})
				mu.Lock()
				defer mu.Unlock()
				return got[orderID].Reason
			}
			// c1's limit is 10,000.
			publish(event(customer.OrderCreated, "a", 9_000))
			if a := answer("a"); a != customer.CreditReserved+": " {
				t.Errorf("order a: %q, want credit reserved", a)
			}
			publish(event(customer.OrderCreated, "b", 2_000), event(customer.OrderCancelled, "b", 2_000))
			if a := answer("b"); a != customer.CreditLimitExceeded+": credit limit exceeded" {
				t.Errorf("order b: %q, want the credit limit exceeded", a)
			}
			publish(event(customer.OrderCreated, "zero", 0))
			if a := answer("zero"); a != customer.CreditLimitExceeded+": amount 0 is not positive" {
				t.Errorf("order of 0: %q, want refused", a)
			}
			publish(event(customer.OrderCancelled, "late", 500), event(customer.OrderCreated, "late", 500))
			if a := answer("late"); a != customer.CreditLimitExceeded+": the order was cancelled before its credit was reserved" {
				t.Errorf("order created after its cancellation: %q, want refused as cancelled", a)
			}
			publish(event(customer.OrderCreated, "exact", 1_000)) // 9,000 + 1,000 = the limit
			if a := answer("exact"); a != customer.CreditReserved+": " {
				t.Errorf("order up to the limit exactly: %q, want credit reserved", a)
			}
			waitFor(t, "the 7 events handled", func() bool {
				var n int
				h.customerDB.QueryRow(h.ctx, `SELECT count(*) FROM troupe_inbox WHERE consumer = 'customer-events'`).Scan(&n)
				return n == 7
			})
			if r := h.reserved("c1"); r != 10_000 {
				t.Errorf("c1 has %d reserved, want 10000 (a and exact; nothing released for b, nothing reserved for late)", r)
			}
		})
	}
}
