package delivery_test

import (
	"context"
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
			// Two agents, so that the soup order fails at the Store alone:
			// its refused packet reservation, which the corruptions below
			// edit, is then certain to be there. With no agent free, the
			// Delivery service's refusal could end the saga first, and its
			// cancel overtake the packet's Try, which the barrier then
			// refuses without a row.
			h := newHarness(t, kind, setup{packets: 2, agents: 2})
			placed := h.await(h.place("pizza", 1).ID)
			notPlaced := h.await(h.place("soup", 1).ID)
			if placed.State != order.Placed || notPlaced.State != order.NotPlaced || notPlaced.Reason != order.ReasonSoldOut {
				t.Fatalf("orders %s and %s %q, want PLACED and NOT_PLACED sold out", placed.State, notPlaced.State, notPlaced.Reason)
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

// CheckDatabases needs only the three databases: with every service
// stopped, as a checker process finds them, it reports a message left
// undelivered in the Order service's or the Store's outbox, per database;
// once the services run again, their relays deliver it and every
// invariant holds.
func TestDelivery_CheckDatabasesReportsOutboxMessagesLeftUndeliveredUntilARelayDeliversThem(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{packets: 2, agents: 1})
			if placed := h.await(h.place("pizza", 1).ID); placed.State != order.Placed {
				t.Fatalf("order %s %q, want PLACED", placed.State, placed.Reason)
			}
			h.checkInvariants()
			for _, stop := range []func() error{h.s.StopOrder, h.s.StopStore, h.s.StopDelivery} {
				if err := stop(); err != nil {
					t.Fatal(err)
				}
			}
			// The last message each service sent (an event, a reply), as
			// if its relay had stopped between publishing it and marking it.
			o, st, d := h.cfg.OrderDB, h.cfg.StoreDB, h.cfg.DeliveryDB
			for _, db := range []*sqldb.DB{o, st} {
				n, err := db.Exec(h.ctx, `UPDATE troupe_outbox SET delivered_at = NULL WHERE seq = (SELECT max(seq) FROM troupe_outbox)`)
				if err != nil || n != 1 {
					t.Fatalf("leave a message undelivered: %d rows, %v", n, err)
				}
			}
			v, err := delivery.CheckDatabases(h.ctx, o, st, d)
			if err != nil {
				t.Fatal(err)
			}
			want := []delivery.Violation{
				{Invariant: delivery.InvOutboxDelivered, Detail: "Order: 1 outbox messages are not delivered"},
				{Invariant: delivery.InvOutboxDelivered, Detail: "Store: 1 outbox messages are not delivered"},
			}
			if !slices.Equal(v, want) {
				t.Errorf("CheckDatabases found %v, want %v", v, want)
			}
			for _, start := range []func(context.Context) error{h.s.StartDelivery, h.s.StartStore, h.s.StartOrder} {
				if err := start(h.ctx); err != nil {
					t.Fatal(err)
				}
			}
			h.checkInvariants()
		})
	}
}
