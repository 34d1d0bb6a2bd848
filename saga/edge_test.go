package saga_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// cutWatch is an OnReply that records whether it was ever handed a reply
// whose data is not the JSON the participant sent (cut), and otherwise adds
// the held amount like addHeld.
func cutWatch(cut *atomic.Bool) func(d *tripData, r *saga.ReplyMsg) error {
	add := addHeld("credit")
	return func(d *tripData, r *saga.ReplyMsg) error {
		if !json.Valid(r.Msg.Data) {
			cut.Store(true)
			return nil // a lenient OnReply: what it gets, it takes
		}
		return add(d, r)
	}
}

// The participant acts and answers 200, but the connection breaks in the
// middle of the body, on the step's last attempt. The timer tells OnDone
// of a failure (a success whose body was cut is no answer): the saga must
// not take it for a success with empty data.
func TestHTTPStep_ASuccessWhoseBodyWasCutOnTheLastAttemptIsNoAnswer(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			var cut atomic.Bool
			step := httpStep(credit)
			step.MaxAttempts, step.OnReply = 1, cutWatch(&cut)
			f.start(logStep("note", "noted", "unnoted"), step, confirmStep())
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) != "action" {
					next.ServeHTTP(w, r)
					return
				}
				next.ServeHTTP(httptest.NewRecorder(), r) // the participant acts
				w.Header().Set("Content-Length", "100")
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write([]byte(`{"held":`)) // and the connection breaks
			})
			f.begin(tripData{ID: "c1", Credit: 40})
			in := waitEnded(t, f, "c1", saga.Compensated)
			if cut.Load() {
				t.Fatalf("OnReply was handed the cut body of a call that failed")
			}
			if got := credit.held(); got != 0 {
				t.Fatalf("credit holds %d: want the action, which ran, compensated", got)
			}
			if !strings.Contains(in.Reason, "credit") {
				t.Fatalf("reason %q: want the step named", in.Reason)
			}
		})
	}
}

// The participant answers 200 with a body over timer.MaxDoneBody: the
// outcome handed to the saga is cut. OnReply must not get a cut body as if
// it were the reply; the step counts as unanswered (compensated), since
// its answer cannot be read.
func TestHTTPStep_AResponseOverTheBodyLimitIsNotHandedCutToOnReply(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			var cut atomic.Bool
			step := httpStep(credit)
			step.OnReply = cutWatch(&cut)
			f.start(logStep("note", "noted", "unnoted"), step, confirmStep())
			big, err := json.Marshal(map[string]any{"held": 40, "receipt": strings.Repeat("x", timer.MaxDoneBody)})
			if err != nil {
				t.Fatal(err)
			}
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) != "action" {
					next.ServeHTTP(w, r)
					return
				}
				next.ServeHTTP(httptest.NewRecorder(), r)
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write(big)
			})
			f.begin(tripData{ID: "c2", Credit: 40})
			waitEnded(t, f, "c2", saga.Compensated)
			if cut.Load() {
				t.Fatalf("OnReply was handed the first %d bytes of a %d-byte body as the reply", timer.MaxDoneBody, len(big))
			}
			if got := credit.held(); got != 0 {
				t.Fatalf("credit holds %d: want the action compensated", got)
			}
		})
	}
}

// An operator aborts a parked group: the remaining compensations are the
// operator's (saga.Aborted), so a branch's HTTP compensation that was
// being retried (503, Retry-After) must not be called after the abort.
func TestGroup_AbortingAParkedGroupStopsItsHTTPCompensationCalls(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			f.start(
				saga.Step[tripData]{Name: "g", Parallel: []saga.Step[tripData]{
					httpStep(credit),
					{
						Name:      "hold",
						Local:     func(context.Context, sqldb.Tx, string, *tripData) error { return nil },
						UndoLocal: func(context.Context, sqldb.Tx, string, *tripData) error { return errors.New("holds table locked") },
					},
				}},
				saga.Step[tripData]{Name: "refuse", Local: func(context.Context, sqldb.Tx, string, *tripData) error {
					return saga.Refuse(errors.New("no"))
				}},
			)
			var healthy atomic.Bool
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "compensation" && !healthy.Load() {
					w.Header().Set("Retry-After", "60")
					http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "a1", Credit: 40})
			f.waitStatus("a1", saga.Parked) // the hold's undo failed
			deadline := time.Now().Add(20 * time.Second)
			for len(credit.calls(saga.Compensation)) == 0 {
				if time.Now().After(deadline) {
					t.Fatal("the credit compensation was never called")
				}
				time.Sleep(5 * time.Millisecond)
			}
			if err := f.db.InTx(f.ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return f.o.AbortTx(ctx, tx, "trip-a1", "refunded by hand")
			}); err != nil {
				t.Fatal(err)
			}
			healthy.Store(true)
			f.clock.Advance(2 * time.Minute)
			f.sched.Notify()
			// Wait until no call of the saga is pending, then look at what
			// the participant did.
			for pendingCalls(t, f, "trip-a1") > 0 {
				if time.Now().After(deadline) {
					t.Fatal("the saga's calls are still pending")
				}
				time.Sleep(5 * time.Millisecond)
			}
			if r := credit.releases.Load(); r != 0 {
				t.Fatalf("the aborted saga's compensation ran %d times after the abort: the operator's to do", r)
			}
		})
	}
}

// pendingCalls counts the HTTP calls of saga id still stored as timer
// tasks.
func pendingCalls(t *testing.T, f *fleet, id string) int {
	t.Helper()
	var n int
	if err := f.db.QueryRow(f.ctx, `SELECT count(*) FROM troupe_timers WHERE id LIKE $1`, "saga-http/"+id+"/%").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitEnded waits until trip id's saga ends (or parks) and fails the test
// unless it ended in want.
func waitEnded(t *testing.T, f *fleet, id string, want saga.Status) saga.Info {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := f.o.Get(f.ctx, "trip-"+id)
		if err != nil {
			t.Fatal(err)
		}
		switch in.Status {
		case saga.Completed, saga.Compensated, saga.Parked, saga.Aborted:
			if in.Status != want {
				t.Fatalf("trip %s ended %s (%s), want %s; history %q", id, in.Status, in.Reason, want, f.history(id))
			}
			return in
		}
		if time.Now().After(deadline) {
			t.Fatalf("trip %s: still %s, want %s; history %q", id, in.Status, want, f.history(id))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sagaTimers counts the timers (deadlines and HTTP calls) of saga id still
// stored.
func sagaTimers(t *testing.T, f *fleet, id string) int {
	t.Helper()
	var n int
	if err := f.db.QueryRow(f.ctx, `SELECT count(*) FROM troupe_timers WHERE id LIKE $1 OR id LIKE $2`,
		"saga-http/"+id+"/%", "saga-deadline/"+id+"/%").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// retryLater answers an intercepted request 503 with a Retry-After of
// seconds, without handing it to the participant.
func retryLater(w http.ResponseWriter, seconds string) {
	w.Header().Set("Retry-After", seconds)
	http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
}

// A branch abandoned when another refuses (its call being retried after a
// 503) has its call and its deadline withdrawn: nothing of the saga is
// left to run once it has compensated.
func TestGroup_AnAbandonedBranchLeavesNoCallOrDeadlineBehind(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit, stock := f.addHolder("credit", 100), f.addHolder("stock", 1)
			f.start(saga.Step[tripData]{Name: "g", Parallel: []saga.Step[tripData]{httpStep(credit), httpStep(stock)}})
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "action" {
					retryLater(w, "30")
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "b1", Credit: 40, Stock: 3}) // stock refuses: over its capacity
			f.waitStatus("b1", saga.Compensated)
			if n := sagaTimers(t, f, "trip-b1"); n != 0 {
				t.Fatalf("%d timers of the compensated saga left: want its abandoned call and deadline withdrawn", n)
			}
			if n := len(credit.calls(saga.Action)); n != 1 {
				t.Fatalf("credit's action called %d times, want once", n)
			}
		})
	}
}

// An HTTP action retried after 503s until its deadline counts as failed;
// its call is withdrawn with it, not made again after the saga compensated.
func TestHTTPStep_AnActionPastItsDeadlineIsNotCalledAgain(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			called := make(chan struct{}, 10)
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "action" {
					called <- struct{}{}
					retryLater(w, "120")
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "d1", Credit: 40})
			receive(t, called, "the action's first call")
			// Once the 503 is recorded (the call is due again in 120 s, past
			// the lease it held during the call): a
			// deadline that fires while that write holds the call's row
			// cannot withdraw it (TryCancelTx skips locked rows), a race
			// this test does not cover.
			for deadline := time.Now().Add(20 * time.Second); ; {
				var n int
				err := f.db.QueryRow(f.ctx, `SELECT count(*) FROM troupe_timers WHERE id LIKE $1 AND due_at > $2`,
					"saga-http/trip-d1/%", f.clock.Now().Add(90*time.Second).UTC()).Scan(&n)
				if err == nil && n == 1 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the 503 was not recorded (%v)", err)
				}
				time.Sleep(5 * time.Millisecond)
			}
			f.clock.Advance(time.Minute) // the step's deadline
			in := f.waitStatus("d1", saga.Compensated)
			if !strings.Contains(in.Reason, "deadline") {
				t.Fatalf("reason %q: want the deadline", in.Reason)
			}
			if n := sagaTimers(t, f, "trip-d1"); n != 0 {
				t.Fatalf("%d timers of the compensated saga left: want the action's call withdrawn", n)
			}
		})
	}
}

// How an HTTP action's status decides: 409 and 422 are refusals with the
// body as reason (nothing to undo); another 4xx or a 3xx is a refusal too; a 5xx on
// every attempt is no answer: the action may have run, so it is
// compensated.
func TestHTTPStep_TheStatusDecidesBetweenRefusalAndNoAnswer(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			status := map[string]int{"s409": 409, "s422": 422, "s404": 404, "s302": 302, "s500": 500}
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				code := status[strings.TrimPrefix(r.Header.Get(saga.HeaderSagaID), "trip-")]
				if r.Header.Get(saga.HeaderOp) != "action" || code == 0 {
					next.ServeHTTP(w, r)
					return
				}
				http.Error(w, "no credit for you", code)
			})
			for _, c := range []struct {
				id          string
				reason      string // the saga's reason, or part of it (exact false)
				exact       bool
				compensated bool // the step's own compensation was called
			}{
				{"s409", "no credit for you", true, false},
				{"s422", "no credit for you", true, false},
				{"s404", "HTTP 404", false, false},
				{"s302", "HTTP 302", false, false}, // not followed
				{"s500", "failed after 3 calls", false, true},
			} {
				f.begin(tripData{ID: c.id, Credit: 40})
				in := waitEnded(t, f, c.id, saga.Compensated)
				if c.exact && in.Reason != c.reason || !strings.Contains(in.Reason, c.reason) {
					t.Errorf("%s: reason %q, want it to contain %q", c.id, in.Reason, c.reason)
				}
				var comp int
				for _, h := range credit.calls(saga.Compensation) {
					if h.Get(saga.HeaderSagaID) == "trip-"+c.id {
						comp++
					}
				}
				if got := comp > 0; got != c.compensated {
					t.Errorf("%s: the step's compensation called %d times, want called: %v", c.id, comp, c.compensated)
				}
			}
		})
	}
}

// Identical calls of one action at once (a timed-out call and its retry,
// two orchestrator instances): the action runs once and every call gets
// its answer, data included.
func TestParticipantHTTPHandler_ConcurrentIdenticalCallsActOnceAndAllGetTheAnswer(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			const n = 6
			type answer struct {
				code int
				body string
			}
			answers := make(chan answer, n)
			start := make(chan struct{})
			for range n {
				go func() {
					<-start
					req, err := http.NewRequest("POST", credit.url(), strings.NewReader(`{"amount":30}`))
					if err != nil {
						answers <- answer{code: -1, body: err.Error()}
						return
					}
					req.Header.Set(saga.HeaderSagaID, "s1")
					req.Header.Set(saga.HeaderStep, "credit")
					req.Header.Set(saga.HeaderOp, "action")
					req.Header.Set(timer.IdempotencyKeyHeader, "saga-http/s1/credit/action")
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						answers <- answer{code: -1, body: err.Error()}
						return
					}
					defer resp.Body.Close()
					var b strings.Builder
					_, _ = io.Copy(&b, resp.Body)
					answers <- answer{resp.StatusCode, strings.TrimSpace(b.String())}
				}()
			}
			close(start)
			for range n {
				if a := receive(t, answers, "an answer"); a.code != 200 || a.body != `{"held":30}` {
					t.Errorf("answer %d %q, want 200 {\"held\":30}", a.code, a.body)
				}
			}
			if got, a := credit.held(), credit.actions.Load(); got != 30 || a != 1 {
				t.Fatalf("credit holds %d after %d runs of the action, want 30 after 1", got, a)
			}
		})
	}
}

// Two groups in a row: the second forks once the first has joined, and a
// refusal after them undoes every branch of both, the later group first.
func TestGroup_TwoGroupsInARowRunAndCompensateEveryBranch(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			f.start(
				saga.Step[tripData]{Name: "g1", Parallel: []saga.Step[tripData]{logStep("a", "a", "-a"), logStep("b", "b", "-b")}},
				saga.Step[tripData]{Name: "g2", Parallel: []saga.Step[tripData]{logStep("c", "c", "-c"), logStep("d", "d", "-d")}},
				confirmStep(),
			)
			f.begin(tripData{ID: "g1"})
			waitEnded(t, f, "g1", saga.Completed)
			if got := f.tripLog("g1"); !slices.Equal(got, []string{"a", "b", "c", "d", "confirmed"}) {
				t.Fatalf("trip log %q: want both groups, then the next step", got)
			}
			f.begin(tripData{ID: "g2", Fraud: true})
			waitEnded(t, f, "g2", saga.Compensated)
			if got := f.tripLog("g2"); !slices.Equal(got, []string{"a", "b", "c", "d", "-c", "-d", "-a", "-b"}) {
				t.Fatalf("trip log %q: want the second group's branches undone, then the first's", got)
			}
		})
	}
}

// A local branch that refuses when its group is entered sends none of the
// other branches: the saga compensates the local branches that ran and the
// steps before the group.
func TestGroup_ALocalBranchThatRefusesSendsNothingAndCompensates(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			f.start(
				logStep("note", "noted", "unnoted"),
				saga.Step[tripData]{Name: "g", Parallel: []saga.Step[tripData]{
					logStep("label", "labelled", "unlabelled"),
					{Name: "check", Local: func(context.Context, sqldb.Tx, string, *tripData) error {
						return saga.Refuse(errors.New("address unknown"))
					}},
					httpStep(credit),
				}},
			)
			f.begin(tripData{ID: "l1", Credit: 40})
			in := waitEnded(t, f, "l1", saga.Compensated)
			if in.Reason != "address unknown" {
				t.Fatalf("reason %q, want the local branch's refusal", in.Reason)
			}
			if got := f.tripLog("l1"); !slices.Equal(got, []string{"noted", "labelled", "unlabelled", "unnoted"}) {
				t.Fatalf("trip log %q", got)
			}
			if n := len(credit.calls(saga.Action)) + len(credit.calls(saga.Compensation)); n != 0 {
				t.Fatalf("%d calls of the HTTP branch, want none: it never started", n)
			}
			if n := sagaTimers(t, f, "trip-l1"); n != 0 {
				t.Fatalf("%d timers left, want none", n)
			}
		})
	}
}

// An HTTP step with a CompensationURL is undone there, the action at URL.
func TestHTTPStep_ACompensationGoesToItsCompensationURL(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			step := httpStep(credit)
			step.CompensationURL = credit.srv.URL + "/release"
			f.start(step, confirmStep())
			var mu sync.Mutex
			paths := map[string]string{}
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				mu.Lock()
				paths[r.Header.Get(saga.HeaderOp)] = r.URL.Path
				mu.Unlock()
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "u1", Credit: 40, Fraud: true})
			waitEnded(t, f, "u1", saga.Compensated)
			mu.Lock()
			defer mu.Unlock()
			if paths["action"] != "/hold" || paths["compensation"] != "/release" {
				t.Fatalf("paths %v: want the action at /hold, the compensation at /release", paths)
			}
			if got := credit.held(); got != 0 {
				t.Fatalf("credit holds %d, want 0", got)
			}
		})
	}
}
