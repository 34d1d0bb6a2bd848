package chaos

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/sqldb"
)

// isLiveness tells whether an invariant holds only once the system has
// quiesced: whatever was in flight has ended, been delivered or expired.
// The others (credit reserved equals approved totals, nothing assigned
// twice...) must hold at quiescence too, but no waiting makes a broken one
// hold.
func isLiveness(inv string) bool {
	return slices.Contains([]string{
		shop.InvEveryOrderEnded, shop.InvEverySagaEnded, shop.InvEveryFlowEnded, shop.InvOutboxDelivered,
		delivery.InvEveryOrderEnded, delivery.InvEverySagaEnded, delivery.InvNothingHeld, delivery.InvOutboxDelivered,
	}, inv)
}

// quiesce waits until the liveness invariants hold, and returns those
// that still do not when ctx ends.
func (r *run) quiesce(ctx context.Context) ([]string, error) {
	var last []string
	var lastErr error
	for {
		vs, err := r.check(ctx, true)
		if err == nil && len(vs) == 0 {
			return nil, nil
		}
		if err == nil {
			last, lastErr = vs, nil
		} else if last == nil {
			lastErr = err
		}
		if !wait(ctx, 500*time.Millisecond) {
			if lastErr != nil {
				return nil, fmt.Errorf("chaos: check the databases: %w", lastErr)
			}
			for i, v := range last {
				last[i] = "not quiescent: " + v
			}
			return last, nil
		}
	}
}

// check reads the services' databases and returns the broken invariants:
// the liveness ones only, or the others.
func (r *run) check(ctx context.Context, live bool) ([]string, error) {
	var out []string
	keep := func(inv, s string) {
		if isLiveness(inv) == live {
			out = append(out, s)
		}
	}
	for _, role := range r.roles {
		vs, err := checkAudit(ctx, r.db(role), role, live)
		if err != nil {
			return nil, err
		}
		out = append(out, vs...)
	}
	for _, e := range r.cfg.Examples {
		switch e {
		case Shop:
			vs, err := shop.CheckDatabases(ctx, r.db(RoleShopOrder), r.db(RoleShopCustomer))
			if err != nil {
				return nil, err
			}
			for _, v := range vs {
				keep(v.Invariant, "shop: "+v.String())
			}
		case Delivery:
			vs, err := delivery.CheckDatabases(ctx, r.db(RoleDeliveryOrder), r.db(RoleDeliveryStore), r.db(RoleDeliveryDispatch))
			if err != nil {
				return nil, err
			}
			for _, v := range vs {
				keep(v.Invariant, "delivery: "+v.String())
			}
		}
	}
	return out, nil
}

// count reads how many orders ended how and how many sagas ran, by
// example.
func (r *run) count(ctx context.Context) (map[string]Counts, error) {
	out := map[string]Counts{}
	for _, e := range r.cfg.Examples {
		orderDB, table := r.db(RoleShopOrder), "shop_orders"
		if e == Delivery {
			orderDB, table = r.db(RoleDeliveryOrder), "delivery_orders"
		}
		c := Counts{Orders: map[string]int{}, Sagas: map[string]int{}, Flows: map[string]int{}}
		type query struct {
			sql string
			m   map[string]int
		}
		queries := []query{
			{`SELECT state, count(*) FROM ` + table + ` GROUP BY state`, c.Orders},
			{`SELECT status, count(*) FROM troupe_sagas GROUP BY status`, c.Sagas},
		}
		if e == Shop {
			// The choreographed shop's business transactions are flows.
			queries = append(queries, query{`SELECT status, count(*) FROM troupe_flows GROUP BY status`, c.Flows})
		}
		for _, q := range queries {
			rows, err := orderDB.Query(ctx, q.sql)
			if err != nil {
				return nil, fmt.Errorf("chaos: count %s: %w", e, err)
			}
			for rows.Next() {
				var k string
				var n int
				if err := rows.Scan(&k, &n); err != nil {
					rows.Close()
					return nil, err
				}
				q.m[k] = n
			}
			if err := rows.Close(); err != nil {
				return nil, err
			}
		}
		out[e] = c
	}
	return out, nil
}

// unfinished describes a few sagas that have not ended, with why, to
// start the search for the cause of a run that did not quiesce.
func (r *run) unfinished(ctx context.Context) []string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var out []string
	for _, role := range []string{RoleShopOrder, RoleDeliveryOrder} {
		db := r.db(role)
		if db == nil {
			continue
		}
		rows, err := db.Query(ctx, `SELECT id, status, step, awaiting, attempt, reason FROM troupe_sagas
			WHERE status NOT IN ('completed', 'compensated') ORDER BY updated_at LIMIT 3`)
		if err != nil {
			continue
		}
		for rows.Next() {
			var id, status, awaiting, reason string
			var step, attempt int
			if rows.Scan(&id, &status, &step, &awaiting, &attempt, &reason) == nil {
				out = append(out, fmt.Sprintf("%s: saga %s is %s at step %d, awaiting %q (attempt %d): %s", role, id, status, step, awaiting, attempt, reason))
			}
		}
		rows.Close()
	}
	return append(out, r.pendingShopOrders(ctx)...)
}

// pendingShopOrders describes a few shop orders still PENDING: the
// messages each service's outbox holds about it, and what the Customer's
// barrier and the flow tracker recorded.
func (r *run) pendingShopOrders(ctx context.Context) []string {
	orderDB, customerDB := r.db(RoleShopOrder), r.db(RoleShopCustomer)
	if orderDB == nil || customerDB == nil {
		return nil
	}
	rows, err := orderDB.Query(ctx, `SELECT id FROM shop_orders WHERE state = 'PENDING' ORDER BY created_at LIMIT 3`)
	if err != nil {
		return nil
	}
	var ids []string
	for rows.Next() {
		var id string
		if rows.Scan(&id) == nil {
			ids = append(ids, id)
		}
	}
	rows.Close()
	list := func(db *sqldb.DB, q, id string) string {
		var s string
		if err := db.QueryRow(ctx, q, id).Scan(&s); err != nil {
			return "(" + err.Error() + ")"
		}
		return "[" + s + "]"
	}
	// claims lists the messages about order id in from's outbox, each
	// with the inbox rows that claim it in to.
	claims := func(from, to *sqldb.DB, id string) string {
		var msgIDs []string
		if rows, err := from.Query(ctx, `SELECT id FROM troupe_outbox WHERE subject = $1 ORDER BY seq`, id); err == nil {
			for rows.Next() {
				var m string
				if rows.Scan(&m) == nil {
					msgIDs = append(msgIDs, m)
				}
			}
			rows.Close()
		}
		var out []string
		for _, m := range msgIDs {
			out = append(out, m+": "+list(to, `SELECT COALESCE(string_agg(consumer || ' at ' || handled_at::text, ', '), 'not claimed') FROM troupe_inbox WHERE message_id = $1`, m))
		}
		return strings.Join(out, "; ")
	}
	var out []string
	for _, id := range ids {
		out = append(out, fmt.Sprintf("shop order %s is PENDING: Order outbox %s (Customer inbox: %s), Customer outbox %s (Order inbox: %s), Customer barrier %s, flow events %s", id,
			list(orderDB, `SELECT COALESCE(string_agg(topic || ' ' || CASE WHEN delivered_at IS NULL THEN 'pending' ELSE 'delivered' END, ', ' ORDER BY seq), '') FROM troupe_outbox WHERE subject = $1`, id),
			claims(orderDB, customerDB, id),
			list(customerDB, `SELECT COALESCE(string_agg(topic || ' ' || CASE WHEN delivered_at IS NULL THEN 'pending' ELSE 'delivered' END, ', ' ORDER BY seq), '') FROM troupe_outbox WHERE subject = $1`, id),
			claims(customerDB, orderDB, id),
			list(customerDB, `SELECT COALESCE(string_agg(op || '/' || origin, ', '), '') FROM troupe_barrier WHERE saga_id = $1`, id),
			list(orderDB, `SELECT COALESCE(string_agg(type || ' (' || role || ')', ', ' ORDER BY msg_time), '') FROM troupe_flow_events WHERE flow_id = $1`, id)))
	}
	return out
}

// InvAcknowledgedKept is the harness's own invariant: an order a service
// answered 201 to was committed, so it is in the database after any crash.
const InvAcknowledgedKept = "every order acknowledged to a client exists"

// InvOneOrderPerKey is the harness's other invariant: an order sent again
// with its Idempotency-Key is answered with the order the key created.
const InvOneOrderPerKey = "one order per Idempotency-Key"

// checkAcknowledged returns a violation for each example with orders its
// clients were told were taken but that its Order database does not hold.
func (r *run) checkAcknowledged(ctx context.Context) ([]string, error) {
	var out []string
	for _, e := range r.cfg.Examples {
		db, table := r.db(RoleShopOrder), "shop_orders"
		if e == Delivery {
			db, table = r.db(RoleDeliveryOrder), "delivery_orders"
		}
		have := map[string]bool{}
		rows, err := db.Query(ctx, `SELECT id FROM `+table)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return nil, err
			}
			have[id] = true
		}
		if err := rows.Close(); err != nil {
			return nil, err
		}
		var missing []string
		for _, c := range r.clients {
			if c.example != e {
				continue
			}
			for _, id := range c.taken() {
				if !have[id] {
					missing = append(missing, id)
				}
			}
		}
		if len(missing) > 0 {
			out = append(out, fmt.Sprintf("%s: %s: %d orders answered 201 are not in the database (first: %s)", e, InvAcknowledgedKept, len(missing), missing[0]))
		}
	}
	return out, nil
}

// deadLettered counts the messages in the broker's dead-letter topics, by
// topic. No message of a chaos run is poison, so each one is a message a
// consumer gave up on because of the faults (its deliveries spent on
// crashes and outages): a saga resends its command and recovers, a
// choreography does not.
func (r *run) deadLettered(ctx context.Context) (map[string]int, error) {
	nc, err := nats.Connect(r.natsURL, nats.Timeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("chaos: connect to the NATS server: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	streams := js.ListStreams(ctx)
	for si := range streams.Info() {
		if strings.HasSuffix(si.Config.Name, "_dlq") && si.State.Msgs > 0 {
			out[si.Config.Name] = int(si.State.Msgs)
		}
	}
	return out, streams.Err()
}
