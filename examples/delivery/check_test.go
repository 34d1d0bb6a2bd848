package delivery_test

import (
	"slices"
	"testing"
	"time"

	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/sqldb"
)

// An agent who delivered a placed order is free for the next one: the
// Delivery service hears the order was placed, and DeliverAfter later
// releases the agent; Check counts the delivered order as fulfilled.
func TestDelivery_AnAgentBackFromADeliveryTakesTheNextOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 3, agents: 1, fakeClock: true,
				cfg: func(c *delivery.Config) { c.Delivery.DeliverAfter = time.Minute }})
			first := h.await(h.place("pizza", 1).ID)
			if first.State != order.Placed {
				t.Fatalf("first order %s %q, want PLACED", first.State, first.Reason)
			}
			waitUntil(t, "the delivery to be scheduled", func() bool {
				var n int
				err := h.cfg.DeliveryDB.QueryRow(h.ctx, `SELECT count(*) FROM troupe_timers WHERE id = $1`, "delivered/"+first.ID).Scan(&n)
				return err == nil && n == 1
			}, nil)
			h.clock.Advance(time.Minute)
			waitUntil(t, "the agent to be back", func() bool {
				agents, err := h.s.Delivery().Agents(h.ctx)
				return err == nil && agents[0].Order == ""
			}, nil)
			if next := h.await(h.place("pizza", 1).ID); next.State != order.Placed || next.Agent != first.Agent {
				t.Fatalf("next order %+v: want PLACED with %s, back", next, first.Agent)
			}
			h.checkInvariants()
		})
	}
}

// Check reports each broken invariant, on both dialects, and nothing on
// a sound state: one corruption at a time, each undone before the next.
func TestDelivery_CheckReportsEachBrokenInvariantAndNothingElse(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1})
			placed := h.await(h.place("pizza", 1).ID)
			notPlaced := h.await(h.place("soup", 1).ID)
			if placed.State != order.Placed || notPlaced.State != order.NotPlaced {
				t.Fatalf("orders %s and %s, want PLACED and NOT_PLACED", placed.State, notPlaced.State)
			}
			h.checkInvariants()
			type stmt struct {
				db   *sqldb.DB
				sql  string
				args []any
			}
			o, st, d := h.cfg.OrderDB, h.cfg.StoreDB, h.cfg.DeliveryDB
			for _, tc := range []struct {
				name        string
				break_, fix []stmt
				want        []string
			}{
				{"an order left pending",
					[]stmt{{o, `UPDATE delivery_orders SET state = 'PENDING' WHERE id = $1`, []any{notPlaced.ID}}},
					[]stmt{{o, `UPDATE delivery_orders SET state = 'NOT_PLACED' WHERE id = $1`, []any{notPlaced.ID}}},
					[]string{delivery.InvEveryOrderEnded}},
				{"a saga left compensating",
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensating' WHERE id = $1`, []any{notPlaced.ID}}},
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensated' WHERE id = $1`, []any{notPlaced.ID}}},
					[]string{delivery.InvEverySagaEnded}},
				{"a placed order without its packet",
					[]stmt{{st, `UPDATE troupe_reservations SET owner = 'someone' WHERE owner = $1`, []any{placed.ID}}},
					[]stmt{{st, `UPDATE troupe_reservations SET owner = $1 WHERE owner = 'someone'`, []any{placed.ID}}},
					[]string{delivery.InvPlacedFulfilled}},
				{"a not-placed order with an agent",
					[]stmt{{d, `UPDATE troupe_reservations SET owner = $1 WHERE owner = $2`, []any{notPlaced.ID, placed.ID}}},
					[]stmt{{d, `UPDATE troupe_reservations SET owner = $1 WHERE owner = $2 AND state = 'confirmed'`, []any{placed.ID, notPlaced.ID}}},
					[]string{delivery.InvPlacedFulfilled, delivery.InvNotPlacedNothing}},
				{"a packet assigned to two reservations",
					[]stmt{{st, `INSERT INTO troupe_reservations (id, pool, resource, owner, state, created_at, updated_at)
						SELECT 'x', pool, resource, 'nobody', 'confirmed', created_at, updated_at FROM troupe_reservations WHERE owner = $1`, []any{placed.ID}}},
					[]stmt{{st, `DELETE FROM troupe_reservations WHERE id = 'x'`, nil}},
					[]string{delivery.InvAssignedOnce, delivery.InvAssignedOnce}},
				{"a placed order's packet marked released",
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'released' WHERE owner = $1`, []any{placed.ID}}},
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'confirmed' WHERE owner = $1`, []any{placed.ID}}},
					[]string{delivery.InvPlacedFulfilled, delivery.InvAssignedOnce}},
				{"a not-placed order with a confirmed packet",
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'confirmed' WHERE owner = $1`, []any{notPlaced.ID}}},
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'refused' WHERE owner = $1`, []any{notPlaced.ID}}},
					[]string{delivery.InvNotPlacedNothing, delivery.InvAssignedOnce}},
				{"a packet left held",
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'held' WHERE owner = $1`, []any{notPlaced.ID}}},
					[]stmt{{st, `UPDATE troupe_reservations SET state = 'refused' WHERE owner = $1`, []any{notPlaced.ID}}},
					[]string{delivery.InvNotPlacedNothing, delivery.InvNothingHeld}},
			} {
				run := func(ss []stmt) {
					for _, s := range ss {
						if _, err := s.db.Exec(h.ctx, s.sql, s.args...); err != nil {
							t.Fatalf("%s: %s: %v", tc.name, s.sql, err)
						}
					}
				}
				run(tc.break_)
				v, err := h.s.Check(h.ctx)
				if err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
				var got []string
				for _, x := range v {
					got = append(got, x.Invariant)
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("%s: Check found %v, want %v", tc.name, v, tc.want)
				}
				run(tc.fix)
			}
			h.checkInvariants()
		})
	}
}
