package flow_test

import (
	"context"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// forEachDialect runs f on each dialect.
func forEachDialect(t *testing.T, f func(t *testing.T, kind string)) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) { f(t, kind) })
	}
}

// dbURL returns the URL of a fresh database of kind.
func dbURL(t *testing.T, kind, name string) string {
	t.Helper()
	if kind == "postgres" {
		return pgtest.URL(t)
	}
	return "sqlite://" + filepath.Join(t.TempDir(), name+".db")
}

// open opens url, closed when the test ends.
func open(t *testing.T, url string) *sqldb.DB {
	t.Helper()
	db, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// trackerDB opens a fresh database of kind with the flow tables.
func trackerDB(t *testing.T, kind string) (*sqldb.DB, string) {
	t.Helper()
	url := dbURL(t, kind, "flows")
	db := open(t, url)
	if err := flow.Migrate(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	return db, url
}

// t0 is when the tests' flows start, and the fake clocks' start.
var t0 = time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)

// The message types of the shop's create-order choreography.
const (
	orderCreated  = "shop.order.created"
	creditOK      = "shop.credit.reserved"
	creditRefused = "shop.credit.refused"
	stockReserved = "shop.stock.reserved"
	orderApproved = "shop.order.approved"
	orderRejected = "shop.order.rejected"
)

func createOrder(deadline time.Duration) flow.Definition {
	return flow.Definition{
		Name:      "shop.create-order",
		Starts:    []string{orderCreated},
		Steps:     []string{creditOK, creditRefused, stockReserved},
		Completes: []string{orderApproved},
		Fails:     []string{orderRejected},
		Deadline:  deadline,
	}
}

// newTracker returns a tracker on db reading clock, with the create-order
// definition (a 10-minute deadline).
func newTracker(t *testing.T, db *sqldb.DB, clock *clocktest.Clock) *flow.Tracker {
	t.Helper()
	tr, err := flow.New(db, flow.Config{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Define(createOrder(10 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	return tr
}

// start returns the message that starts an order's flow, at time at. Like
// a message a service writes outside any handler, it has no correlation id.
func start(order string, at time.Time) *message.Message {
	m := message.New("/services/order", orderCreated, []byte(`{"order_id":"`+order+`"}`))
	m.Subject, m.Time = order, at
	return m
}

// next returns a message of type typ from source, caused by cause, at
// cause's time plus d.
func next(source, typ string, cause *message.Message, d time.Duration) *message.Message {
	m := message.New(source, typ, nil)
	m.Subject, m.Time = cause.Subject, cause.Time.Add(d)
	return m.CausedBy(cause)
}

// completed returns the four messages of an approved order, in causal
// order.
func completed(order string, at time.Time) []*message.Message {
	c := start(order, at)
	r := next("/services/customer", creditOK, c, time.Second)
	s := next("/services/inventory", stockReserved, r, time.Second)
	a := next("/services/order", orderApproved, s, time.Second)
	return []*message.Message{c, r, s, a}
}

// failed returns the three messages of an order rejected with reason.
func failed(order string, at time.Time, reason string) []*message.Message {
	c := start(order, at)
	r := next("/services/customer", creditRefused, c, time.Second)
	x := next("/services/order", orderRejected, r, time.Second)
	x.Data, x.DataContentType = []byte(`{"order_id":"`+order+`","reason":"`+reason+`"}`), "application/json"
	return []*message.Message{c, r, x}
}

// deliver hands msgs to h as one batch, as a broker would, and returns
// the deliveries, settled.
func deliver(h broker.Handler, msgs ...*message.Message) []*broker.Delivery {
	batch := make([]*broker.Delivery, len(msgs))
	for i, m := range msgs {
		batch[i] = &broker.Delivery{Msg: m, Topic: "shop.orders", Attempt: 1}
	}
	h(context.Background(), batch)
	return batch
}

// mustAck fails the test unless every delivery was acknowledged.
func mustAck(t *testing.T, batch []*broker.Delivery) {
	t.Helper()
	for _, d := range batch {
		if s, _, reason := d.Settlement(); s != broker.Acked {
			t.Fatalf("delivery of %v settled %s (%s), want acked", d.Msg, s, reason)
		}
	}
}

func get(t *testing.T, tr *flow.Tracker, id string) flow.Flow {
	t.Helper()
	f, err := tr.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func history(t *testing.T, tr *flow.Tracker, id string) []flow.Event {
	t.Helper()
	h, err := tr.History(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// types returns the types of events, in order.
func types(events []flow.Event) []string {
	out := make([]string, len(events))
	for i, e := range events {
		out[i] = e.Type
	}
	return out
}

func typesOf(msgs []*message.Message) []string {
	out := make([]string, len(msgs))
	for i, m := range msgs {
		out[i] = m.Type
	}
	return out
}

func ids(flows []flow.Flow) []string {
	out := make([]string, len(flows))
	for i, f := range flows {
		out[i] = f.ID
	}
	return out
}

// waitFor polls cond until it holds, failing the test after 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func equal[T comparable](a, b []T) bool { return slices.Equal(a, b) }
