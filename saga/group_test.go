package saga_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// newGroupFleet returns a fleet whose trip saga notes the trip, then
// reserves credit and stock and labels the parcel at once (a parallel
// group of two commands over the broker and a local branch), then
// confirms. With creditOverHTTP, the credit branch is an HTTP call.
func newGroupFleet(t *testing.T, kind string, creditOverHTTP bool) (f *fleet, credit, stock *holder) {
	t.Helper()
	f = newFleet(t, kind, true)
	credit, stock = f.addHolder("credit", 100), f.addHolder("stock", 10)
	creditStep := commandStep("credit")
	if creditOverHTTP {
		creditStep = httpStep(credit)
	}
	f.start(
		logStep("note", "noted", "unnoted"),
		saga.Step[tripData]{Name: "reserve", Parallel: []saga.Step[tripData]{
			creditStep,
			commandStep("stock"),
			logStep("label", "labelled", "unlabelled"),
		}},
		confirmStep(),
	)
	return f, credit, stock
}

func count(h []string, entry string) int {
	n := 0
	for _, e := range h {
		if e == entry {
			n++
		}
	}
	return n
}

func TestGroup_WhenEveryBranchSucceedsTheNextStepRunsOnce(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, true)
			stock.subscribe()
			f.begin(tripData{ID: "t1", Credit: 40, Stock: 3})
			in := f.waitStatus("t1", saga.Completed)
			if got := f.tripLog("t1"); !slices.Equal(got, []string{"noted", "labelled", "confirmed"}) {
				t.Fatalf("trip log %q: want the local branch once, then the next step once", got)
			}
			if c, s := credit.held(), stock.held(); c != 40 || s != 3 {
				t.Fatalf("held credit %d, stock %d: want 40 and 3", c, s)
			}
			// Each branch's OnReply updated the data; neither was lost.
			if d := data(t, in); !maps.Equal(d.Held, map[string]int{"credit": 40, "stock": 3}) {
				t.Fatalf("data %+v: want both branches' replies applied once", d)
			}
			h := f.history("t1")
			for _, b := range []string{"credit", "stock"} {
				if !before(h, b+" action 1 sent", b+" action 1 done") || !before(h, b+" action 1 done", "confirm action 1 done") {
					t.Fatalf("history %q: want %s sent, done, then the next step", h, b)
				}
			}
			// Both commands left in the transition that entered the group.
			if !before(h, "stock action 1 sent", "credit action 1 done") || !before(h, "credit action 1 sent", "stock action 1 done") {
				t.Fatalf("history %q: want every branch sent before any answer", h)
			}
			if n := count(h, "confirm action 1 done"); n != 1 {
				t.Fatalf("history %q: the next step ran %d times", h, n)
			}
		})
	}
}

func TestGroup_ARefusalCompensatesTheBranchesThatSucceededThenTheStepsBefore(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, false)
			stock.subscribe()
			f.begin(tripData{ID: "t2", Credit: 500, Stock: 3})
			f.waitHistory("t2", "stock action 1 done")
			credit.subscribe() // refuses: over the limit
			in := f.waitStatus("t2", saga.Compensated)
			if in.Reason != "credit: not enough" {
				t.Fatalf("reason %q, want the refusal's", in.Reason)
			}
			if s, c := stock.held(), credit.held(); s != 0 || c != 0 {
				t.Fatalf("held stock %d, credit %d after compensation: want 0", s, c)
			}
			if r := stock.releases.Load(); r != 1 {
				t.Fatalf("stock released %d times, want 1", r)
			}
			if r := credit.releases.Load(); r != 0 {
				t.Fatalf("the refused credit branch was compensated %d times: a refusal leaves nothing to undo", r)
			}
			if got := f.tripLog("t2"); !slices.Equal(got, []string{"noted", "labelled", "unlabelled", "unnoted"}) {
				t.Fatalf("trip log %q: want the local branch undone, then the step before the group", got)
			}
			h := f.history("t2")
			if !before(h, "credit action 1 refused", "stock compensation 1 sent") || !before(h, "stock compensation 1 done", "note compensation 1 done") ||
				!before(h, "label compensation 1 done", "note compensation 1 done") {
				t.Fatalf("history %q: want the group's branches compensated, then the step before it", h)
			}
			if slices.Contains(h, "confirm action 1 done") {
				t.Fatalf("history %q: the step after the group ran", h)
			}
		})
	}
}

// The stock service is down when credit refuses: its branch is in flight.
// It is compensated at once; when the service comes back, its queue holds
// the action then the compensation, so the action runs and is undone.
func TestGroup_ABranchInFlightWhenAnotherRefusesIsCompensatedOnce(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, false)
			credit.subscribe()
			f.begin(tripData{ID: "t3", Credit: 500, Stock: 3})
			f.waitHistory("t3", "stock compensation 1 sent")
			if h := f.history("t3"); !slices.Contains(h, "stock action 1 abandoned") {
				t.Fatalf("history %q: want the action in flight marked abandoned", h)
			}
			stock.subscribe()
			f.waitStatus("t3", saga.Compensated)
			f.waitHistory("t3", "stock action 0 ignored-reply") // the late action's reply
			if got := stock.held(); got != 0 {
				t.Fatalf("stock holds %d, want 0", got)
			}
			if a, r := stock.actions.Load(), stock.releases.Load(); a != 1 || r != 1 {
				t.Fatalf("stock action ran %d times, compensation %d: want once each", a, r)
			}
			if got := f.tripLog("t3"); !slices.Equal(got, []string{"noted", "labelled", "unlabelled", "unnoted"}) {
				t.Fatalf("trip log %q", got)
			}
		})
	}
}

func TestGroup_ARepeatedReplyIsIgnored(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, false)
			credit.subscribe()
			f.begin(tripData{ID: "t4", Credit: 40, Stock: 3})
			f.waitHistory("t4", "credit action 1 done")
			// The credit reply again: redelivered (same id, which the inbox
			// drops), then sent anew (a new id, which reaches the saga).
			var firstID string
			if err := f.db.QueryRow(f.ctx, `SELECT message_id FROM troupe_inbox WHERE source = '/services/credit'`).Scan(&firstID); err != nil {
				t.Fatal(err)
			}
			again := message.New("/services/credit", saga.ReplyType, []byte(`{"held":40}`))
			again.ID = firstID
			again.DataContentType = "application/json"
			again.Subject, again.CorrelationID = "trip-t4", "trip-t4"
			again.Extensions = map[string]string{saga.ExtSagaID: "trip-t4", saga.ExtStep: "credit", saga.ExtOp: "action", saga.ExtOutcome: "success"}
			anew := again.Clone()
			anew.ID = message.NewID()
			if err := f.broker.Publish(f.ctx, "orders.replies", again, anew); err != nil {
				t.Fatal(err)
			}
			f.waitHistory("t4", "credit action 0 ignored-reply")
			stock.subscribe()
			in := f.waitStatus("t4", saga.Completed)
			if d := data(t, in); !maps.Equal(d.Held, map[string]int{"credit": 40, "stock": 3}) {
				t.Fatalf("data %+v: want each reply applied once", d)
			}
			h := f.history("t4")
			if count(h, "credit action 1 done") != 1 || count(h, "credit action 0 ignored-reply") != 1 || count(h, "confirm action 1 done") != 1 {
				t.Fatalf("history %q: want credit done once, the new copy ignored once, the next step once", h)
			}
		})
	}
}

// The orchestrator stops while the group is in flight; a new one on the
// same database picks it up: the branch's state (one send) survived, so
// its deadline sends the second attempt, and the saga completes.
func TestGroup_AnOrchestratorRestartedMidGroupFinishesTheSaga(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, false)
			credit.subscribe()
			f.begin(tripData{ID: "t5", Credit: 40, Stock: 3})
			f.waitHistory("t5", "credit action 1 done")
			f.stopOwner()
			f.startOwner()
			f.clock.Advance(time.Minute)
			f.waitHistory("t5", "stock action 2 sent")
			stock.subscribe()
			in := f.waitStatus("t5", saga.Completed)
			if c, s := credit.held(), stock.held(); c != 40 || s != 3 {
				t.Fatalf("held credit %d, stock %d: want 40 and 3", c, s)
			}
			if n := stock.actions.Load(); n != 1 {
				t.Fatalf("stock action ran %d times, want 1", n)
			}
			if d := data(t, in); !maps.Equal(d.Held, map[string]int{"credit": 40, "stock": 3}) {
				t.Fatalf("data %+v", d)
			}
			if got := f.tripLog("t5"); !slices.Equal(got, []string{"noted", "labelled", "confirmed"}) {
				t.Fatalf("trip log %q", got)
			}
		})
	}
}

// A branch that never answers within its attempts counts as failed: it is
// compensated (its action may have run), and so are the other branches and
// the steps before the group.
func TestGroup_ABranchWhoseDeadlinesAllPassIsCompensatedWithTheOthers(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit, stock := newGroupFleet(t, kind, false)
			credit.subscribe()
			f.begin(tripData{ID: "t6", Credit: 40, Stock: 3})
			f.waitHistory("t6", "credit action 1 done")
			f.clock.Advance(time.Minute)
			f.waitHistory("t6", "stock action 2 sent")
			f.clock.Advance(time.Minute)
			f.waitHistory("t6", "stock compensation 1 sent")
			f.waitHistory("t6", "credit compensation 1 done")
			stock.subscribe() // its queue: action 1, action 2, the compensation
			in := f.waitStatus("t6", saga.Compensated)
			if !strings.Contains(in.Reason, `"stock"`) {
				t.Fatalf("reason %q: want the branch that failed named", in.Reason)
			}
			if c, s := credit.held(), stock.held(); c != 0 || s != 0 {
				t.Fatalf("held credit %d, stock %d after compensation: want 0", c, s)
			}
			if c, s := credit.releases.Load(), stock.releases.Load(); c != 1 || s != 1 {
				t.Fatalf("credit released %d times, stock %d: want once each", c, s)
			}
			if got := f.tripLog("t6"); !slices.Equal(got, []string{"noted", "labelled", "unlabelled", "unnoted"}) {
				t.Fatalf("trip log %q", got)
			}
		})
	}
}

func TestRegister_RefusesAGroupThatCannotRun(t *testing.T) {
	o, _ := newOrchestrator(t)
	local := logStep("a", "a", "")
	cmd := commandStep("b")
	cases := map[string]struct {
		steps []saga.Step[tripData]
		want  string
	}{
		"one branch":              {[]saga.Step[tripData]{{Name: "g", Parallel: []saga.Step[tripData]{local}}}, "two or more"},
		"nested":                  {[]saga.Step[tripData]{{Name: "g", Parallel: []saga.Step[tripData]{local, {Name: "h", Parallel: []saga.Step[tripData]{cmd, commandStep("c")}}}}}, "do not nest"},
		"own command":             {[]saga.Step[tripData]{{Name: "g", Topic: "t", Command: "c", Parallel: []saga.Step[tripData]{local, cmd}}}, "of its own"},
		"branch twice":            {[]saga.Step[tripData]{local, {Name: "g", Parallel: []saga.Step[tripData]{logStep("a", "x", ""), cmd}}}, `"a" appears twice`},
		"group named as a branch": {[]saga.Step[tripData]{{Name: "b", Parallel: []saga.Step[tripData]{local, cmd}}}, `"b" appears twice`},
		"empty branch":            {[]saga.Step[tripData]{{Name: "g", Parallel: []saga.Step[tripData]{local, {Name: "e"}}}}, "neither"},
		"bad URL":                 {[]saga.Step[tripData]{{Name: "h", URL: "ftp://x/y"}}, "http or https"},
		"compensation URL alone":  {[]saga.Step[tripData]{{Name: "h", CompensationURL: "http://x/y"}}, "no URL"},
		"HTTP and command":        {[]saga.Step[tripData]{{Name: "h", URL: "http://x/y", Topic: "t", Command: "c"}}, "both a command and an HTTP step"},
		"own patience":            {[]saga.Step[tripData]{{Name: "g", CompensationTimeout: time.Minute, Parallel: []saga.Step[tripData]{local, cmd}}}, "of its own"},
	}
	for name, c := range cases {
		err := o.Register(&saga.Definition[tripData]{Name: "trip", Steps: c.steps})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", name, err, c.want)
		}
	}
	ok := &saga.Definition[tripData]{Name: "trip", Steps: []saga.Step[tripData]{local, {Name: "g", Parallel: []saga.Step[tripData]{cmd, {Name: "h", URL: "https://x/y"}}}}}
	if err := o.Register(ok); err != nil {
		t.Fatalf("a valid group: %v", err)
	}
}

// A saga row written before groups and HTTP steps existed (schema version
// 1) loads and goes on after the migration.
func TestMigrate_ASagaInFlightBeforeTheGroupsMigrationGoesOn(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			db := openDB(t, kind, "old")
			migs, err := sqldb.LoadMigrations(os.DirFS("migrations"), db.Dialect().String())
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Migrate(ctx, saga.Component, migs[:1]); err != nil {
				t.Fatal(err)
			}
			now := time.Now().UTC()
			if _, err := db.Exec(ctx, `INSERT INTO troupe_sagas (id, name, version, status, step, awaiting, attempt, data, created_at, updated_at)
				VALUES ('old-1', 'trip', 1, 'running', 0, 'action', 1, $1, $2, $2)`, []byte(`{"id":"old-1"}`), now); err != nil {
				t.Fatal(err)
			}
			for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
				if err := m(ctx, db); err != nil {
					t.Fatal(err)
				}
			}
			sched, err := timer.New(db, timer.Config{})
			if err != nil {
				t.Fatal(err)
			}
			ib, err := inbox.New(db, inbox.Config{})
			if err != nil {
				t.Fatal(err)
			}
			o, err := saga.New(db, sched, ib, saga.Config{Source: "/services/order", ReplyTopic: "orders.replies"})
			if err != nil {
				t.Fatal(err)
			}
			if err := o.Register(&saga.Definition[tripData]{Name: "trip", Steps: []saga.Step[tripData]{commandStep("credit")}}); err != nil {
				t.Fatal(err)
			}
			reply := message.New("/services/credit", saga.ReplyType, []byte(`{"held":5}`))
			reply.Extensions = map[string]string{saga.ExtSagaID: "old-1", saga.ExtStep: "credit", saga.ExtOp: "action", saga.ExtOutcome: "success"}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return o.HandleReplyTx(ctx, tx, reply) }); err != nil {
				t.Fatal(err)
			}
			in, err := o.Get(ctx, "old-1")
			if err != nil {
				t.Fatal(err)
			}
			if d := data(t, in); in.Status != saga.Completed || d.Held["credit"] != 5 {
				t.Fatalf("%+v (%+v): want the old saga completed with its reply applied", in, d)
			}
		})
	}
}

// A group's compensation parks the saga when a local branch's undo fails,
// while another branch's compensation is in flight. The operator's retry
// runs the undo again and sends the other compensation again, as its next
// attempt; the saga then ends compensated.
func TestGroup_AnOperatorRetryOfAParkedGroupResumesEveryBranchCompensation(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			o, db := newOrchestratorOn(t, kind)
			ctx := context.Background()
			if _, err := db.Exec(ctx, `CREATE TABLE holds (saga_id TEXT NOT NULL)`); err != nil {
				t.Fatal(err)
			}
			broken := true
			def := &saga.Definition[tripData]{Name: "trip", Steps: []saga.Step[tripData]{
				{Name: "g", Parallel: []saga.Step[tripData]{
					commandStep("credit"),
					{
						Name: "hold",
						Local: func(ctx context.Context, tx sqldb.Tx, id string, _ *tripData) error {
							_, err := tx.Exec(ctx, `INSERT INTO holds (saga_id) VALUES ($1)`, id)
							return err
						},
						UndoLocal: func(ctx context.Context, tx sqldb.Tx, id string, _ *tripData) error {
							if broken {
								return errors.New("holds table locked")
							}
							_, err := tx.Exec(ctx, `DELETE FROM holds WHERE saga_id = $1`, id)
							return err
						},
					},
				}},
				{Name: "refuse", Local: func(context.Context, sqldb.Tx, string, *tripData) error { return saga.Refuse(errors.New("no")) }},
			}}
			if err := o.Register(def); err != nil {
				t.Fatal(err)
			}
			inTx := func(f func(ctx context.Context, tx sqldb.Tx) error) {
				t.Helper()
				if err := db.InTx(ctx, f); err != nil {
					t.Fatal(err)
				}
			}
			reply := func(op, data string) {
				t.Helper()
				m := message.New("/services/credit", saga.ReplyType, []byte(data))
				m.Extensions = map[string]string{saga.ExtSagaID: "s", saga.ExtStep: "credit", saga.ExtOp: op, saga.ExtOutcome: "success"}
				inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.HandleReplyTx(ctx, tx, m) })
			}
			inTx(func(ctx context.Context, tx sqldb.Tx) error {
				return def.StartTx(ctx, tx, o, "s", tripData{ID: "s", Credit: 5})
			})
			reply("action", `{"held":5}`) // the group joins; the next step refuses
			in, err := o.Get(ctx, "s")
			if err != nil || in.Status != saga.Parked {
				t.Fatalf("%+v, %v: want parked by the failing undo", in, err)
			}
			reply("compensation", "") // the credit compensation's answer, while parked: ignored
			broken = false
			inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.RetryTx(ctx, tx, "s") })
			hs, err := o.History(ctx, "s")
			if err != nil {
				t.Fatal(err)
			}
			var h []string
			for _, e := range hs {
				h = append(h, e.Step+" "+e.Op+" "+strconv.Itoa(e.Attempt)+" "+e.Event)
			}
			if !before(h, "credit compensation 1 sent", "credit compensation 2 sent") || !slices.Contains(h, "hold compensation 1 done") {
				t.Fatalf("history %q: want the credit compensation sent again as attempt 2, and the undo done", h)
			}
			reply("compensation", "")
			if in, err := o.Get(ctx, "s"); err != nil || in.Status != saga.Compensated {
				t.Fatalf("%+v, %v: want compensated", in, err)
			}
			var holds int
			if err := db.QueryRow(ctx, `SELECT count(*) FROM holds`).Scan(&holds); err != nil || holds != 0 {
				t.Fatalf("%d holds (%v), want 0", holds, err)
			}
		})
	}
}
