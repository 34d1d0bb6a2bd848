package saga_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
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

// tripData is the data of the sagas fleet tests run.
type tripData struct {
	ID     string `json:"id"`
	Credit int    `json:"credit"`
	Stock  int    `json:"stock"`
	Fraud  bool   `json:"fraud"`
	// Held adds up, by step, the amounts the participants' replies say
	// they held (OnReply): a reply applied twice shows twice.
	Held map[string]int `json:"held"`
}

// fleet is an orchestrating service (Order, with its database, timer
// scheduler and orchestrator, which can be stopped and started anew) and
// participant services (holders, each with its own database), connected
// over an embedded NATS JetStream (when the test needs one) and HTTP.
type fleet struct {
	t      *testing.T
	kind   string
	ctx    context.Context
	broker *natsjs.Broker
	clock  *clocktest.Clock
	db     *sqldb.DB
	def    *saga.Definition[tripData]
	o      *saga.Orchestrator
	sched  *timer.Scheduler
	// stopOwner stops the orchestrator's scheduler and reply subscription.
	stopOwner func()
	holders   map[string]*holder
}

func newFleet(t *testing.T, kind string, withBroker bool) *fleet {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f := &fleet{t: t, kind: kind, ctx: ctx, clock: clocktest.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)), holders: map[string]*holder{}}
	if withBroker {
		b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		f.broker = b
	}
	f.db = openDB(t, kind, "order")
	for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, f.db); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.db.Exec(ctx, `CREATE TABLE trip_log (trip TEXT NOT NULL, seq INTEGER NOT NULL, entry TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	if withBroker {
		f.relay(f.db)
	}
	return f
}

func openDB(t *testing.T, kind, name string) *sqldb.DB {
	t.Helper()
	url := "sqlite://" + filepath.Join(t.TempDir(), name+".db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// background runs fn until the test ends.
func (f *fleet) background(fn func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(f.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { fn(ctx) })
	f.t.Cleanup(func() { cancel(); wg.Wait() })
}

func (f *fleet) relay(db *sqldb.DB) {
	r, err := outbox.NewRelay(db, f.broker, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond})
	if err != nil {
		f.t.Fatal(err)
	}
	f.background(func(ctx context.Context) { _ = r.Run(ctx) })
}

// logStep is a local step (or branch) that writes entry to the trip's log,
// and unentry when undone.
func logStep(name, entry, unentry string) saga.Step[tripData] {
	write := func(e string) func(ctx context.Context, tx sqldb.Tx, id string, d *tripData) error {
		return func(ctx context.Context, tx sqldb.Tx, id string, d *tripData) error {
			_, err := tx.Exec(ctx, `INSERT INTO trip_log (trip, seq, entry) VALUES ($1, (SELECT count(*) FROM trip_log WHERE trip = $1), $2)`, d.ID, e)
			return err
		}
	}
	s := saga.Step[tripData]{Name: name, Local: write(entry)}
	if unentry != "" {
		s.UndoLocal = write(unentry)
	}
	return s
}

// confirmStep logs "confirmed" and refuses a fraudulent trip.
func confirmStep() saga.Step[tripData] {
	s := logStep("confirm", "confirmed", "")
	log := s.Local
	s.Local = func(ctx context.Context, tx sqldb.Tx, id string, d *tripData) error {
		if err := log(ctx, tx, id, d); err != nil {
			return err
		}
		if d.Fraud {
			return saga.Refuse(errors.New("fraud suspected"))
		}
		return nil
	}
	return s
}

// amountOf returns the trip's amount for holder name.
func amountOf(name string) func(d *tripData) any {
	return func(d *tripData) any {
		if name == "credit" {
			return holdInput{Amount: d.Credit}
		}
		return holdInput{Amount: d.Stock}
	}
}

// addHeld is an OnReply that adds the held amount the reply carries.
func addHeld(name string) func(d *tripData, r *saga.ReplyMsg) error {
	return func(d *tripData, r *saga.ReplyMsg) error {
		var out struct {
			Held int `json:"held"`
		}
		if err := json.Unmarshal(r.Msg.Data, &out); err != nil {
			return fmt.Errorf("reply of %s: %w", name, err)
		}
		if d.Held == nil {
			d.Held = map[string]int{}
		}
		d.Held[name] += out.Held
		return nil
	}
}

// commandStep is a step (or branch) that asks holder name over the broker.
func commandStep(name string) saga.Step[tripData] {
	return saga.Step[tripData]{Name: name, Topic: name + ".commands", Command: "shop." + name + ".hold",
		Input: amountOf(name), OnReply: addHeld(name), Deadline: time.Minute, MaxAttempts: 2}
}

// httpStep is a step (or branch) that calls holder h over HTTP.
func httpStep(h *holder) saga.Step[tripData] {
	return saga.Step[tripData]{Name: h.name, URL: h.url(), Input: amountOf(h.name), OnReply: addHeld(h.name), Deadline: time.Minute, MaxAttempts: 3}
}

// start registers a definition of steps and starts the orchestrator.
func (f *fleet) start(steps ...saga.Step[tripData]) {
	f.t.Helper()
	f.def = &saga.Definition[tripData]{Name: "trip", Steps: steps}
	f.startOwner()
}

// startOwner starts an orchestrator, with its own scheduler and inbox, on
// the Order database: the first, or a new one after stopOwner (a restart).
func (f *fleet) startOwner() {
	f.t.Helper()
	// HTTP steps' calls are made by the scheduler: wake it after every
	// commit that may have stored one (the fake clock never ends its
	// waits by itself).
	var sched *timer.Scheduler
	sched, err := timer.New(f.db, timer.Config{Clock: f.clock, PollInterval: 20 * time.Millisecond, Backoff: func(int) time.Duration { return 0 },
		HTTPTimeout: 5 * time.Second, OnFired: func([]timer.Fired) { sched.Notify() }})
	if err != nil {
		f.t.Fatal(err)
	}
	ib, err := inbox.New(f.db, inbox.Config{AfterCommit: func() { sched.Notify() }})
	if err != nil {
		f.t.Fatal(err)
	}
	o, err := saga.New(f.db, sched, ib, saga.Config{Source: "/services/order", ReplyTopic: "orders.replies"})
	if err != nil {
		f.t.Fatal(err)
	}
	if err := o.Register(f.def); err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(f.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = sched.Run(ctx) })
	var sub broker.Subscription
	if f.broker != nil {
		if sub, err = f.broker.Subscribe(ctx, broker.SubscribeConfig{Topic: "orders.replies", Group: "order"}, o.Handler("order")); err != nil {
			f.t.Fatal(err)
		}
	}
	var once sync.Once
	stop := func(ctx context.Context) {
		once.Do(func() {
			if sub != nil {
				_ = sub.Stop(ctx)
			}
			cancel()
			wg.Wait()
		})
	}
	f.o, f.sched, f.stopOwner = o, sched, func() { stop(context.Background()) }
	f.t.Cleanup(func() { stop(ended) })
}

// ended is an ended context: Stop(ended) ends a subscription at once,
// without waiting for its pull request in flight (up to a second), which
// is what a test's cleanup wants. The broker's Close waits for the rest.
var ended = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// begin starts trip d's saga, with id "trip-" + d.ID.
func (f *fleet) begin(d tripData) {
	f.t.Helper()
	err := f.db.InTx(f.ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.def.StartTx(ctx, tx, f.o, "trip-"+d.ID, d) })
	if err != nil {
		f.t.Fatal(err)
	}
	f.sched.Notify()
}

// waitStatus waits until trip id's saga reaches want.
func (f *fleet) waitStatus(id string, want saga.Status) saga.Info {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := f.o.Get(f.ctx, "trip-"+id)
		if err != nil {
			f.t.Fatal(err)
		}
		if in.Status == want {
			return in
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("trip %s: status %s (%s), want %s; history %q", id, in.Status, in.Reason, want, f.history(id))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitHistory waits until trip id's history has entry ("step op attempt
// event").
func (f *fleet) waitHistory(id, entry string) {
	f.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !slices.Contains(f.history(id), entry) {
		if time.Now().After(deadline) {
			f.t.Fatalf("history of %s never had %q: %q", id, entry, f.history(id))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// history returns trip id's history as "step op attempt event" lines.
func (f *fleet) history(id string) []string {
	f.t.Helper()
	hs, err := f.o.History(f.ctx, "trip-"+id)
	if err != nil {
		f.t.Fatal(err)
	}
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = fmt.Sprintf("%s %s %d %s", h.Step, h.Op, h.Attempt, h.Event)
	}
	return out
}

// tripLog returns trip id's log entries in order.
func (f *fleet) tripLog(id string) []string {
	f.t.Helper()
	rows, err := f.db.Query(f.ctx, `SELECT entry FROM trip_log WHERE trip = $1 ORDER BY seq`, id)
	if err != nil {
		f.t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var e string
		if err := rows.Scan(&e); err != nil {
			f.t.Fatal(err)
		}
		out = append(out, e)
	}
	if err := rows.Close(); err != nil {
		f.t.Fatal(err)
	}
	return out
}

// data decodes a saga's data.
func data(t *testing.T, in saga.Info) tripData {
	t.Helper()
	var d tripData
	if err := json.Unmarshal(in.Data, &d); err != nil {
		t.Fatal(err)
	}
	return d
}

// before reports whether entry a comes before entry b in h (both present).
func before(h []string, a, b string) bool {
	i, j := slices.Index(h, a), slices.Index(h, b)
	return i >= 0 && j >= 0 && i < j
}

// holder is a participant service that holds amounts of one resource, up
// to a capacity, in its own database: the action holds (refusing beyond
// the capacity), the compensation releases. Every run of a side is
// counted. It takes commands over the broker (subscribe) and over HTTP
// (url), through an interceptor tests can set.
type holder struct {
	f                 *fleet
	name              string
	db                *sqldb.DB
	p                 *saga.Participant
	actions, releases atomic.Int32
	sub               func() // stops the broker subscription
	srv               *httptest.Server
	// intercept, when set, handles each HTTP request instead of the
	// participant's handler, which it is given.
	intercept atomic.Pointer[func(w http.ResponseWriter, r *http.Request, next http.Handler)]
	// released ends every request an interceptor holds when the test ends.
	released chan struct{}

	mu      sync.Mutex
	headers []http.Header // of the HTTP requests received
}

type holdInput struct {
	Amount int `json:"amount"`
}

func (f *fleet) addHolder(name string, capacity int) *holder {
	f.t.Helper()
	t := f.t
	h := &holder{f: f, name: name, db: openDB(t, f.kind, name), released: make(chan struct{})}
	for _, m := range []func(context.Context, *sqldb.DB) error{inbox.Migrate, outbox.Migrate, saga.Migrate} {
		if err := m(f.ctx, h.db); err != nil {
			t.Fatal(err)
		}
	}
	for _, q := range []string{`CREATE TABLE held (amount INTEGER NOT NULL, cap INTEGER NOT NULL)`, fmt.Sprintf(`INSERT INTO held VALUES (0, %d)`, capacity)} {
		if _, err := h.db.Exec(f.ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	ib, err := inbox.New(h.db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if h.p, err = saga.NewParticipant(ib, "/services/"+name); err != nil {
		t.Fatal(err)
	}
	hold := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
		h.actions.Add(1)
		var in holdInput
		if err := json.Unmarshal(cmd.Msg.Data, &in); err != nil {
			return saga.Reply{}, inbox.Permanent(err)
		}
		n, err := tx.Exec(ctx, `UPDATE held SET amount = amount + $1 WHERE amount + $1 <= cap`, in.Amount)
		if err != nil {
			return saga.Reply{}, err
		}
		if n == 0 {
			return saga.Failure(name + ": not enough"), nil
		}
		return saga.Success(map[string]int{"held": in.Amount}), nil
	}
	release := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
		h.releases.Add(1)
		var in holdInput
		if err := json.Unmarshal(cmd.Msg.Data, &in); err != nil {
			return saga.Reply{}, inbox.Permanent(err)
		}
		_, err := tx.Exec(ctx, `UPDATE held SET amount = amount - $1`, in.Amount)
		return saga.Success(nil), err
	}
	if err := h.p.Handle("shop."+name+".hold", hold, release); err != nil {
		t.Fatal(err)
	}
	next := h.p.HTTPHandler(h.db, "shop."+name+".hold")
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.headers = append(h.headers, r.Header.Clone())
		h.mu.Unlock()
		if ic := h.intercept.Load(); ic != nil {
			(*ic)(w, r, next)
			return
		}
		next.ServeHTTP(w, r)
	}))
	t.Cleanup(h.srv.Close)
	t.Cleanup(func() { close(h.released) }) // before Close, which waits for held requests
	if f.broker != nil {
		f.relay(h.db)
	}
	f.holders[name] = h
	return h
}

func (h *holder) url() string { return h.srv.URL + "/hold" }

// setIntercept routes the HTTP requests through ic.
func (h *holder) setIntercept(ic func(w http.ResponseWriter, r *http.Request, next http.Handler)) {
	h.intercept.Store(&ic)
}

// calls returns the headers of the HTTP requests received so far whose
// Troupe-Saga-Op is op.
func (h *holder) calls(op saga.Op) []http.Header {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []http.Header
	for _, hd := range h.headers {
		if hd.Get(saga.HeaderOp) == op.String() {
			out = append(out, hd)
		}
	}
	return out
}

// subscribe starts taking commands from the broker.
func (h *holder) subscribe() {
	h.f.t.Helper()
	sub, err := h.f.broker.Subscribe(h.f.ctx, broker.SubscribeConfig{Topic: h.name + ".commands", Group: h.name}, h.p.Handler(h.name))
	if err != nil {
		h.f.t.Fatal(err)
	}
	var once sync.Once
	h.sub = func() { once.Do(func() { _ = sub.Stop(ended) }) }
	h.f.t.Cleanup(h.sub)
}

// held returns the amount held.
func (h *holder) held() int {
	h.f.t.Helper()
	var n int
	if err := h.db.QueryRow(h.f.ctx, `SELECT amount FROM held`).Scan(&n); err != nil {
		h.f.t.Fatal(err)
	}
	return n
}
