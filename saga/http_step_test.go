package saga_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/timer"
)

// newHTTPFleet returns a fleet whose trip saga notes the trip, holds
// credit over HTTP, and confirms; no broker.
func newHTTPFleet(t *testing.T, kind string) (*fleet, *holder) {
	t.Helper()
	f := newFleet(t, kind, false)
	credit := f.addHolder("credit", 100)
	f.start(logStep("note", "noted", "unnoted"), httpStep(credit), confirmStep())
	return f, credit
}

// hold keeps an intercepted request until release is closed (or the test
// ends: ok false), having read its body so that the request can still be
// served once its caller has gone.
func hold(h *holder, r *http.Request, arrived chan<- struct{}, release <-chan struct{}) (*http.Request, bool) {
	body, _ := io.ReadAll(r.Body)
	r = r.WithContext(context.WithoutCancel(r.Context()))
	r.Body = io.NopCloser(bytes.NewReader(body))
	arrived <- struct{}{}
	select {
	case <-release:
		return r, true
	case <-h.released:
		return nil, false
	}
}

func TestHTTPStep_TheResponseIsTheReply(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			f.begin(tripData{ID: "h1", Credit: 40})
			in := f.waitStatus("h1", saga.Completed)
			if got := credit.held(); got != 40 {
				t.Fatalf("credit holds %d, want 40", got)
			}
			if d := data(t, in); d.Held["credit"] != 40 {
				t.Fatalf("data %+v: want the response body read by OnReply", d)
			}
			if got := f.tripLog("h1"); !slices.Equal(got, []string{"noted", "confirmed"}) {
				t.Fatalf("trip log %q", got)
			}
			calls := credit.calls(saga.Action)
			if len(calls) != 1 {
				t.Fatalf("%d calls, want 1", len(calls))
			}
			for k, want := range map[string]string{
				saga.HeaderSagaID: "trip-h1", saga.HeaderStep: "credit", saga.HeaderOp: "action", saga.HeaderSource: "/services/order",
				timer.AttemptHeader: "1", "Content-Type": "application/json",
			} {
				if got := calls[0].Get(k); got != want {
					t.Errorf("header %s: %q, want %q", k, got, want)
				}
			}
			if calls[0].Get(timer.IdempotencyKeyHeader) == "" {
				t.Error("no Idempotency-Key")
			}
			var replies int
			if err := credit.db.QueryRow(f.ctx, `SELECT count(*) FROM troupe_outbox`).Scan(&replies); err != nil || replies != 0 {
				t.Fatalf("%d replies in the participant's outbox (%v): the response is the reply", replies, err)
			}
		})
	}
}

func TestHTTPStep_ARefusalCompensatesTheStepsBeforeAndACompensationIsCalled(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			f.begin(tripData{ID: "h2", Credit: 500}) // refused: 409
			in := f.waitStatus("h2", saga.Compensated)
			if in.Reason != "credit: not enough" {
				t.Fatalf("reason %q, want the response's", in.Reason)
			}
			if got := f.tripLog("h2"); !slices.Equal(got, []string{"noted", "unnoted"}) {
				t.Fatalf("trip log %q", got)
			}
			if n := len(credit.calls(saga.Compensation)); n != 0 {
				t.Fatalf("%d compensation calls for a refused action, want none", n)
			}

			f.begin(tripData{ID: "h3", Credit: 30, Fraud: true}) // held, then undone over HTTP
			f.waitStatus("h3", saga.Compensated)
			if got, r := credit.held(), credit.releases.Load(); got != 0 || r != 1 {
				t.Fatalf("credit holds %d after %d releases, want 0 after 1", got, r)
			}
			comp := credit.calls(saga.Compensation)
			if len(comp) != 1 || comp[0].Get(saga.HeaderSagaID) != "trip-h3" {
				t.Fatalf("compensation calls %v, want one for trip-h3", comp)
			}
			var actionKey string
			for _, c := range credit.calls(saga.Action) {
				if c.Get(saga.HeaderSagaID) == "trip-h3" {
					actionKey = c.Get(timer.IdempotencyKeyHeader)
				}
			}
			if k := comp[0].Get(timer.IdempotencyKeyHeader); k == "" || k == actionKey {
				t.Fatalf("compensation's Idempotency-Key %q, action's %q: want one of its own", k, actionKey)
			}
		})
	}
}

// The participant acts, but its answer is lost twice (503): the calls are
// made again with the same Idempotency-Key, and it acts once.
func TestHTTPStep_TransientFailuresAreRetriedWithTheSameKeyForOneEffect(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			var n atomic.Int32
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) == "action" && n.Add(1) <= 2 {
					next.ServeHTTP(httptest.NewRecorder(), r)
					http.Error(w, "try later", http.StatusServiceUnavailable)
					return
				}
				next.ServeHTTP(w, r)
			})
			f.begin(tripData{ID: "h4", Credit: 40})
			in := f.waitStatus("h4", saga.Completed)
			if got, a := credit.held(), credit.actions.Load(); got != 40 || a != 1 {
				t.Fatalf("credit holds %d after %d runs of the action, want 40 after 1", got, a)
			}
			if d := data(t, in); d.Held["credit"] != 40 {
				t.Fatalf("data %+v: want the first answer's data, given again", d)
			}
			calls := credit.calls(saga.Action)
			if len(calls) != 3 {
				t.Fatalf("%d calls, want 3", len(calls))
			}
			for i, c := range calls {
				if c.Get(timer.IdempotencyKeyHeader) != calls[0].Get(timer.IdempotencyKeyHeader) || c.Get(timer.AttemptHeader) != strconv.Itoa(i+1) {
					t.Fatalf("call %d: key %q attempt %q: want the first call's key and attempt %d", i+1, c.Get(timer.IdempotencyKeyHeader), c.Get(timer.AttemptHeader), i+1)
				}
			}
		})
	}
}

// The participant never answers: at the step's deadline the saga
// compensates; the compensation, first to land, is a no-op, and the late
// action is refused by the barrier.
func TestHTTPStep_ACallNeverAnsweredIsCompensatedAndTheLateActionRefused(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			arrived, release, late := make(chan struct{}, 10), make(chan struct{}), make(chan int, 10)
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) != "action" {
					next.ServeHTTP(w, r)
					return
				}
				r, ok := hold(credit, r, arrived, release)
				if !ok {
					return
				}
				rec := httptest.NewRecorder()
				next.ServeHTTP(rec, r)
				late <- rec.Code
			})
			f.begin(tripData{ID: "h5", Credit: 40})
			receive(t, arrived, "the action's call")
			f.clock.Advance(time.Minute) // its deadline
			in := f.waitStatus("h5", saga.Compensated)
			if !strings.Contains(in.Reason, "deadline") {
				t.Fatalf("reason %q: want the deadline", in.Reason)
			}
			close(release)
			if code := receive(t, late, "the late action's answer"); code != http.StatusConflict {
				t.Fatalf("the late action was answered %d, want 409: refused by the barrier", code)
			}
			if got, a, r := credit.held(), credit.actions.Load(), credit.releases.Load(); got != 0 || a != 0 || r != 0 {
				t.Fatalf("credit holds %d, action ran %d times, compensation %d: want nothing done", got, a, r)
			}
			if got := f.tripLog("h5"); !slices.Equal(got, []string{"noted", "unnoted"}) {
				t.Fatalf("trip log %q", got)
			}
		})
	}
}

// The orchestrator is killed while its call is under way (its scheduler
// stops); the call lands anyway. A new orchestrator on the same database
// calls again, gets the first answer, and the saga ends with one effect.
func TestHTTPStep_AnOrchestratorKilledMidCallMakesOneEffect(t *testing.T) {
	t.Parallel()
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			f, credit := newHTTPFleet(t, kind)
			arrived, release, applied := make(chan struct{}, 1), make(chan struct{}), make(chan struct{}, 1)
			var first atomic.Bool
			credit.setIntercept(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
				if r.Header.Get(saga.HeaderOp) != "action" || !first.CompareAndSwap(false, true) {
					next.ServeHTTP(w, r)
					return
				}
				r, ok := hold(credit, r, arrived, release)
				if !ok {
					return
				}
				next.ServeHTTP(httptest.NewRecorder(), r) // its caller is gone
				applied <- struct{}{}
			})
			f.begin(tripData{ID: "h6", Credit: 40})
			receive(t, arrived, "the action's call")
			f.stopOwner()
			close(release)
			receive(t, applied, "the action applied")
			f.startOwner()
			in := f.waitStatus("h6", saga.Completed)
			if got, a := credit.held(), credit.actions.Load(); got != 40 || a != 1 {
				t.Fatalf("credit holds %d after %d runs of the action, want 40 after 1", got, a)
			}
			if d := data(t, in); d.Held["credit"] != 40 {
				t.Fatalf("data %+v: want the first answer's data", d)
			}
			if calls := credit.calls(saga.Action); len(calls) != 2 || calls[1].Get(timer.IdempotencyKeyHeader) != calls[0].Get(timer.IdempotencyKeyHeader) {
				t.Fatalf("calls %v: want a second with the first one's key", calls)
			}
		})
	}
}

// receive receives from ch, failing the test after 20 s.
func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func TestParticipantHTTPHandler_AnswersByTheProtocol(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			f := newFleet(t, kind, false)
			credit := f.addHolder("credit", 100)
			call := func(method, sagaID, op, body string) (int, string) {
				t.Helper()
				req, err := http.NewRequest(method, credit.url(), strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				if sagaID != "" {
					req.Header.Set(saga.HeaderSagaID, sagaID)
					req.Header.Set(saga.HeaderStep, "credit")
					req.Header.Set(saga.HeaderOp, op)
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, strings.TrimSpace(string(b))
			}
			type answer struct {
				code int
				body string
			}
			for _, c := range []struct {
				name                   string
				method, saga, op, body string
				want                   answer
			}{
				{"an action", "POST", "s1", "action", `{"amount":30}`, answer{200, `{"held":30}`}},
				{"the action again: its first answer", "POST", "s1", "action", `{"amount":30}`, answer{200, `{"held":30}`}},
				{"a refusal", "POST", "s2", "action", `{"amount":500}`, answer{409, "credit: not enough"}},
				{"the refusal again", "POST", "s2", "action", `{"amount":500}`, answer{409, "credit: not enough"}},
				{"a compensation before its action: a no-op", "POST", "s3", "compensation", `{"amount":30}`, answer{200, ""}},
				{"the late action: refused", "POST", "s3", "action", `{"amount":30}`, answer{409, "refused: the step was compensated before this action arrived"}},
				{"not POST", "GET", "s4", "action", "", answer{405, "saga steps are called with POST"}},
			} {
				if code, body := call(c.method, c.saga, c.op, c.body); code != c.want.code || body != c.want.body {
					t.Errorf("%s: %d %q, want %d %q", c.name, code, body, c.want.code, c.want.body)
				}
			}
			if code, _ := call("POST", "", "", "{}"); code != http.StatusBadRequest {
				t.Errorf("a call without the saga headers: %d, want 400", code)
			}
			if got, a := credit.held(), credit.actions.Load(); got != 30 || a != 2 {
				t.Fatalf("credit holds %d after %d runs of the action, want 30 after 2 (s1 once, s2 refused once)", got, a)
			}
		})
	}
}
