package delivery_test

import (
	"slices"
	"sync"
	"testing"

	"github.com/troupedev/troupe/examples/delivery/order"
)

// An order is placed with its packets and an agent assigned to it; an
// order of a sold-out food, or with no agent free, is not placed and
// holds nothing.
func TestDelivery_AnOrderIsPlacedOnlyWithItsPacketsAndAnAgentAssigned(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 3, agents: 1})
			if got := h.await(h.place("soup", 1).ID); got.State != order.NotPlaced || got.Reason != order.ReasonSoldOut {
				t.Errorf("order of soup: %s %q, want NOT_PLACED, %s", got.State, got.Reason, order.ReasonSoldOut)
			}
			got := h.await(h.place("pizza", 2).ID)
			if got.State != order.Placed || len(got.Packets) != 2 || got.Agent != "agent-01" {
				t.Fatalf("order of 2 pizzas: %+v, want PLACED with 2 packets and agent-01", got)
			}
			if slices.Sort(got.Packets); !slices.Equal(got.Packets, []string{"pizza-001", "pizza-002"}) {
				t.Fatalf("packets %v, want pizza-001 and pizza-002", got.Packets)
			}
			if got := h.await(h.place("pizza", 1).ID); got.State != order.NotPlaced || got.Reason != order.ReasonNoAgent {
				t.Errorf("order with the only agent out: %s %q, want NOT_PLACED, %s", got.State, got.Reason, order.ReasonNoAgent)
			}
			if got := h.await(h.place("pizza", 2).ID); got.State != order.NotPlaced {
				t.Errorf("order of 2 pizzas with 1 left: %s %q, want NOT_PLACED", got.State, got.Reason)
			}
			h.checkInvariants()
			foods, err := h.s.Store().Foods(h.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if p := foods[0]; p.ID != "pizza" || p.Assigned != 2 || p.Free != 1 || p.Held != 0 {
				t.Fatalf("pizza %+v: want 2 assigned, 1 free", p)
			}
		})
	}
}

// Many clients order at once from few packets and fewer agents: no packet
// and no agent goes to two orders, each placed order has all it needs,
// and the orders not placed hold nothing.
func TestDelivery_ConcurrentOrdersOnScarcePacketsAndAgentsAssignNothingTwice(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			const orders, packets, agents = 16, 6, 3
			h := newHarness(t, kind, setup{packets: packets, agents: agents})
			ids := make([]string, orders)
			var wg sync.WaitGroup
			for i := range orders {
				wg.Go(func() { ids[i] = h.place("pizza", 1+i%2).ID })
			}
			wg.Wait()
			agentOf := map[string]string{}
			var placed int
			for _, id := range ids {
				o := h.await(id)
				if o.State != order.Placed {
					continue
				}
				placed++
				if other, ok := agentOf[o.Agent]; ok {
					t.Errorf("agent %s went to orders %s and %s", o.Agent, other, id)
				}
				agentOf[o.Agent] = id
			}
			// Every order may also fail: each holds what another needed.
			if placed > agents {
				t.Errorf("%d orders placed, want at most %d (the agents)", placed, agents)
			}
			h.checkInvariants()
			tot, err := h.s.Count(h.ctx)
			if err != nil {
				t.Fatal(err)
			}
			var notPlaced int
			for _, n := range tot.NotPlaced {
				notPlaced += n
			}
			if tot.Placed != placed || tot.Placed+notPlaced != orders {
				t.Errorf("totals %+v: want %d placed and the other %d not", tot, placed, orders-placed)
			}
		})
	}
}
