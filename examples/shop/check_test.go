package shop_test

import (
	"slices"
	"testing"
	"time"

	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/sqldb"
)

// Check reports each broken invariant, on both dialects, and nothing on a
// shop whose state is sound: one corruption at a time, each undone before
// the next.
func TestShop_CheckReportsEachBrokenInvariantAndNothingElse(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			ok := h.place("c1", 500)
			over := h.place("c1", 50_000)
			if got := h.await(ok.ID); got.State != order.Approved {
				t.Fatalf("order %s, want APPROVED", got.State)
			}
			if got := h.await(over.ID); got.State != order.Rejected {
				t.Fatalf("order %s, want REJECTED", got.State)
			}
			h.checkInvariants()
			now := time.Now().UTC()
			type stmt struct {
				db   *sqldb.DB
				sql  string
				args []any
			}
			o, c := h.orderDB, h.customerDB
			for _, tc := range []struct {
				name        string
				break_, fix []stmt
				want        []string
			}{
				{"an order left pending",
					[]stmt{{o, `UPDATE shop_orders SET state = 'PENDING' WHERE id = $1`, []any{over.ID}}},
					[]stmt{{o, `UPDATE shop_orders SET state = 'REJECTED' WHERE id = $1`, []any{over.ID}}},
					[]string{shop.InvEveryOrderEnded}},
				{"a saga left compensating",
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensating' WHERE id = $1`, []any{over.ID}}},
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensated' WHERE id = $1`, []any{over.ID}}},
					[]string{shop.InvEverySagaEnded}},
				{"a flow left running",
					[]stmt{{o, `INSERT INTO troupe_flows (id, name, status, started_at, updated_at, events) VALUES ('f1', 'x', 'running', $1, $1, 1)`, []any{now}}},
					[]stmt{{o, `DELETE FROM troupe_flows WHERE id = 'f1'`, nil}},
					[]string{shop.InvEveryFlowEnded}},
				{"an approved order whose saga compensated",
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensated' WHERE id = $1`, []any{ok.ID}}},
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'completed' WHERE id = $1`, []any{ok.ID}}},
					[]string{shop.InvStateMatchesSaga}},
				{"a rejected order whose saga completed",
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'completed' WHERE id = $1`, []any{over.ID}}},
					[]stmt{{o, `UPDATE troupe_sagas SET status = 'compensated' WHERE id = $1`, []any{over.ID}}},
					[]string{shop.InvStateMatchesSaga}},
				{"a cancelled order whose credit was not released",
					[]stmt{{o, `UPDATE shop_orders SET state = 'CANCELLED' WHERE id = $1`, []any{ok.ID}}, {o, `UPDATE troupe_sagas SET status = 'compensated' WHERE id = $1`, []any{ok.ID}}},
					[]stmt{{o, `UPDATE shop_orders SET state = 'APPROVED' WHERE id = $1`, []any{ok.ID}}, {o, `UPDATE troupe_sagas SET status = 'completed' WHERE id = $1`, []any{ok.ID}}},
					[]string{shop.InvReservedApproved}},
				{"an approved order whose credit was released",
					[]stmt{{c, `UPDATE shop_customers SET reserved = 0 WHERE id = 'c1'`, nil}},
					[]stmt{{c, `UPDATE shop_customers SET reserved = 500 WHERE id = 'c1'`, nil}},
					[]string{shop.InvReservedApproved}},
				{"credit reserved over the limit",
					[]stmt{{c, `UPDATE shop_customers SET credit_limit = 499 WHERE id = 'c1'`, nil}},
					[]stmt{{c, `UPDATE shop_customers SET credit_limit = 10000 WHERE id = 'c1'`, nil}},
					[]string{shop.InvWithinLimit}},
				{"credit reserved up to the limit exactly (sound)",
					[]stmt{{c, `UPDATE shop_customers SET credit_limit = 500 WHERE id = 'c1'`, nil}},
					[]stmt{{c, `UPDATE shop_customers SET credit_limit = 10000 WHERE id = 'c1'`, nil}},
					nil},
			} {
				run := func(ss []stmt) {
					for _, s := range ss {
						if _, err := s.db.Exec(h.ctx, s.sql, s.args...); err != nil {
							t.Fatalf("%s: %s: %v", tc.name, s.sql, err)
						}
					}
				}
				run(tc.break_)
				v, err := h.shop.Check(h.ctx)
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

// CheckDatabases needs only the two databases: with both services
// stopped, as a checker process finds them, it reports a message left
// undelivered in either outbox, per database; once the services run
// again, their relays deliver it and every invariant holds.
func TestShop_CheckDatabasesReportsOutboxMessagesLeftUndeliveredUntilARelayDeliversThem(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind)
			if got := h.await(h.place("c1", 500).ID); got.State != order.Approved {
				t.Fatalf("order %s, want APPROVED", got.State)
			}
			h.checkInvariants()
			if err := h.shop.Stop(); err != nil {
				t.Fatal(err)
			}
			// The last message each service sent (a command, a reply), as
			// if the relay had stopped between publishing it and marking it.
			for _, db := range []*sqldb.DB{h.orderDB, h.customerDB} {
				n, err := db.Exec(h.ctx, `UPDATE troupe_outbox SET delivered_at = NULL WHERE seq = (SELECT max(seq) FROM troupe_outbox)`)
				if err != nil || n != 1 {
					t.Fatalf("leave a message undelivered: %d rows, %v", n, err)
				}
			}
			v, err := shop.CheckDatabases(h.ctx, h.orderDB, h.customerDB)
			if err != nil {
				t.Fatal(err)
			}
			want := []shop.Violation{
				{Invariant: shop.InvOutboxDelivered, Detail: "Order database: 1 outbox messages are not delivered"},
				{Invariant: shop.InvOutboxDelivered, Detail: "Customer database: 1 outbox messages are not delivered"},
			}
			if !slices.Equal(v, want) {
				t.Errorf("CheckDatabases found %v, want %v", v, want)
			}
			if err := h.shop.StartCustomer(h.ctx); err != nil {
				t.Fatal(err)
			}
			if err := h.shop.StartOrder(h.ctx); err != nil {
				t.Fatal(err)
			}
			h.checkInvariants()
		})
	}
}
