package saga_test

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// compensationTimeout is a shop tweak that sets the CompensationTimeout of
// step name.
func compensationTimeout(name string, d time.Duration) func(*saga.Definition[orderData]) {
	return func(def *saga.Definition[orderData]) {
		for i := range def.Steps {
			if def.Steps[i].Name == name {
				def.Steps[i].CompensationTimeout = d
			}
		}
	}
}

// deadline is a shop tweak that sets the Deadline of step name.
func deadline(name string, d time.Duration) func(*saga.Definition[orderData]) {
	return func(def *saga.Definition[orderData]) {
		for i := range def.Steps {
			if def.Steps[i].Name == name {
				def.Steps[i].Deadline = d
			}
		}
	}
}

// sentAt returns when side op of step was sent as attempt, by the saga's
// history.
func sentAt(t *testing.T, o *saga.Orchestrator, sagaID, step string, op saga.Op, attempt int) time.Time {
	t.Helper()
	hs, err := o.History(context.Background(), sagaID)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		if h.Step == step && h.Op == op.String() && h.Attempt == attempt && h.Event == "sent" {
			return h.At
		}
	}
	t.Fatalf("%s: no %s %s %d sent in the history", sagaID, step, op, attempt)
	return time.Time{}
}

// pendingDeadline returns when the saga's one pending deadline is due, as
// the timer scheduler stores it.
func pendingDeadline(t *testing.T, db *sqldb.DB, sagaID string) time.Time {
	t.Helper()
	rows, err := db.Query(context.Background(), `SELECT due_at FROM troupe_timers WHERE id LIKE $1`, "saga-deadline/"+sagaID+"/%")
	if err != nil {
		t.Fatal(err)
	}
	var due []time.Time
	for rows.Next() {
		var d time.Time
		if err := rows.Scan(&d); err != nil {
			t.Fatal(err)
		}
		due = append(due, d.UTC())
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	if len(due) != 1 {
		t.Fatalf("%s: %d pending deadlines, want 1", sagaID, len(due))
	}
	return due[0]
}

// silentUntilCompensating places an order while the Customer service is
// down, and lets the action's two deadlines (Deadline 10 s) pass: the saga
// compensates the step and sends its compensation, attempt 1.
func silentUntilCompensating(t *testing.T, s *shop, orderID string) {
	t.Helper()
	s.placeOrder(orderData{OrderID: orderID, Customer: "alice", Total: 20})
	waitHistory(t, s, orderID, "reserve-credit action 1 sent")
	s.clock.Advance(10 * time.Second)
	waitHistory(t, s, orderID, "reserve-credit action 2 sent")
	s.clock.Advance(10 * time.Second)
	waitHistory(t, s, orderID, "reserve-credit compensation 1 sent")
}

// awaitEachSend checks, for each wait in turn, that the compensation's
// pending deadline is that long after its latest send (attempt first, then
// the next), and lets it pass. It returns the attempt awaited last.
func awaitEachSend(t *testing.T, s *shop, orderID string, first int, waits []time.Duration) int {
	t.Helper()
	attempt := first
	for i, wait := range waits {
		sent := sentAt(t, s.o, "saga-"+orderID, "reserve-credit", saga.Compensation, attempt)
		if got := pendingDeadline(t, s.orderDB, "saga-"+orderID).Sub(sent); got != wait {
			t.Fatalf("compensation attempt %d is awaited %v, want %v (waits %v)", attempt, got, wait, waits)
		}
		s.clock.Advance(wait)
		if i < len(waits)-1 {
			attempt++
			waitHistory(t, s, orderID, "reserve-credit compensation "+strconv.Itoa(attempt)+" sent")
		}
	}
	return attempt
}

// The participant is down for far longer than an action's Deadline ×
// MaxAttempts while the saga compensates: the compensation is sent again
// at waits that double from Deadline up to a minute, the saga does not
// park, and once the participant is back the saga ends compensated, with
// the compensation applied once.
func TestOrchestrator_AnUnansweredCompensationIsSentAgainAtDoublingWaitsUntilAnswered(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind, deadline("reserve-credit", 10*time.Second), compensationTimeout("reserve-credit", 5*time.Minute))
			silentUntilCompensating(t, s, "d1")
			waits := []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, time.Minute, time.Minute}
			last := awaitEachSend(t, s, "d1", 1, waits)
			waitHistory(t, s, "d1", "reserve-credit compensation "+strconv.Itoa(last+1)+" sent")
			// 3m10s of silence, against an action's 20 s (10 s × 2 attempts).
			if in, err := s.o.Get(s.ctx, "saga-d1"); err != nil || in.Status != saga.Compensating {
				t.Fatalf("%+v, %v: want still compensating", in, err)
			}
			s.startCustomer()
			in := s.waitStatus("d1", saga.Compensated)
			if in.Reason == "" {
				t.Fatal("no reason recorded")
			}
			if got, r := s.customer.reserved(t), s.customer.releases.Load(); got != 0 || r != 1 {
				t.Fatalf("customer reserved %d after %d releases, want 0 after 1: the repeated compensations have no second effect", got, r)
			}
		})
	}
}

// A compensation unanswered through its CompensationTimeout parks the
// saga, with a reason that names the timeout; the last wait is cut to end
// at it. An operator's retry gives the compensation a new round, whose
// first wait is Deadline again, and the saga ends once the participant
// answers.
func TestOrchestrator_ACompensationUnansweredThroughItsTimeoutParksTheSaga(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind, deadline("reserve-credit", 10*time.Second), compensationTimeout("reserve-credit", 2*time.Minute))
			silentUntilCompensating(t, s, "d2")
			// 10 s + 20 s + 40 s, then what is left of the 2 minutes.
			last := awaitEachSend(t, s, "d2", 1, []time.Duration{10 * time.Second, 20 * time.Second, 40 * time.Second, 50 * time.Second})
			in := s.waitStatus("d2", saga.Parked)
			if want := `step "reserve-credit": no reply to the compensation within 2m0s (4 attempts)`; in.Reason != want || last != 4 {
				t.Fatalf("parked after attempt %d with reason %q, want attempt 4 and %q", last, in.Reason, want)
			}
			if err := s.orderDB.InTx(s.ctx, func(ctx context.Context, tx sqldb.Tx) error { return s.o.RetryTx(ctx, tx, "saga-d2") }); err != nil {
				t.Fatal(err)
			}
			waitHistory(t, s, "d2", "reserve-credit compensation 5 sent")
			awaitEachSend(t, s, "d2", 5, []time.Duration{10 * time.Second})
			waitHistory(t, s, "d2", "reserve-credit compensation 6 sent")
			s.startCustomer()
			s.waitStatus("d2", saga.Compensated)
			if got := s.customer.reserved(t); got != 0 {
				t.Fatalf("customer reserved %d, want 0", got)
			}
		})
	}
}

// A participant refuses a compensation (a Failure reply): no patience
// helps, so the saga parks at once, without sending it again.
func TestOrchestrator_ARefusedCompensationParksTheSagaAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			o, db := newOrchestratorOn(t, kind)
			ctx := context.Background()
			def := &saga.Definition[struct{}]{Name: "hold-then-refuse", Steps: []saga.Step[struct{}]{
				{Name: "hold", Topic: "holds.commands", Command: "shop.hold"},
				{Name: "refuse", Local: func(context.Context, sqldb.Tx, string, *struct{}) error { return saga.Refuse(errors.New("no")) }},
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
			reply := func(op, outcome, reason string) {
				t.Helper()
				m := message.New("/services/holds", saga.ReplyType, nil)
				m.Extensions = map[string]string{saga.ExtSagaID: "s", saga.ExtStep: "hold", saga.ExtOp: op, saga.ExtOutcome: outcome, saga.ExtReason: reason}
				inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.HandleReplyTx(ctx, tx, m) })
			}
			inTx(func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, "s", struct{}{}) })
			reply("action", "success", "")                    // then the next step refuses
			reply("compensation", "failure", "ledger closed") // no timer has fired: no time has passed
			in, err := o.Get(ctx, "s")
			if want := `compensation of step "hold" refused: ledger closed`; err != nil || in.Status != saga.Parked || in.Reason != want {
				t.Fatalf("%+v, %v: want parked with reason %q", in, err, want)
			}
			hs, err := o.History(ctx, "s")
			if err != nil {
				t.Fatal(err)
			}
			var h []string
			for _, e := range hs {
				h = append(h, e.Step+" "+e.Op+" "+strconv.Itoa(e.Attempt)+" "+e.Event)
			}
			want := []string{"  0 started", "hold action 1 sent", "hold action 1 done", "refuse action 1 refused",
				"hold compensation 1 sent", "hold compensation 1 refused"}
			if !slices.Equal(h, want) {
				t.Fatalf("history\n got %q\nwant %q", h, want)
			}
		})
	}
}

// An HTTP compensation answered 503 more times than MaxAttempts and for
// longer than Deadline is called again until it succeeds: the saga ends
// compensated, not parked, with one effect at the participant.
func TestHTTPStep_ACompensationAnswered503LongerThanItsDeadlineIsCalledUntilItSucceeds(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind) // credit: Deadline 1 min, MaxAttempts 3
			back := f.clock.Now().Add(2 * time.Minute)
			var failed atomic.Int32
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "compensation" && (failed.Load() < 5 || f.clock.Now().Before(back)) {
					failed.Add(1)
					http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "p1", Credit: 30, Fraud: true}) // held, then compensated over HTTP
			limit := time.Now().Add(20 * time.Second)
			for failed.Load() < 5 { // the fleet's scheduler calls again at once (Backoff 0)
				if time.Now().After(limit) {
					t.Fatalf("the compensation was called %d times: want it called again past MaxAttempts; history %q", failed.Load(), f.history("p1"))
				}
				time.Sleep(5 * time.Millisecond)
			}
			sent := sentAt(t, f.o, "trip-p1", "credit", saga.Compensation, 1)
			if got := pendingDeadline(t, f.db, "trip-p1").Sub(sent); got != saga.DefaultCompensationTimeout {
				t.Fatalf("the compensation's deadline is %v after its send, want CompensationTimeout (%v)", got, saga.DefaultCompensationTimeout)
			}
			f.clock.Advance(3 * time.Minute) // past Deadline; the participant is back
			f.sched.Notify()
			f.waitStatus("p1", saga.Compensated)
			if got, r := credit.held(), credit.releases.Load(); got != 0 || r != 1 {
				t.Fatalf("credit holds %d after %d releases, want 0 after 1", got, r)
			}
			calls := credit.calls(saga.Compensation)
			if len(calls) <= 5 {
				t.Fatalf("%d compensation calls, want more than the 5 answered 503", len(calls))
			}
			for i, c := range calls {
				if c.Get(timer.IdempotencyKeyHeader) != calls[0].Get(timer.IdempotencyKeyHeader) {
					t.Fatalf("call %d has key %q, the first %q: want one key for every call", i+1, c.Get(timer.IdempotencyKeyHeader), calls[0].Get(timer.IdempotencyKeyHeader))
				}
			}
		})
	}
}

// An HTTP compensation refused (422) parks the saga at once: it is not
// called again, however much of its CompensationTimeout is left.
func TestHTTPStep_ARefusedCompensationParksTheSagaAtOnce(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "compensation" {
					http.Error(w, "ledger closed", http.StatusUnprocessableEntity)
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "p2", Credit: 30, Fraud: true})
			in := f.waitStatus("p2", saga.Parked) // the clock never moves
			if want := `compensation of step "credit" refused: ledger closed`; in.Reason != want {
				t.Fatalf("reason %q, want %q", in.Reason, want)
			}
			if n := len(credit.calls(saga.Compensation)); n != 1 {
				t.Fatalf("%d compensation calls, want 1", n)
			}
		})
	}
}
