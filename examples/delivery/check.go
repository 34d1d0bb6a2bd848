package delivery

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// The invariants Check reads, by name.
const (
	InvEveryOrderEnded  = "every order ended"
	InvEverySagaEnded   = "every saga ended"
	InvPlacedFulfilled  = "every placed order has its packets and one agent"
	InvNotPlacedNothing = "not-placed orders hold nothing"
	InvAssignedOnce     = "no packet or agent assigned twice"
	InvNothingHeld      = "no reservation left held"
	InvOutboxDelivered  = "every outbox message delivered"
)

// Invariants lists the invariants Check reads, in the order it reports
// them.
var Invariants = []string{InvEveryOrderEnded, InvEverySagaEnded, InvPlacedFulfilled, InvNotPlacedNothing, InvAssignedOnce, InvNothingHeld, InvOutboxDelivered}

// Violation is a broken invariant.
type Violation struct {
	// Invariant names the rule (one of Invariants).
	Invariant string
	// Detail says where and how it is broken.
	Detail string
}

func (v Violation) String() string { return v.Invariant + ": " + v.Detail }

// Check reads the three databases and returns every broken invariant of
// a quiescent example: CheckDatabases on the services' databases.
func (s *Services) Check(ctx context.Context) ([]Violation, error) {
	return CheckDatabases(ctx, s.cfg.OrderDB, s.cfg.StoreDB, s.cfg.DeliveryDB)
}

// CheckDatabases reads the Order, Store and Delivery databases, and only
// them, and returns every broken invariant of a quiescent example (no
// order in flight, every hold past its expiry released), so a process
// that did not run the services (a checker, a fault-injection harness)
// can call it:
//
//   - every order has ended (PLACED or NOT_PLACED), and every saga
//     (completed or compensated; none running, compensating or parked);
//   - every PLACED order has exactly its quantity of packets assigned at
//     the Store and exactly one agent at the Delivery service, assigned
//     or back from delivering it (released);
//   - a NOT_PLACED order holds nothing: no packet or agent is held,
//     assigned or was delivered for it;
//   - no packet or agent is assigned twice: at most one confirmed
//     reservation per resource, and the resource is assigned to exactly
//     the reservation that confirmed it;
//   - no reservation is left held, and no resource;
//   - every message written to the Order service's or the Store's outbox
//     has been delivered to the broker (the Delivery service has no
//     outbox: it answers over HTTP and publishes nothing).
func CheckDatabases(ctx context.Context, orderDB, storeDB, deliveryDB *sqldb.DB) ([]Violation, error) {
	var out []Violation
	add := func(inv, format string, args ...any) {
		out = append(out, Violation{Invariant: inv, Detail: fmt.Sprintf(format, args...)})
	}
	type orderRow struct {
		state                order.State
		quantity             int
		food, packets, agent string
	}
	orders := map[string]orderRow{}
	err := query(ctx, orderDB, `SELECT id, state, quantity, food_id, packets, agent FROM delivery_orders`, func(scan func(...any) error) error {
		var id, state string
		var r orderRow
		if err := scan(&id, &state, &r.quantity, &r.food, &r.packets, &r.agent); err != nil {
			return err
		}
		r.state = order.State(state)
		orders[id] = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	var pending int
	for _, o := range orders {
		if o.state == order.Pending {
			pending++
		}
	}
	if pending > 0 {
		add(InvEveryOrderEnded, "%d orders are still PENDING", pending)
	}
	var unfinished int
	if err := orderDB.QueryRow(ctx, `SELECT count(*) FROM troupe_sagas WHERE status NOT IN ($1, $2)`,
		string(saga.Completed), string(saga.Compensated)).Scan(&unfinished); err != nil {
		return nil, err
	}
	if unfinished > 0 {
		add(InvEverySagaEnded, "%d sagas are running, compensating or parked", unfinished)
	}

	packets, err := reservations(ctx, storeDB)
	if err != nil {
		return nil, fmt.Errorf("delivery: read the Store's reservations: %w", err)
	}
	agents, err := reservations(ctx, deliveryDB)
	if err != nil {
		return nil, fmt.Errorf("delivery: read the Delivery service's reservations: %w", err)
	}
	packetsOf, err := assigned(ctx, storeDB)
	if err != nil {
		return nil, fmt.Errorf("delivery: read the Store's reservations: %w", err)
	}
	agentsOf, err := assigned(ctx, deliveryDB)
	if err != nil {
		return nil, fmt.Errorf("delivery: read the Delivery service's reservations: %w", err)
	}
	for id, o := range orders {
		p, a := packets[id], agents[id]
		switch o.state {
		case order.Placed:
			// The right numbers, then what the customer is shown is what
			// was assigned.
			var shown []string
			for _, pk := range strings.Split(o.packets, ",") {
				shown = append(shown, store.Pool(o.food)+"/"+pk)
			}
			slices.Sort(shown)
			if got := p[reserve.Confirmed]; got != o.quantity || p[reserve.Released] != 0 {
				add(InvPlacedFulfilled, "order %s has %d packets assigned, want %d", id, got, o.quantity)
			} else if got := packetsOf[id]; !slices.Equal(got, shown) {
				add(InvPlacedFulfilled, "order %s shows packets %v, the Store assigned it %v", id, shown, got)
			}
			if got := a[reserve.Confirmed] + a[reserve.Released]; got != 1 {
				add(InvPlacedFulfilled, "order %s has %d agents assigned or delivering, want 1", id, got)
			} else if got := agentsOf[id]; !slices.Equal(got, []string{dispatch.AgentPool + "/" + o.agent}) {
				add(InvPlacedFulfilled, "order %s shows agent %q, the Delivery service assigned it %v", id, o.agent, got)
			}
		case order.NotPlaced:
			if n := p[reserve.Held] + p[reserve.Confirmed] + p[reserve.Released]; n > 0 {
				add(InvNotPlacedNothing, "order %s holds %d packets", id, n)
			}
			if n := a[reserve.Held] + a[reserve.Confirmed] + a[reserve.Released]; n > 0 {
				add(InvNotPlacedNothing, "order %s holds or was delivered by %d agents", id, n)
			}
		}
	}

	for _, db := range []struct {
		name string
		db   *sqldb.DB
	}{{"Store", storeDB}, {"Delivery", deliveryDB}} {
		err := query(ctx, db.db, `SELECT pool, resource, count(*) FROM troupe_reservations WHERE state = 'confirmed'
			GROUP BY pool, resource HAVING count(*) > 1`, func(scan func(...any) error) error {
			var pool, res string
			var n int
			if err := scan(&pool, &res, &n); err != nil {
				return err
			}
			add(InvAssignedOnce, "%s: %s/%s is assigned to %d reservations", db.name, pool, res, n)
			return nil
		})
		if err != nil {
			return nil, err
		}
		// Each assigned resource and each confirmed reservation point at
		// each other.
		err = query(ctx, db.db, `SELECT r.pool, r.id, r.state, r.reservation, COALESCE(v.state, '') FROM troupe_resources r
			LEFT JOIN troupe_reservations v ON v.id = r.reservation
			WHERE (r.state = 'assigned') <> (COALESCE(v.state, '') = 'confirmed') AND r.state <> 'held'`, func(scan func(...any) error) error {
			var pool, id, state, res, resState string
			if err := scan(&pool, &id, &state, &res, &resState); err != nil {
				return err
			}
			add(InvAssignedOnce, "%s: %s/%s is %s by reservation %q, which is %q", db.name, pool, id, state, res, resState)
			return nil
		})
		if err != nil {
			return nil, err
		}
		err = query(ctx, db.db, `SELECT v.id, v.pool, v.resource FROM troupe_reservations v
			LEFT JOIN troupe_resources r ON r.pool = v.pool AND r.id = v.resource AND r.reservation = v.id AND r.state = 'assigned'
			WHERE v.state = 'confirmed' AND r.id IS NULL`, func(scan func(...any) error) error {
			var id, pool, res string
			if err := scan(&id, &pool, &res); err != nil {
				return err
			}
			add(InvAssignedOnce, "%s: reservation %s is confirmed, but %s/%s is not assigned to it", db.name, id, pool, res)
			return nil
		})
		if err != nil {
			return nil, err
		}
		var held, heldRes int
		if err := db.db.QueryRow(ctx, `SELECT count(*) FROM troupe_reservations WHERE state = 'held'`).Scan(&held); err != nil {
			return nil, err
		}
		if err := db.db.QueryRow(ctx, `SELECT count(*) FROM troupe_resources WHERE state = 'held'`).Scan(&heldRes); err != nil {
			return nil, err
		}
		if held+heldRes > 0 {
			add(InvNothingHeld, "%s: %d reservations and %d resources are held", db.name, held, heldRes)
		}
	}
	for _, db := range []struct {
		name string
		db   *sqldb.DB
	}{{"Order", orderDB}, {"Store", storeDB}} {
		var undelivered int
		if err := db.db.QueryRow(ctx, `SELECT count(*) FROM `+outbox.Table+` WHERE delivered_at IS NULL`).Scan(&undelivered); err != nil {
			return nil, err
		}
		if undelivered > 0 {
			add(InvOutboxDelivered, "%s: %d outbox messages are not delivered", db.name, undelivered)
		}
	}
	return sortViolations(out), nil
}

// sortViolations orders violations as Invariants lists them.
func sortViolations(vs []Violation) []Violation {
	var out []Violation
	for _, inv := range Invariants {
		for _, v := range vs {
			if v.Invariant == inv {
				out = append(out, v)
			}
		}
	}
	return out
}

// reservations counts a participant's reservations by owner and state.
func reservations(ctx context.Context, db *sqldb.DB) (map[string]map[reserve.State]int, error) {
	out := map[string]map[reserve.State]int{}
	err := query(ctx, db, `SELECT owner, state, count(*) FROM troupe_reservations WHERE owner <> '' GROUP BY owner, state`,
		func(scan func(...any) error) error {
			var owner, state string
			var n int
			if err := scan(&owner, &state, &n); err != nil {
				return err
			}
			if out[owner] == nil {
				out[owner] = map[reserve.State]int{}
			}
			out[owner][reserve.State(state)] = n
			return nil
		})
	return out, err
}

// assigned lists, by owner, the "pool/resource" of a participant's
// reservations confirmed or released (used), sorted.
func assigned(ctx context.Context, db *sqldb.DB) (map[string][]string, error) {
	out := map[string][]string{}
	err := query(ctx, db, `SELECT owner, pool, resource FROM troupe_reservations WHERE state IN ('confirmed', 'released')
		ORDER BY owner, pool, resource`, func(scan func(...any) error) error {
		var owner, pool, res string
		if err := scan(&owner, &pool, &res); err != nil {
			return err
		}
		out[owner] = append(out[owner], pool+"/"+res)
		return nil
	})
	return out, err
}

// query runs q and calls row for each row.
func query(ctx context.Context, db *sqldb.DB, q string, row func(scan func(...any) error) error) error {
	rows, err := db.Query(ctx, q)
	if err != nil {
		return err
	}
	for rows.Next() {
		if err := row(rows.Scan); err != nil {
			rows.Close()
			return err
		}
	}
	return rows.Close()
}

// Totals counts orders by outcome.
type Totals struct {
	Placed, Pending int
	// NotPlaced counts not-placed orders by reason.
	NotPlaced map[string]int
}

// Count reads the totals from the Order database.
func (s *Services) Count(ctx context.Context) (Totals, error) {
	t := Totals{NotPlaced: map[string]int{}}
	err := query(ctx, s.cfg.OrderDB, `SELECT state, reason, count(*) FROM delivery_orders GROUP BY state, reason`,
		func(scan func(...any) error) error {
			var state, reason string
			var n int
			if err := scan(&state, &reason, &n); err != nil {
				return err
			}
			switch order.State(state) {
			case order.Placed:
				t.Placed += n
			case order.NotPlaced:
				t.NotPlaced[reason] += n
			default:
				t.Pending += n
			}
			return nil
		})
	return t, err
}
