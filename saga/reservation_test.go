package saga_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// delivery is the data of the order sagas the reservation tests run: an
// order of one dish, to be delivered by an agent.
type delivery struct {
	Order string `json:"order"`
	Dish  string `json:"dish"`
	// Reserved lists, by resource, what the Trys' replies said they held
	// (OnReserved): a reply applied twice shows twice.
	Reserved map[string][]string `json:"reserved,omitempty"`
}

// The command types of the packets (the kitchen) and the agents.
const (
	packetTry, packetConfirm = "delivery.packet.try", "delivery.packet.confirm"
	agentTry, agentConfirm   = "delivery.agent.try", "delivery.agent.confirm"
)

// deliveryReservations reserves a packet of the order's dish at the
// kitchen, over the broker (its Try 10 s × 3 sends), and an agent over
// HTTP at agentsURL (its Try 20 s of calls), for 2 minutes. The Confirms
// get what the expiry leaves after the slowest Try (30 s) and the margin
// (12 s), 78 s: the packet's Confirm 7 sends of 10 s, the agent's 78 s of
// calls.
func deliveryReservations(agentsURL string) saga.Reservations[delivery] {
	return saga.Reservations[delivery]{Name: "delivery", Expiry: 2 * time.Minute, Resources: []saga.Reserve[delivery]{
		{Name: "packet", Topic: "kitchen.commands", TryCommand: packetTry, ConfirmCommand: packetConfirm,
			Input:      func(d *delivery) any { return reserve.SagaRequest{Pool: "dish:" + d.Dish, Owner: d.Order} },
			OnReserved: noteReserved("packet"), Deadline: 10 * time.Second, MaxAttempts: 3},
		{Name: "agent", TryURL: agentsURL + "/try", ConfirmURL: agentsURL + "/confirm",
			Input:      func(d *delivery) any { return reserve.SagaRequest{Pool: "agents"} }, // the owner: the saga id
			OnReserved: noteReserved("agent"), Deadline: 20 * time.Second, MaxAttempts: 3},
	}}
}

// noteReserved is an OnReserved that notes the resource the reply names.
func noteReserved(name string) func(d *delivery, r *saga.ReplyMsg) error {
	return func(d *delivery, r *saga.ReplyMsg) error {
		var rep reserve.SagaReply
		if err := json.Unmarshal(r.Msg.Data, &rep); err != nil {
			return fmt.Errorf("reply of %s: %w", name, err)
		}
		if d.Reserved == nil {
			d.Reserved = map[string][]string{}
		}
		d.Reserved[name] = append(d.Reserved[name], rep.Resource)
		return nil
	}
}

// deliveryFleet is an ordering service (the fleet's database, clock and
// broker, with an orchestrator of the delivery saga) and two participant
// services with Reservers: the kitchen, which takes commands over the
// broker, and the agents, called over HTTP. The kitchen has two packets of
// pizza and none of soup; the agents are two.
type deliveryFleet struct {
	*fleet
	kitchen, agents *reserver
	def             *saga.Definition[delivery]
	started         time.Time // the clock when the fleet was made
}

// newDeliveryFleet returns a running fleet; with duplicates, every message
// is published twice.
func newDeliveryFleet(t *testing.T, kind string, duplicates bool) (*deliveryFleet, *faulty.Broker) {
	t.Helper()
	f := newFleet(t, kind, false)
	b, err := natsjs.New(f.ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	f.broker = b
	var pub broker.Publisher = b
	var fb *faulty.Broker
	if duplicates {
		if fb, err = faulty.Wrap(b, faulty.Config{Duplicate: 1}); err != nil {
			t.Fatal(err)
		}
		pub = fb
	}
	df := &deliveryFleet{fleet: f, started: f.clock.Now()}
	df.relayTo(f.db, pub)
	if _, err := f.db.Exec(f.ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	df.kitchen = df.addReserver("kitchen", packetTry, packetConfirm, pub)
	df.agents = df.addReserver("agents", agentTry, agentConfirm, pub)
	if err := df.kitchen.r.Add(f.ctx, "dish:pizza", "p1", "p2"); err != nil {
		t.Fatal(err)
	}
	if err := df.agents.r.Add(f.ctx, "agents", "a1", "a2"); err != nil {
		t.Fatal(err)
	}
	steps, err := deliveryReservations(df.agents.url).Steps()
	if err != nil {
		t.Fatal(err)
	}
	// What the customer sees: the order placed, or not.
	setStatus := func(status string) func(ctx context.Context, tx sqldb.Tx, id string) error {
		return func(ctx context.Context, tx sqldb.Tx, id string) error {
			_, err := tx.Exec(ctx, `INSERT INTO orders (id, status) VALUES ($1, $2)`, id, status)
			return err
		}
	}
	df.def = &saga.Definition[delivery]{Name: "delivery", Steps: steps,
		OnCompleted: func(ctx context.Context, tx sqldb.Tx, id string, d *delivery) error {
			return setStatus("placed")(ctx, tx, d.Order)
		},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, id string, d *delivery, reason string) error {
			return setStatus("not placed")(ctx, tx, d.Order)
		},
	}
	df.startOrders()
	return df, fb
}

func (df *deliveryFleet) relayTo(db *sqldb.DB, pub broker.Publisher) {
	r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond})
	if err != nil {
		df.t.Fatal(err)
	}
	df.background(func(ctx context.Context) { _ = r.Run(ctx) })
}

// startOrders starts the orchestrator. Its scheduler retries nothing by
// itself (Backoff 0, as the fake clock never moves alone): a participant
// that answers 503 says when to call again (Retry-After), and the test
// moves the clock there.
func (df *deliveryFleet) startOrders() {
	t, f := df.t, df.fleet
	var sched *timer.Scheduler
	sched, err := timer.New(f.db, timer.Config{Clock: f.clock, PollInterval: 20 * time.Millisecond, Backoff: func(int) time.Duration { return 0 },
		HTTPTimeout: 5 * time.Second, OnFired: func([]timer.Fired) { sched.Notify() }})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := inbox.New(f.db, inbox.Config{AfterCommit: func() { sched.Notify() }})
	if err != nil {
		t.Fatal(err)
	}
	o, err := saga.New(f.db, sched, ib, saga.Config{Source: "/services/orders", ReplyTopic: "orders.replies"})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Register(df.def); err != nil {
		t.Fatal(err)
	}
	df.background(func(ctx context.Context) { _ = sched.Run(ctx) })
	sub, err := f.broker.Subscribe(f.ctx, broker.SubscribeConfig{Topic: "orders.replies", Group: "orders"}, o.Handler("orders"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Stop(ended) })
	f.o, f.sched = o, sched
}

// order starts the delivery saga of order id (also the saga's id).
func (df *deliveryFleet) order(id, dish string) string {
	df.t.Helper()
	err := df.db.InTx(df.ctx, func(ctx context.Context, tx sqldb.Tx) error {
		return df.def.StartTx(ctx, tx, df.o, id, delivery{Order: id, Dish: dish})
	})
	if err != nil {
		df.t.Fatal(err)
	}
	df.sched.Notify()
	return id
}

// waitSaga waits until saga id reaches want.
func (df *deliveryFleet) waitSaga(id string, want saga.Status) saga.Info {
	df.t.Helper()
	var in saga.Info
	waitUntil(df.t, fmt.Sprintf("saga %s to be %s", id, want), func() bool {
		var err error
		if in, err = df.o.Get(df.ctx, id); err != nil {
			df.t.Fatal(err)
		}
		return in.Status == want
	}, func() string {
		return fmt.Sprintf("status %s (%s), history %q", in.Status, in.Reason, df.sagaHistory(id))
	})
	return in
}

// sagaHistory returns saga id's history as "step op attempt event" lines.
func (df *deliveryFleet) sagaHistory(id string) []string {
	df.t.Helper()
	hs, err := df.o.History(df.ctx, id)
	if err != nil {
		df.t.Fatal(err)
	}
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = fmt.Sprintf("%s %s %d %s", h.Step, h.Op, h.Attempt, h.Event)
	}
	return out
}

// waitSagaHistory waits until saga id's history has entry.
func (df *deliveryFleet) waitSagaHistory(id, entry string) {
	df.t.Helper()
	waitUntil(df.t, fmt.Sprintf("%q in the history of %s", entry, id), func() bool { return slices.Contains(df.sagaHistory(id), entry) },
		func() string { return fmt.Sprintf("history %q", df.sagaHistory(id)) })
}

// orderStatus returns what the customer sees of order id.
func (df *deliveryFleet) orderStatus(id string) string {
	df.t.Helper()
	var s string
	if err := df.db.QueryRow(df.ctx, `SELECT status FROM orders WHERE id = $1`, id).Scan(&s); err != nil {
		df.t.Fatalf("order %s: %v", id, err)
	}
	return s
}

// waitRetryDue waits until the HTTP call of side op of step of saga id has
// failed with a 503 and is due again within the 5 s its Retry-After said
// (a call under way is leased for 30 s): moving the clock 5 s then makes
// the call again.
func (df *deliveryFleet) waitRetryDue(id, step string, op saga.Op) {
	df.t.Helper()
	task := "saga-http/" + id + "/" + step + "/" + op.String()
	waitUntil(df.t, "a retry of "+task, func() bool {
		now := df.clock.Now().UTC()
		var n int
		err := df.db.QueryRow(df.ctx, `SELECT count(*) FROM troupe_timers WHERE id = $1 AND due_at > $2 AND due_at <= $3`,
			task, now, now.Add(5*time.Second)).Scan(&n)
		return err == nil && n == 1
	}, nil)
}

// waitUntil polls cond until it holds, failing the test after 20 s with
// what and, when set, detail's account.
func waitUntil(t *testing.T, what string, cond func() bool, detail func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			msg := "timed out waiting for " + what
			if detail != nil {
				msg += ": " + detail()
			}
			t.Fatal(msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// reserver is a participant service that holds resources with a
// Reserver, on its own database with its own timer scheduler (on the
// fleet's clock, for the expiries). It takes commands over the broker
// (subscribe) and over HTTP (url: /try and /confirm), through an
// interceptor tests can set.
type reserver struct {
	f    *fleet
	name string
	db   *sqldb.DB
	r    *reserve.Reserver
	p    *saga.Participant
	url  string
	// intercept, when set, handles each HTTP request instead of the
	// participant's handler, which it is given.
	intercept atomic.Pointer[func(w http.ResponseWriter, r *http.Request, next http.Handler)]
	// released ends the requests an interceptor holds when the test ends.
	released chan struct{}
	stop     func(ctx context.Context) // stops the current subscription

	mu    sync.Mutex
	calls []http.Header // of the HTTP requests received, with Path set
}

// addReserver adds a participant serving tryCommand and confirmCommand
// with reserve's saga glue; pub, when set, publishes its replies.
func (df *deliveryFleet) addReserver(name, tryCommand, confirmCommand string, pub broker.Publisher) *reserver {
	f, t := df.fleet, df.t
	t.Helper()
	s := &reserver{f: f, name: name, db: openDB(t, f.kind, name), released: make(chan struct{})}
	for _, m := range []func(context.Context, *sqldb.DB) error{inbox.Migrate, outbox.Migrate, saga.Migrate, timer.Migrate, reserve.Migrate} {
		if err := m(f.ctx, s.db); err != nil {
			t.Fatal(err)
		}
	}
	sched, err := timer.New(s.db, timer.Config{Clock: f.clock, PollInterval: 20 * time.Millisecond, Backoff: func(int) time.Duration { return 0 }})
	if err != nil {
		t.Fatal(err)
	}
	if s.r, err = reserve.New(s.db, sched, reserve.Config{}); err != nil {
		t.Fatal(err)
	}
	f.background(func(ctx context.Context) { _ = sched.Run(ctx) })
	ib, err := inbox.New(s.db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if s.p, err = saga.NewParticipant(ib, "/services/"+name); err != nil {
		t.Fatal(err)
	}
	if err := s.r.HandleSaga(s.p, tryCommand, confirmCommand); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/try", s.p.HTTPHandler(s.db, tryCommand))
	mux.Handle("/confirm", s.p.HTTPHandler(s.db, confirmCommand))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Clone()
		h.Set("Path", r.URL.Path)
		s.mu.Lock()
		s.calls = append(s.calls, h)
		s.mu.Unlock()
		if ic := s.intercept.Load(); ic != nil {
			(*ic)(w, r, mux)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(s.released) }) // before Close, which waits for held requests
	s.url = srv.URL
	if pub != nil {
		df.relayTo(s.db, pub)
	}
	return s
}

// setIntercept routes the HTTP requests through ic.
func (s *reserver) setIntercept(ic func(w http.ResponseWriter, r *http.Request, next http.Handler)) {
	s.intercept.Store(&ic)
}

// holdTries holds every Try until the returned function is called.
func (s *reserver) holdTries() (release func()) {
	gate := make(chan struct{})
	s.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if r.URL.Path == "/try" && r.Header.Get(saga.HeaderOp) == "action" {
			select {
			case <-gate:
			case <-s.released:
				return
			}
		}
		next.ServeHTTP(w, r)
	})
	return func() { close(gate) }
}

// httpCalls returns the headers of the HTTP requests received on path
// for side op.
func (s *reserver) httpCalls(path string, op saga.Op) []http.Header {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []http.Header
	for _, h := range s.calls {
		if h.Get("Path") == path && h.Get(saga.HeaderOp) == op.String() {
			out = append(out, h)
		}
	}
	return out
}

// subscribe starts taking commands from the broker.
func (s *reserver) subscribe() {
	s.f.t.Helper()
	sub, err := s.f.broker.Subscribe(s.f.ctx, broker.SubscribeConfig{Topic: s.name + ".commands", Group: s.name}, s.p.Handler(s.name))
	if err != nil {
		s.f.t.Fatal(err)
	}
	var once sync.Once
	stop := func(ctx context.Context) { once.Do(func() { _ = sub.Stop(ctx) }) }
	s.stop = stop
	s.f.t.Cleanup(func() { stop(ended) })
}

// down stops taking commands, as a service that went down: the pull under
// way ends first, so that no command sent from now on is caught by it and
// held back from the next subscription.
func (s *reserver) down() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.stop(ctx)
}

// reservation returns what s recorded of reservation res of saga id.
func (s *reserver) reservation(id, res string) reserve.Reservation {
	s.f.t.Helper()
	r, err := s.r.Get(s.f.ctx, reserve.SagaReservationID(id, "delivery."+res))
	if err != nil {
		s.f.t.Fatal(err)
	}
	return r
}

// waitReservation waits until s's reservation res of saga id is in state.
func (s *reserver) waitReservation(id, res string, state reserve.State) reserve.Reservation {
	s.f.t.Helper()
	var r reserve.Reservation
	waitUntil(s.f.t, fmt.Sprintf("%s's reservation %s of %s to be %s", s.name, res, id, state),
		func() bool { r = s.reservation(id, res); return r.State == state }, func() string { return fmt.Sprintf("%+v", r) })
	return r
}

// pool returns pool's resources as "id state owner".
func (s *reserver) pool(pool string) []string {
	s.f.t.Helper()
	rs, err := s.r.Resources(s.f.ctx, pool)
	if err != nil {
		s.f.t.Fatal(err)
	}
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = strings.TrimSpace(fmt.Sprintf("%s %s %s", r.ID, r.State, r.Owner))
	}
	return out
}

// wantPool fails the test unless pool's resources are want.
func (s *reserver) wantPool(pool string, want ...string) {
	s.f.t.Helper()
	if got := s.pool(pool); !slices.Equal(got, want) {
		s.f.t.Fatalf("%s's pool %s: %q, want %q", s.name, pool, got, want)
	}
}

// wantNothingHeld fails the test if s has a reservation held or confirmed.
func (s *reserver) wantNothingHeld() {
	s.f.t.Helper()
	for _, st := range []reserve.State{reserve.Held, reserve.Confirmed} {
		rs, err := s.r.List(s.f.ctx, reserve.Filter{State: st})
		if err != nil {
			s.f.t.Fatal(err)
		}
		if len(rs) != 0 {
			s.f.t.Fatalf("%s has reservations %s: %+v", s.name, st, rs)
		}
	}
}

func TestReservations_AnOrderIsPlacedWithEveryResourceAssigned(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			df.kitchen.subscribe()
			id := df.order("o1", "pizza")
			in := df.waitSaga(id, saga.Completed)
			if s := df.orderStatus("o1"); s != "placed" {
				t.Fatalf("order o1 is %q, want placed", s)
			}
			df.kitchen.wantPool("dish:pizza", "p1 assigned o1", "p2 free")
			df.agents.wantPool("agents", "a1 assigned o1", "a2 free")
			// The expiry reached the participant as a duration, counted
			// from its Try.
			for _, c := range []struct {
				s   *reserver
				res string
			}{{df.kitchen, "packet"}, {df.agents, "agent"}} {
				r := c.s.reservation(id, c.res)
				if r.State != reserve.Confirmed || r.Owner != "o1" || !r.ExpiresAt.Equal(df.started.Add(2*time.Minute)) {
					t.Fatalf("%s's reservation %+v: want confirmed for o1, expiring 2 min after its Try", c.s.name, r)
				}
			}
			if d := decodeDelivery(t, in); !maps.EqualFunc(d.Reserved, map[string][]string{"packet": {"p1"}, "agent": {"a1"}}, slices.Equal) {
				t.Fatalf("reserved %v: want each Try's reply read once", d.Reserved)
			}
			h := df.sagaHistory(id)
			for _, try := range []string{"delivery.try.packet", "delivery.try.agent"} {
				for _, confirm := range []string{"delivery.confirm.packet", "delivery.confirm.agent"} {
					if !before(h, try+" action 1 done", confirm+" action 1 sent") {
						t.Fatalf("history %q: want every Try done before any Confirm is sent", h)
					}
				}
			}
		})
	}
}

func decodeDelivery(t *testing.T, in saga.Info) delivery {
	t.Helper()
	var d delivery
	if err := json.Unmarshal(in.Data, &d); err != nil {
		t.Fatal(err)
	}
	return d
}

// The soup is sold out: the kitchen refuses its Try, after the agent was
// held. The agent is released; nothing is confirmed.
func TestReservations_ARefusedTryCancelsTheOtherHoldsAndTheOrderIsNotPlaced(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			id := df.order("o2", "soup")
			df.waitSagaHistory(id, "delivery.try.agent action 1 done")
			df.agents.wantPool("agents", "a1 held o2", "a2 free")
			df.kitchen.subscribe()
			in := df.waitSaga(id, saga.Compensated)
			if !strings.Contains(in.Reason, "no free resource") {
				t.Fatalf("reason %q: want the kitchen's refusal", in.Reason)
			}
			if s := df.orderStatus("o2"); s != "not placed" {
				t.Fatalf("order o2 is %q, want not placed", s)
			}
			df.agents.wantPool("agents", "a1 free", "a2 free")
			if r := df.agents.reservation(id, "agent"); r.State != reserve.Cancelled {
				t.Fatalf("the agent's reservation is %s, want cancelled", r.State)
			}
			if r := df.kitchen.reservation(id, "packet"); r.State != reserve.Refused {
				t.Fatalf("the packet's reservation is %s, want refused", r.State)
			}
			df.agents.wantNothingHeld()
			df.kitchen.wantNothingHeld()
			if n := len(df.agents.httpCalls("/try", saga.Compensation)); n != 1 {
				t.Fatalf("the agent's Try cancelled by %d calls, want 1", n)
			}
			if n := len(df.agents.httpCalls("/confirm", saga.Action)); n != 0 || slices.Contains(df.sagaHistory(id), "delivery.confirm.packet action 1 sent") {
				t.Fatalf("a Confirm was sent (%d calls to the agents): want none after a refusal", n)
			}
		})
	}
}

// The kitchen goes down once it has held the packet: its Confirm is sent
// again at each deadline, and handled when the kitchen is back, well
// within the expiry. The order is placed; the resent Confirms assign once.
func TestReservations_AConfirmResentWhileItsParticipantIsDownPlacesTheOrder(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			release := df.agents.holdTries() // phase 1 ends when the test says
			df.kitchen.subscribe()
			id := df.order("o3", "pizza")
			df.waitSagaHistory(id, "delivery.try.packet action 1 done")
			df.kitchen.down()
			release()
			df.waitSagaHistory(id, "delivery.confirm.packet action 1 sent")
			for attempt := 2; attempt <= 3; attempt++ {
				df.clock.Advance(10 * time.Second)
				df.waitSagaHistory(id, fmt.Sprintf("delivery.confirm.packet action %d sent", attempt))
			}
			df.kitchen.subscribe() // three Confirms await it
			df.waitSaga(id, saga.Completed)
			if s := df.orderStatus("o3"); s != "placed" {
				t.Fatalf("order o3 is %q, want placed", s)
			}
			df.kitchen.wantPool("dish:pizza", "p1 assigned o3", "p2 free")
			df.agents.wantPool("agents", "a1 assigned o3", "a2 free")
			for _, e := range df.sagaHistory(id) {
				if strings.Contains(e, "compensation") {
					t.Fatalf("history %q: want no compensation", df.sagaHistory(id))
				}
			}
		})
	}
}

// The agents answer 503 to the first two Confirm calls: the call is made
// again after each Retry-After, with the same key, and the order is
// placed.
func TestReservations_AConfirmRetriedAfter503sPlacesTheOrder(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			var confirms atomic.Int32
			df.agents.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.URL.Path == "/confirm" && confirms.Add(1) <= 2 {
					retryLater(w, "5")
					return
				}
				next.ServeHTTP(w, r)
			})
			df.kitchen.subscribe()
			id := df.order("o4", "pizza")
			for range 2 {
				df.waitRetryDue(id, "delivery.confirm.agent", saga.Action)
				df.clock.Advance(5 * time.Second)
			}
			df.waitSaga(id, saga.Completed)
			if s := df.orderStatus("o4"); s != "placed" {
				t.Fatalf("order o4 is %q, want placed", s)
			}
			df.agents.wantPool("agents", "a1 assigned o4", "a2 free")
			calls := df.agents.httpCalls("/confirm", saga.Action)
			if len(calls) != 3 {
				t.Fatalf("%d Confirm calls, want 3", len(calls))
			}
			for _, c := range calls[1:] {
				if k := c.Get(timer.IdempotencyKeyHeader); k == "" || k != calls[0].Get(timer.IdempotencyKeyHeader) {
					t.Fatalf("Confirm calls with keys %q and %q: want one key", calls[0].Get(timer.IdempotencyKeyHeader), k)
				}
			}
		})
	}
}

// The kitchen goes down once it has held the packet and stays down past
// the expiry. The saga resends the Confirm while the expiry leaves time
// (7 sends of 10 s), then gives up: it un-assigns the agent, and the
// kitchen's hold expires on its own. When the kitchen comes back, its late
// Confirms are refused and its Cancels find nothing to release.
func TestReservations_AParticipantDownPastTheExpiryLeavesNothingHeld(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			release := df.agents.holdTries()
			df.kitchen.subscribe()
			id := df.order("o5", "pizza")
			df.waitSagaHistory(id, "delivery.try.packet action 1 done")
			df.kitchen.down()
			release()
			df.waitSagaHistory(id, "delivery.confirm.agent action 1 done")
			df.agents.wantPool("agents", "a1 assigned o5", "a2 free")
			for attempt := 2; attempt <= 7; attempt++ {
				df.clock.Advance(10 * time.Second)
				df.waitSagaHistory(id, fmt.Sprintf("delivery.confirm.packet action %d sent", attempt))
			}
			df.clock.Advance(10 * time.Second) // the last deadline, 70 s in: 50 s before the expiry
			df.waitSagaHistory(id, "delivery.confirm.agent compensation 1 done")
			df.agents.wantPool("agents", "a1 free", "a2 free")
			if s := df.kitchen.reservation(id, "packet").State; s != reserve.Held {
				t.Fatalf("the packet's reservation is %s before its expiry, want held", s)
			}
			df.clock.Advance(55 * time.Second) // past the expiry, 2 min in
			df.kitchen.waitReservation(id, "packet", reserve.Expired)
			df.kitchen.subscribe()
			in := df.waitSaga(id, saga.Compensated)
			if !strings.Contains(in.Reason, "delivery.confirm.packet") {
				t.Fatalf("reason %q: want the Confirm that failed named", in.Reason)
			}
			if s := df.orderStatus("o5"); s != "not placed" {
				t.Fatalf("order o5 is %q, want not placed", s)
			}
			df.kitchen.wantPool("dish:pizza", "p1 free", "p2 free")
			df.agents.wantPool("agents", "a1 free", "a2 free")
			if r := df.agents.reservation(id, "agent"); r.State != reserve.Cancelled {
				t.Fatalf("the agent's reservation is %s, want cancelled (un-assigned)", r.State)
			}
			if r := df.kitchen.reservation(id, "packet"); r.State != reserve.Expired {
				t.Fatalf("the packet's reservation is %s, want expired", r.State)
			}
			df.kitchen.wantNothingHeld()
			df.agents.wantNothingHeld()
		})
	}
}

// The agents answer 503 to every Confirm and Cancel until past the expiry.
// The saga gives up confirming when the expiry, less the margin, leaves no
// time: it un-assigns the packet, and the agent's hold expires on its own.
// When the agents are back, the Cancels find nothing to release.
func TestReservations_AParticipantAnswering503PastTheExpiryLeavesNothingHeld(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, _ := newDeliveryFleet(t, kind, false)
			var down atomic.Bool
			down.Store(true)
			df.agents.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if down.Load() && r.URL.Path == "/confirm" {
					retryLater(w, "5")
					return
				}
				next.ServeHTTP(w, r)
			})
			df.kitchen.subscribe()
			id := df.order("o6", "pizza")
			df.waitSagaHistory(id, "delivery.confirm.packet action 1 done")
			df.kitchen.wantPool("dish:pizza", "p1 assigned o6", "p2 free")
			df.waitRetryDue(id, "delivery.confirm.agent", saga.Action)
			df.clock.Advance(80 * time.Second) // past the Confirm's 78 s
			df.waitSagaHistory(id, "delivery.confirm.packet compensation 1 done")
			df.kitchen.wantPool("dish:pizza", "p1 free", "p2 free")
			df.waitRetryDue(id, "delivery.confirm.agent", saga.Compensation)
			df.clock.Advance(45 * time.Second) // past the expiry, 2 min in
			df.agents.waitReservation(id, "agent", reserve.Expired)
			df.agents.wantPool("agents", "a1 free", "a2 free")
			df.waitRetryDue(id, "delivery.confirm.agent", saga.Compensation)
			down.Store(false)
			df.clock.Advance(5 * time.Second)
			in := df.waitSaga(id, saga.Compensated)
			if !strings.Contains(in.Reason, "delivery.confirm.agent") {
				t.Fatalf("reason %q: want the Confirm that failed named", in.Reason)
			}
			if s := df.orderStatus("o6"); s != "not placed" {
				t.Fatalf("order o6 is %q, want not placed", s)
			}
			if r := df.kitchen.reservation(id, "packet"); r.State != reserve.Cancelled {
				t.Fatalf("the packet's reservation is %s, want cancelled (un-assigned)", r.State)
			}
			if r := df.agents.reservation(id, "agent"); r.State != reserve.Expired {
				t.Fatalf("the agent's reservation is %s, want expired", r.State)
			}
			df.kitchen.wantPool("dish:pizza", "p1 free", "p2 free")
			df.agents.wantPool("agents", "a1 free", "a2 free")
			df.kitchen.wantNothingHeld()
			df.agents.wantNothingHeld()
		})
	}
}

// twice serves each request twice, as a call made again with the same
// key after its response was lost, and fails the test unless the second
// answer is the first.
func twice(t *testing.T) func(w http.ResponseWriter, r *http.Request, next http.Handler) {
	return func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		body, _ := io.ReadAll(r.Body)
		var answers [2]*httptest.ResponseRecorder
		for i := range answers {
			req := r.Clone(r.Context())
			req.Body = io.NopCloser(bytes.NewReader(body))
			answers[i] = httptest.NewRecorder()
			next.ServeHTTP(answers[i], req)
		}
		first, again := answers[0], answers[1]
		if again.Code != first.Code || again.Body.String() != first.Body.String() {
			t.Errorf("%s %s of %s made again: %d %q, the first time %d %q", r.URL.Path, r.Header.Get(saga.HeaderOp), r.Header.Get(saga.HeaderSagaID),
				again.Code, again.Body, first.Code, first.Body)
		}
		maps.Copy(w.Header(), again.Header())
		w.WriteHeader(again.Code)
		_, _ = w.Write(again.Body.Bytes())
	}
}

// Every command and reply is published twice, every HTTP call served
// twice, and the kitchen's Try is resent (a new message) before the
// kitchen handles any: each Try, Confirm and Cancel still has one effect.
func TestReservations_DuplicatedTriesConfirmsAndCancelsHaveOneEffect(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			df, fb := newDeliveryFleet(t, kind, true)
			df.agents.setIntercept(twice(t))
			placed := df.order("o7", "pizza")
			df.waitSagaHistory(placed, "delivery.try.agent action 1 done")
			df.clock.Advance(10 * time.Second)
			df.waitSagaHistory(placed, "delivery.try.packet action 2 sent")
			df.kitchen.subscribe()
			in := df.waitSaga(placed, saga.Completed)
			soldOut := df.order("o8", "soup")
			df.waitSaga(soldOut, saga.Compensated)

			if d := decodeDelivery(t, in); !maps.EqualFunc(d.Reserved, map[string][]string{"packet": {"p1"}, "agent": {"a1"}}, slices.Equal) {
				t.Fatalf("reserved %v: want each Try's reply read once", d.Reserved)
			}
			if s1, s2 := df.orderStatus("o7"), df.orderStatus("o8"); s1 != "placed" || s2 != "not placed" {
				t.Fatalf("orders o7 %q, o8 %q: want placed and not placed", s1, s2)
			}
			df.kitchen.wantPool("dish:pizza", "p1 assigned o7", "p2 free")
			df.agents.wantPool("agents", "a1 assigned o7", "a2 free")
			for _, c := range []struct {
				s    *reserver
				want []string
			}{
				{df.kitchen, []string{"o7/delivery.packet p1 confirmed", "o8/delivery.packet  refused"}},
				{df.agents, []string{"o7/delivery.agent a1 confirmed", "o8/delivery.agent a2 cancelled"}},
			} {
				rs, err := c.s.r.List(df.ctx, reserve.Filter{})
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, r := range rs {
					got = append(got, fmt.Sprintf("%s %s %s", r.ID, r.Resource, r.State))
				}
				if !slices.Equal(got, c.want) {
					t.Fatalf("%s's reservations %q, want %q", c.s.name, got, c.want)
				}
			}
			if st := fb.Stats(); st.Duplicated == 0 {
				t.Fatalf("stats %+v: no message was duplicated", st)
			}
			if n := len(df.agents.httpCalls("/try", saga.Compensation)); n != 1 {
				t.Fatalf("the agents got %d calls to cancel o8's Try, want 1 (served twice)", n)
			}
		})
	}
}

// A participant in any language sees the reservation protocol over HTTP;
// reserve's glue answers it: a repeated Try with its first answer, a
// refusal with 409, a Cancel before its Try with 200 and the late Try with
// 409.
func TestReserveHandleSaga_AnswersReservationCallsOverHTTP(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			f := newFleet(t, kind, false)
			df := &deliveryFleet{fleet: f}
			agents := df.addReserver("agents", agentTry, agentConfirm, nil)
			if err := agents.r.Add(f.ctx, "agents", "a1"); err != nil {
				t.Fatal(err)
			}
			call := func(path, sagaID, op, body string) (int, string) {
				t.Helper()
				req, err := http.NewRequest(http.MethodPost, agents.url+path, strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				req.Header.Set(saga.HeaderSagaID, sagaID)
				req.Header.Set(saga.HeaderStep, "delivery."+strings.TrimPrefix(path, "/")+".agent")
				req.Header.Set(saga.HeaderOp, op)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, strings.TrimSpace(string(b))
			}
			const agent = `{"reservation":"delivery.agent","expiry_ms":60000,"input":{"pool":"agents"}}`
			held := `{"reservation":"s1/delivery.agent","pool":"agents","resource":"a1","owner":"s1","state":"held","expires_at":"2030-01-01T00:01:00Z"}`
			confirmed := strings.Replace(held, "held", "confirmed", 1)
			for _, c := range []struct {
				name, path, saga, op, body string
				code                       int
				want                       string // the body, or a part of it for a refusal
			}{
				{"a Try holds for the expiry, owned by the saga", "/try", "s1", "action", agent, 200, held},
				{"the Try again: its first answer", "/try", "s1", "action", agent, 200, held},
				{"a Try of a taken pool: refused", "/try", "s2", "action", agent, 409, "no free resource"},
				{"a Cancel before its Try", "/try", "s3", "compensation", agent, 200, ""},
				{"the late Try: refused", "/try", "s3", "action", agent, 409, "refused"},
				{"a Try with no expiry: refused", "/try", "s4", "action", `{"reservation":"delivery.agent"}`, 409, "positive expiry_ms"},
				{"the Confirm", "/confirm", "s1", "action", agent, 200, confirmed},
				{"the Confirm's Cancel un-assigns", "/confirm", "s1", "compensation", agent, 200, ""},
			} {
				code, body := call(c.path, c.saga, c.op, c.body)
				if code != c.code || (code == 200 && body != c.want) || (code != 200 && !strings.Contains(body, c.want)) {
					t.Errorf("%s: %d %s, want %d %s", c.name, code, body, c.code, c.want)
				}
			}
			agents.wantPool("agents", "a1 free")
		})
	}
}

func TestReservationsSteps_RefusesWhatCannotRunAndSaysWhichNumbersConflict(t *testing.T) {
	packet := saga.Reserve[delivery]{Name: "packet", Topic: "kitchen.commands", TryCommand: packetTry, ConfirmCommand: packetConfirm,
		Deadline: 10 * time.Second, MaxAttempts: 3}
	agent := saga.Reserve[delivery]{Name: "agent", TryURL: "http://agents/try", ConfirmURL: "http://agents/confirm", Deadline: 20 * time.Second}
	with := func(r saga.Reserve[delivery], edit func(r *saga.Reserve[delivery])) saga.Reserve[delivery] {
		edit(&r)
		return r
	}
	for _, c := range []struct {
		name string
		rs   saga.Reservations[delivery]
		want []string // parts of the error
	}{
		{"an expiry too short for the slowest Try and a Confirm",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Minute, Resources: []saga.Reserve[delivery]{packet, with(agent, func(r *saga.Reserve[delivery]) { r.Deadline = 40 * time.Second })}},
			[]string{
				`resource "packet": Expiry 1m0s < 40s (phase 1: the Try of "agent", Deadline 40s, over HTTP) + 30s (the Confirm of "packet", Deadline 10s × MaxAttempts 3) + 6s (Margin) = 1m16s`,
				`resource "agent": Expiry 1m0s < 40s (phase 1: the Try of "agent", Deadline 40s, over HTTP) + 40s (the Confirm of "agent", Deadline 40s, over HTTP) + 6s (Margin) = 1m26s`,
			}},
		{"the default deadlines count",
			saga.Reservations[delivery]{Name: "d", Expiry: 2 * time.Minute, Resources: []saga.Reserve[delivery]{with(packet, func(r *saga.Reserve[delivery]) { r.Deadline, r.MaxAttempts = 0, 0 })}},
			[]string{`Expiry 2m0s < 1m30s (phase 1: the Try of "packet", Deadline 30s × MaxAttempts 3) + 1m30s`}},
		{"a margin that leaves no time",
			saga.Reservations[delivery]{Name: "d", Expiry: 2 * time.Minute, Margin: 70 * time.Second, Resources: []saga.Reserve[delivery]{packet}},
			[]string{`+ 1m10s (Margin) = 2m10s`}},
		{"a margin as long as the expiry",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Minute, Margin: time.Minute, Resources: []saga.Reserve[delivery]{packet}},
			[]string{"Margin of at least 0 and less than Expiry 1m0s, have 1m0s"}},
		{"a negative margin",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Hour, Margin: -time.Second, Resources: []saga.Reserve[delivery]{packet}},
			[]string{"Margin of at least 0 and less than Expiry 1h0m0s, have -1s"}},
		{"one millisecond short",
			saga.Reservations[delivery]{Name: "d", Expiry: 66*time.Second - time.Millisecond, Margin: 6 * time.Second, Resources: []saga.Reserve[delivery]{packet}},
			[]string{`+ 6s (Margin) = 1m6s`}},
		{"no name, no expiry, no resources",
			saga.Reservations[delivery]{},
			[]string{"empty Name", "want a positive Expiry, have 0s", "no Resources"}},
		{"resources without names or twice",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Hour, Resources: []saga.Reserve[delivery]{packet, packet, with(agent, func(r *saga.Reserve[delivery]) { r.Name = "" })}},
			[]string{`resource "packet" appears twice`, "resource 2 has no Name"}},
		{"a resource reached both ways, or neither, or half",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Hour, Resources: []saga.Reserve[delivery]{
				with(packet, func(r *saga.Reserve[delivery]) { r.TryURL = "http://kitchen/try" }),
				{Name: "nowhere"},
				with(packet, func(r *saga.Reserve[delivery]) { r.Name, r.ConfirmCommand = "half", "" }),
				with(agent, func(r *saga.Reserve[delivery]) { r.Name, r.ConfirmURL = "halfweb", "" }),
			}},
			[]string{`resource "packet" is reached both over the broker and over HTTP`, `resource "nowhere" has neither`,
				`resource "half" needs Topic, TryCommand and ConfirmCommand`, `resource "halfweb" needs both TryURL and ConfirmURL`}},
		{"phases a participant cannot tell apart, a bad URL, a negative deadline",
			saga.Reservations[delivery]{Name: "d", Expiry: time.Hour, Resources: []saga.Reserve[delivery]{
				with(packet, func(r *saga.Reserve[delivery]) { r.ConfirmCommand = packetTry }),
				with(agent, func(r *saga.Reserve[delivery]) { r.ConfirmURL = "/confirm" }),
				with(agent, func(r *saga.Reserve[delivery]) {
					r.Name, r.TryURL, r.Deadline = "same", "http://agents/confirm", -time.Second
				}),
			}},
			[]string{`resource "packet" has TryCommand and ConfirmCommand both "delivery.packet.try"`, `resource "agent": URL "/confirm"`,
				`resource "same" has TryURL and ConfirmURL both`, `resource "same": negative Deadline -1s`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			steps, err := c.rs.Steps()
			if !errors.Is(err, saga.ErrInvalidDefinition) || steps != nil {
				t.Fatalf("Steps: %d steps, %v; want ErrInvalidDefinition", len(steps), err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nlacks %q", err, w)
				}
			}
		})
	}
}

// An expiry exactly as long as the budgets and the margin is enough.
func TestReservationsSteps_AcceptsAnExpiryThatExactlyCoversTheBudgets(t *testing.T) {
	packet := saga.Reserve[delivery]{Name: "packet", Topic: "kitchen.commands", TryCommand: packetTry, ConfirmCommand: packetConfirm,
		Deadline: 10 * time.Second, MaxAttempts: 3}
	steps, err := saga.Reservations[delivery]{Name: "d", Expiry: 66 * time.Second, Margin: 6 * time.Second, Resources: []saga.Reserve[delivery]{packet}}.Steps()
	if err != nil || len(steps) != 2 {
		t.Fatalf("Expiry 1m6s = 30s + 30s + 6s: %d steps, %v; want the two phases", len(steps), err)
	}
}

// The steps Reservations makes: two groups, each resource's Confirm with
// what the expiry leaves; the commands carry the reservation, the expiry
// and the input; with one resource, no groups.
func TestReservationsSteps_ConfirmsGetWhatTheExpiryLeaves(t *testing.T) {
	rs := deliveryReservations("http://agents")
	steps, err := rs.Steps()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range steps {
		got = append(got, s.Name)
		for _, b := range s.Parallel {
			got = append(got, fmt.Sprintf("  %s %s%s %v×%d", b.Name, b.Command, b.URL, b.Deadline, b.MaxAttempts))
		}
	}
	want := []string{
		"delivery.try",
		"  delivery.try.packet delivery.packet.try 10s×3",
		"  delivery.try.agent http://agents/try 20s×3",
		"delivery.confirm",
		"  delivery.confirm.packet delivery.packet.confirm 10s×7", // (120 s - 12 s - 30 s) / 10 s
		"  delivery.confirm.agent http://agents/confirm 1m18s×9",  // 78 s, 3 calls per 20 s
	}
	if !slices.Equal(got, want) {
		t.Fatalf("steps\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for i, s := range []saga.Step[delivery]{steps[0].Parallel[0], steps[1].Parallel[0]} {
		body, err := json.Marshal(s.Input(&delivery{Order: "o1", Dish: "pizza"}))
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"reservation":"delivery.packet","expiry_ms":120000,"input":{"pool":"dish:pizza","owner":"o1"}}`; string(body) != want {
			t.Fatalf("phase %d's command %s, want %s", i+1, body, want)
		}
	}

	rs.Resources = rs.Resources[:1]
	steps, err = rs.Steps()
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2 || steps[0].Name != "delivery.try.packet" || steps[1].Name != "delivery.confirm.packet" || steps[0].Parallel != nil ||
		steps[1].MaxAttempts != 7 {
		t.Fatalf("one resource: steps %+v, want its Try step then its Confirm step", steps)
	}
}
