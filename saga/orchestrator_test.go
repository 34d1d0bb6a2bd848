package saga_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// orderData is the CreateOrder saga's data.
type orderData struct {
	OrderID  string `json:"order_id"`
	Customer string `json:"customer"`
	Total    int    `json:"total"`
	Fraud    bool   `json:"fraud"`
	Reserved bool   `json:"reserved"`
}

// shop is an Order service (the saga's owner, with its own database) and a
// Customer service (a participant, with its own), connected by an embedded
// NATS JetStream, each relaying its outbox.
type shop struct {
	t        *testing.T
	ctx      context.Context
	broker   *natsjs.Broker
	orderDB  *sqldb.DB
	clock    *clocktest.Clock
	o        *saga.Orchestrator
	def      *saga.Definition[orderData]
	customer *customerService
	stopCust func()
}

// newShop returns a shop on a database of kind; each tweak changes the
// saga's definition before it is registered.
func newShop(t *testing.T, kind string, tweaks ...func(*saga.Definition[orderData])) *shop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	s := &shop{t: t, ctx: ctx, broker: b, clock: clocktest.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))}

	url := "sqlite://" + filepath.Join(t.TempDir(), "order.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	for _, q := range []string{
		`CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '')`,
		`CREATE TABLE order_log (order_id TEXT NOT NULL, entry TEXT NOT NULL)`,
	} {
		if _, err := db.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	s.orderDB = db
	sched, err := timer.New(db, timer.Config{Clock: s.clock, PollInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	s.o, err = saga.New(db, sched, ib, saga.Config{Source: "/services/order", ReplyTopic: "orders.replies"})
	if err != nil {
		t.Fatal(err)
	}
	logEntry := func(entry string) func(ctx context.Context, tx sqldb.Tx, id string, d *orderData) error {
		return func(ctx context.Context, tx sqldb.Tx, id string, d *orderData) error {
			_, err := tx.Exec(ctx, `INSERT INTO order_log (order_id, entry) VALUES ($1, $2)`, d.OrderID, entry)
			return err
		}
	}
	s.def = &saga.Definition[orderData]{
		Name: "create-order",
		Steps: []saga.Step[orderData]{
			{Name: "note", Local: logEntry("noted"), UndoLocal: logEntry("unnoted")},
			{
				Name: "reserve-credit", Topic: "customer.commands", Command: "shop.customer.reserve-credit",
				Input:    func(d *orderData) any { return reserveInput{Customer: d.Customer, Amount: d.Total} },
				OnReply:  func(d *orderData, r *saga.ReplyMsg) error { d.Reserved = true; return nil },
				Deadline: time.Minute, MaxAttempts: 2,
			},
			{Name: "fraud-check", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *orderData) error {
				if err := logEntry("checked")(ctx, tx, id, d); err != nil {
					return err
				}
				if d.Fraud {
					return saga.Refuse(errors.New("fraud suspected"))
				}
				return nil
			}},
		},
		OnCompleted: func(ctx context.Context, tx sqldb.Tx, id string, d *orderData) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'APPROVED' WHERE id = $1`, d.OrderID)
			return err
		},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, id string, d *orderData, reason string) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'REJECTED', reason = $1 WHERE id = $2`, reason, d.OrderID)
			return err
		},
	}
	for _, tweak := range tweaks {
		tweak(s.def)
	}
	if err := s.o.Register(s.def); err != nil {
		t.Fatal(err)
	}
	s.background(func(ctx context.Context) { _ = sched.Run(ctx) })
	s.relay(db)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "orders.replies", Group: "order"}, s.o.Handler("order"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Stop(context.Background()) })

	s.customer = newCustomerService(t, kind)
	s.relay(s.customer.db)
	return s
}

// background runs f until the test ends.
func (s *shop) background(f func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(s.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { f(ctx) })
	s.t.Cleanup(func() { cancel(); wg.Wait() })
}

func (s *shop) relay(db *sqldb.DB) {
	r, err := outbox.NewRelay(db, s.broker, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond})
	if err != nil {
		s.t.Fatal(err)
	}
	s.background(func(ctx context.Context) { _ = r.Run(ctx) })
}

// startCustomer subscribes the Customer service to its commands.
func (s *shop) startCustomer() {
	sub, err := s.broker.Subscribe(s.ctx, broker.SubscribeConfig{Topic: "customer.commands", Group: "customer"}, s.customer.p.Handler("customer"))
	if err != nil {
		s.t.Fatal(err)
	}
	stopped := false
	s.stopCust = func() {
		if !stopped {
			stopped = true
			sub.Stop(context.Background())
		}
	}
	s.t.Cleanup(s.stopCust)
}

// placeOrder inserts the order PENDING and starts its saga, in one transaction.
func (s *shop) placeOrder(d orderData) {
	s.t.Helper()
	err := s.orderDB.InTx(s.ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO orders (id, state) VALUES ($1, 'PENDING')`, d.OrderID); err != nil {
			return err
		}
		return s.def.StartTx(ctx, tx, s.o, "saga-"+d.OrderID, d)
	})
	if err != nil {
		s.t.Fatal(err)
	}
}

// waitStatus waits until the order's saga reaches want.
func (s *shop) waitStatus(orderID string, want saga.Status) saga.Info {
	s.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := s.o.Get(s.ctx, "saga-"+orderID)
		if err != nil {
			s.t.Fatal(err)
		}
		if in.Status == want {
			return in
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("saga of %s: status %s (%s), want %s", orderID, in.Status, in.Reason, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (s *shop) orderState(id string) (state, reason string) {
	s.t.Helper()
	if err := s.orderDB.QueryRow(s.ctx, `SELECT state, reason FROM orders WHERE id = $1`, id).Scan(&state, &reason); err != nil {
		s.t.Fatal(err)
	}
	return state, reason
}

func (s *shop) orderLog(id string) []string {
	s.t.Helper()
	rows, err := s.orderDB.Query(s.ctx, `SELECT entry FROM order_log WHERE order_id = $1`, id)
	if err != nil {
		s.t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var e string
		if err := rows.Scan(&e); err != nil {
			s.t.Fatal(err)
		}
		out = append(out, e)
	}
	if err := rows.Close(); err != nil {
		s.t.Fatal(err)
	}
	return out
}

// history returns the saga's history as "step op event" lines.
func (s *shop) history(orderID string) []string {
	s.t.Helper()
	rows, err := s.orderDB.Query(s.ctx, `SELECT step, op, attempt, event FROM troupe_saga_history WHERE saga_id = $1 ORDER BY seq`, "saga-"+orderID)
	if err != nil {
		s.t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var step, op, event string
		var attempt int
		if err := rows.Scan(&step, &op, &attempt, &event); err != nil {
			s.t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%s %s %d %s", step, op, attempt, event))
	}
	if err := rows.Close(); err != nil {
		s.t.Fatal(err)
	}
	return out
}

func TestOrchestrator_ApprovesAnOrderWithinTheCreditLimit(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind)
			s.startCustomer()
			s.placeOrder(orderData{OrderID: "o1", Customer: "alice", Total: 40})
			in := s.waitStatus("o1", saga.Completed)
			if state, _ := s.orderState("o1"); state != "APPROVED" {
				t.Fatalf("order %s, want APPROVED", state)
			}
			if got := s.customer.reserved(t); got != 40 {
				t.Fatalf("customer reserved %d, want 40", got)
			}
			if !strings.Contains(string(in.Data), `"reserved":true`) {
				t.Fatalf("saga data %s: OnReply's change was not kept", in.Data)
			}
			want := []string{"  0 started", "note action 1 done", "reserve-credit action 1 sent", "reserve-credit action 1 done", "fraud-check action 1 done", "  0 completed"}
			if got := s.history("o1"); !slices.Equal(got, want) {
				t.Fatalf("history\n got %q\nwant %q", got, want)
			}
		})
	}
}

func TestOrchestrator_RejectsAnOrderOverTheLimitAndUndoesTheStepsBefore(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind)
			s.startCustomer()
			s.placeOrder(orderData{OrderID: "o2", Customer: "alice", Total: 500})
			in := s.waitStatus("o2", saga.Compensated)
			if state, reason := s.orderState("o2"); state != "REJECTED" || reason != "credit limit exceeded" {
				t.Fatalf("order %s (%q), want REJECTED for the credit limit", state, reason)
			}
			if in.Reason != "credit limit exceeded" {
				t.Fatalf("saga reason %q", in.Reason)
			}
			if got := s.orderLog("o2"); !slices.Equal(got, []string{"noted", "unnoted"}) {
				t.Fatalf("order log %q: the local step before the refusal must be undone", got)
			}
			if got := s.customer.reserved(t); got != 0 {
				t.Fatalf("customer reserved %d, want 0", got)
			}
		})
	}
}

func TestOrchestrator_CompensatesInReverseOrderWhenALaterStepRefuses(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind)
			s.startCustomer()
			s.placeOrder(orderData{OrderID: "o3", Customer: "alice", Total: 30, Fraud: true})
			s.waitStatus("o3", saga.Compensated)
			if state, reason := s.orderState("o3"); state != "REJECTED" || reason != "fraud suspected" {
				t.Fatalf("order %s (%q), want REJECTED for fraud", state, reason)
			}
			if got := s.customer.reserved(t); got != 0 {
				t.Fatalf("customer reserved %d after compensation, want 0", got)
			}
			// The refused step's own writes were undone (no "checked").
			if got := s.orderLog("o3"); !slices.Equal(got, []string{"noted", "unnoted"}) {
				t.Fatalf("order log %q", got)
			}
			want := []string{"  0 started", "note action 1 done", "reserve-credit action 1 sent", "reserve-credit action 1 done",
				"fraud-check action 1 refused", "reserve-credit compensation 1 sent", "reserve-credit compensation 1 done",
				"note compensation 1 done", "  0 compensated"}
			if got := s.history("o3"); !slices.Equal(got, want) {
				t.Fatalf("history\n got %q\nwant %q", got, want)
			}
		})
	}
}

// A participant that does not answer: the command is sent again at its
// deadline; when it finally answers, the saga goes on and the repeated
// command has no second effect.
func TestOrchestrator_ResendsACommandAtItsDeadline(t *testing.T) {
	s := newShop(t, "sqlite")
	s.placeOrder(orderData{OrderID: "o4", Customer: "alice", Total: 20})
	waitHistory(t, s, "o4", "reserve-credit action 1 sent")
	s.clock.Advance(time.Minute)
	waitHistory(t, s, "o4", "reserve-credit action 2 sent")
	s.startCustomer()
	s.waitStatus("o4", saga.Completed)
	if got := s.customer.reserved(t); got != 20 {
		t.Fatalf("customer reserved %d, want 20 (once)", got)
	}
	if n := s.customer.actions.Load(); n != 1 {
		t.Fatalf("the action ran %d times, want 1", n)
	}
}

// A participant that never answers within MaxAttempts: the action counts as
// failed and the step itself is compensated too (its action may have run);
// when the participant comes back, the compensation overtakes the late
// actions, so nothing stays reserved.
func TestOrchestrator_CompensatesAStepWhoseDeadlinesAllPassed(t *testing.T) {
	s := newShop(t, "sqlite")
	s.placeOrder(orderData{OrderID: "o5", Customer: "alice", Total: 20})
	waitHistory(t, s, "o5", "reserve-credit action 1 sent")
	s.clock.Advance(time.Minute)
	waitHistory(t, s, "o5", "reserve-credit action 2 sent")
	s.clock.Advance(time.Minute)
	waitHistory(t, s, "o5", "reserve-credit compensation 1 sent")
	// The participant's consumer was down; its queue holds action 1,
	// action 2 and the compensation, in that order. The compensation is
	// the barrier's only chance to be first if the actions were lost, so
	// check the state the queue's order gives: the action applies, then
	// the compensation undoes it.
	s.startCustomer()
	in := s.waitStatus("o5", saga.Compensated)
	if got := s.customer.reserved(t); got != 0 {
		t.Fatalf("customer reserved %d after the saga gave up, want 0", got)
	}
	if state, _ := s.orderState("o5"); state != "REJECTED" {
		t.Fatalf("order %s, want REJECTED", state)
	}
	if in.Reason == "" {
		t.Fatal("no reason recorded")
	}
	if h := s.history("o5"); !slices.Contains(h, "reserve-credit action 0 ignored-reply") {
		t.Fatalf("history %q: the late action reply must be ignored", h)
	}
	var timers int
	if err := s.orderDB.QueryRow(s.ctx, `SELECT count(*) FROM troupe_timers`).Scan(&timers); err != nil || timers != 0 {
		t.Fatalf("%d deadline timers left (%v), want 0", timers, err)
	}
}

func waitHistory(t *testing.T, s *shop, orderID, entry string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !slices.Contains(s.history(orderID), entry) {
		if time.Now().After(deadline) {
			t.Fatalf("history of %s never had %q: %q", orderID, entry, s.history(orderID))
		}
		time.Sleep(5 * time.Millisecond)
	}
}
