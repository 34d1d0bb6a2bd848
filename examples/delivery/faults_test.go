package delivery_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/reserve"
)

// With the defaults (2-minute expiry, 10 s deadlines, 3 Try sends), the
// packet's Confirm is sent 7 times, 10 s apart, within the expiry.
const confirmSends = 7

// downInPhase2 places an order of a pizza and stops the Store once it has
// held the packet, before phase 2: the Delivery service, down while the
// order is placed, answers the agent's Try 503 until it is back, which
// the Order service retries once the clock has moved past its backoff.
// It returns when the packet's first Confirm is sent to the stopped Store.
func (h *harness) downInPhase2() string {
	h.t.Helper()
	if err := h.s.StopDelivery(); err != nil {
		h.t.Fatal(err)
	}
	id := h.place("pizza", 1).ID
	h.waitHistory(id, "order.try.packet1 action 1 done")
	if err := h.s.StopStore(); err != nil {
		h.t.Fatal(err)
	}
	if err := h.s.StartDelivery(h.ctx); err != nil {
		h.t.Fatal(err)
	}
	h.clock.Advance(2 * time.Second) // past the first retry's backoff, 1 to 1.5 s
	h.waitHistory(id, "order.confirm.packet1 action 1 sent")
	return id
}

// The Store goes down once it has held the packet, and comes back after
// two Confirm resends (20 s), well within the expiry: the order is placed.
func TestDelivery_AStoreDownInPhase2ForLessThanTheExpiryStillPlacesTheOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1, fakeClock: true})
			id := h.downInPhase2()
			for attempt := 2; attempt <= 3; attempt++ {
				h.clock.Advance(10 * time.Second)
				h.waitHistory(id, fmt.Sprintf("order.confirm.packet1 action %d sent", attempt))
			}
			if o, err := h.s.Order().Get(h.ctx, id); err != nil || o.State != order.Pending {
				t.Fatalf("order while the Store is down: %+v, %v; want PENDING", o, err)
			}
			if err := h.s.StartStore(h.ctx); err != nil {
				t.Fatal(err)
			}
			if got := h.await(id); got.State != order.Placed || len(got.Packets) != 1 || got.Agent == "" {
				t.Fatalf("order after the Store came back: %+v, want PLACED with a packet and an agent", got)
			}
			h.checkInvariants()
		})
	}
}

// The Store goes down once it has held the packet and stays down past the
// expiry. The saga resends the Confirm while the expiry leaves time, then
// gives up and un-assigns the agent; when the Store comes back, its hold
// has expired, the late Confirms are refused, and the order is not placed
// with nothing held anywhere.
func TestDelivery_AStoreDownInPhase2PastTheExpiryLeavesTheOrderNotPlacedAndNothingHeld(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1, fakeClock: true})
			id := h.downInPhase2()
			for attempt := 2; attempt <= confirmSends; attempt++ {
				h.clock.Advance(10 * time.Second)
				h.waitHistory(id, fmt.Sprintf("order.confirm.packet1 action %d sent", attempt))
			}
			h.clock.Advance(10 * time.Second) // the last deadline, 70 s in
			h.waitHistory(id, "order.confirm.agent compensation 1 done")
			if o, err := h.s.Order().Get(h.ctx, id); err != nil || o.State != order.Pending {
				t.Fatalf("order while its packet's Cancel waits for the Store: %+v, %v; want PENDING", o, err)
			}
			h.clock.Advance(55 * time.Second) // past the expiry, 2 min in
			if err := h.s.StartStore(h.ctx); err != nil {
				t.Fatal(err)
			}
			got := h.await(id)
			if got.State != order.NotPlaced || got.Reason != order.ReasonTimedOut {
				t.Fatalf("order after the Store came back past the expiry: %s %q, want NOT_PLACED, %s", got.State, got.Reason, order.ReasonTimedOut)
			}
			waitUntil(t, "the packet's hold to expire", func() bool {
				rs, err := h.s.Store().Reserver().List(h.ctx, reserve.Filter{Owner: id})
				return err == nil && len(rs) == 1 && rs[0].State == reserve.Expired
			}, nil)
			rs, err := h.s.Delivery().Reserver().List(h.ctx, reserve.Filter{Owner: id})
			if err != nil || len(rs) != 1 || rs[0].State != reserve.Cancelled {
				t.Fatalf("the agent's reservations %+v, %v: want one, cancelled (un-assigned)", rs, err)
			}
			h.checkInvariants()
		})
	}
}

// Every message between the Order service and the Store is published
// twice, some copies late, batches shuffled: each Try, Confirm and Cancel
// still has one effect, and many orders on scarce packets end with
// nothing assigned twice and nothing held.
func TestDelivery_DuplicatedAndReorderedMessagesHaveOneEffect(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			var fb *faulty.Broker
			h := newHarness(t, kind, setup{packets: 4, agents: 3, wrap: func(b broker.Broker) broker.Broker {
				var err error
				if fb, err = faulty.Wrap(b, faulty.Config{Duplicate: 1, Delay: 0.5, Reorder: true}); err != nil {
					t.Fatal(err)
				}
				return fb
			}})
			ids := make([]string, 8)
			var wg sync.WaitGroup
			for i := range ids {
				wg.Go(func() { ids[i] = h.place("pizza", 1+i%2).ID })
			}
			wg.Wait()
			for _, id := range ids {
				h.await(id)
			}
			if err := fb.Flush(h.ctx); err != nil {
				t.Fatal(err)
			}
			h.checkInvariants()
			if st := fb.Stats(); st.Duplicated == 0 || st.Delayed == 0 {
				t.Fatalf("broker stats %+v: want duplicates, some late", st)
			}
		})
	}
}
