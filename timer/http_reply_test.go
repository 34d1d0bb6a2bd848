package timer_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// outcomes is an OnDone handler that records each outcome it is given, as
// a row in effects (written through the handler's transaction) and in
// memory (the Fired it got).
type outcomes struct {
	mu  sync.Mutex
	got []timer.HTTPOutcome
	// fail, while positive, makes the handler fail (and counts down).
	fail atomic.Int32
}

func (o *outcomes) handle(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	out, err := timer.HTTPOutcomeOf(f)
	if err != nil {
		return err
	}
	if o.fail.Add(-1) >= 0 {
		// Its write must roll back with the failure.
		if _, err := tx.Exec(ctx, `INSERT INTO effects (timer_id, owner) VALUES ($1, 'failed-handler')`, f.ID); err != nil {
			return err
		}
		return errors.New("ledger unavailable")
	}
	if _, err := tx.Exec(ctx, `INSERT INTO effects (timer_id, owner) VALUES ($1, $2)`, f.ID, string(out.Body)); err != nil {
		return err
	}
	o.mu.Lock()
	o.got = append(o.got, out)
	o.mu.Unlock()
	return nil
}

// committedOutcomes counts the outcomes whose OnDone transaction committed:
// the handler records an outcome in the list before its transaction
// commits, so a test reading the database waits for this count too.
func committedOutcomes(t *testing.T, db *sqldb.DB) int {
	t.Helper()
	return countRows(t, db, `SELECT count(*) FROM effects WHERE owner <> 'failed-handler'`)
}

func (o *outcomes) list() []timer.HTTPOutcome {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]timer.HTTPOutcome(nil), o.got...)
}

// newDoneScheduler returns a scheduler with the OnDone handler "done".
func newDoneScheduler(t *testing.T, db *sqldb.DB, cfg timer.Config) (*timer.Scheduler, *outcomes) {
	t.Helper()
	s := newScheduler(t, db, cfg)
	o := &outcomes{}
	if err := s.Handle("done", o.handle); err != nil {
		t.Fatal(err)
	}
	return s, o
}

func TestHTTP_OnDoneGetsTheResponseInTheTransactionThatDeletesTheTask(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, _ int) {
				w.Header().Set("Content-Type", "application/json")
				w.Write([]byte(`{"reserved":40}`))
			})
			s, o := newDoneScheduler(t, db, timer.Config{Clock: clock})
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{ID: "reserve-1", URL: rc.url("/reserve"), OnDone: "done", Meta: map[string]string{"sagaid": "s-1"}})
			runStoppable(t, s)
			waitFor(t, "OnDone", func() bool { return len(o.list()) == 1 && committedOutcomes(t, db) == 1 })
			got := o.list()[0]
			if got.TaskID != id || got.Status != 200 || string(got.Body) != `{"reserved":40}` || got.ContentType != "application/json" ||
				got.Err != "" || got.Meta["sagaid"] != "s-1" || len(got.Meta) != 1 {
				t.Fatalf("OnDone got %+v, want the 200 with its body, no error, and the task's Meta", got)
			}
			if st := readTask(t, db, id); st.exists {
				t.Fatalf("task still stored after OnDone: %+v", st)
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1 AND owner = $2`, id, `{"reserved":40}`); n != 1 {
				t.Fatalf("%d effects of OnDone, want 1", n)
			}
		})
	}
}

// A refusal (a 4xx that is not retried) and the last of failed attempts
// end the task too: OnDone decides, and the task is not kept failed.
func TestHTTP_OnDoneIsToldOfARefusalAndOfTheLastFailedAttempt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, _ int) {
				if r.URL.Path == "/refuse" {
					http.Error(w, "credit limit exceeded", http.StatusConflict)
					return
				}
				http.Error(w, "busy", http.StatusServiceUnavailable)
			})
			s, o := newDoneScheduler(t, db, timer.Config{Clock: clock, Backoff: everyRetryAfter(0)})
			refused := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/refuse"), OnDone: "done", MaxAttempts: 5})
			busy := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/busy"), OnDone: "done", MaxAttempts: 2})
			runStoppable(t, s)
			waitFor(t, "two outcomes", func() bool { return len(o.list()) == 2 && committedOutcomes(t, db) == 2 })
			byID := map[string]timer.HTTPOutcome{}
			for _, out := range o.list() {
				byID[out.TaskID] = out
			}
			if r := byID[refused]; r.Status != http.StatusConflict || strings.TrimSpace(string(r.Body)) != "credit limit exceeded" || !strings.Contains(r.Err, "409") {
				t.Errorf("refused task: %+v, want the 409 with its body and error", r)
			}
			if b := byID[busy]; b.Status != http.StatusServiceUnavailable || b.Err == "" {
				t.Errorf("busy task: %+v, want its last 503 as a failure", b)
			}
			if n, m := len(rc.requests("/refuse")), len(rc.requests("/busy")); n != 1 || m != 2 {
				t.Errorf("%d calls of the refusing URL, %d of the busy one: want 1 and MaxAttempts (2)", n, m)
			}
			if f := failedByID(t, s); len(f) != 0 {
				t.Errorf("failed tasks kept %+v: OnDone took their outcome", f)
			}
		})
	}
}

// A failing OnDone rolls back its writes and has the call made again, with
// the same Idempotency-Key; the outcome is applied once.
func TestHTTP_AFailingOnDoneIsTriedAgainWithTheCall(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, _ int) { w.Write([]byte("ok")) })
			s, o := newDoneScheduler(t, db, timer.Config{Clock: clock, Backoff: everyRetryAfter(0)})
			o.fail.Store(1)
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/job"), OnDone: "done"})
			runStoppable(t, s)
			waitFor(t, "OnDone", func() bool { return len(o.list()) == 1 && committedOutcomes(t, db) == 1 })
			reqs := rc.requests("/job")
			if len(reqs) != 2 || reqs[0].Header.Get(timer.IdempotencyKeyHeader) != id || reqs[1].Header.Get(timer.IdempotencyKeyHeader) != id {
				t.Fatalf("%d calls, want 2 with the task's id as Idempotency-Key", len(reqs))
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE owner = 'failed-handler'`); n != 0 {
				t.Fatalf("the failed handler's write was kept")
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1`, id); n != 1 {
				t.Fatalf("%d effects, want 1", n)
			}
		})
	}
}

// A scheduler stopped mid-call hands the task back; the next one calls
// again and runs OnDone once.
func TestHTTP_OnDoneRunsOnceWhenTheSchedulerStopsMidCall(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			called := make(chan struct{}, 1)
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					called <- struct{}{}
					<-r.Context().Done()
					return
				}
				w.Write([]byte("second"))
			})
			a, oa := newDoneScheduler(t, db, timer.Config{Clock: clock, Owner: "a"})
			id := scheduleHTTP(t, a, t0, timer.HTTPTask{URL: rc.url("/job"), OnDone: "done"})
			stopA := runStoppable(t, a)
			receive(t, called, "the first call")
			stopA()
			b, ob := newDoneScheduler(t, db, timer.Config{Clock: clock, Owner: "b"})
			runStoppable(t, b)
			waitFor(t, "B's OnDone", func() bool { return len(ob.list()) == 1 && committedOutcomes(t, db) == 1 })
			if len(oa.list()) != 0 {
				t.Fatalf("A's OnDone ran for a call cut short: %+v", oa.list())
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1`, id); n != 1 {
				t.Fatalf("%d effects, want 1", n)
			}
		})
	}
}

func TestScheduleHTTPTx_RefusesMetaItCannotHandBack(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	s := newScheduler(t, db, timer.Config{Clock: newClock()})
	for name, task := range map[string]timer.HTTPTask{
		"meta without OnDone": {URL: "http://example.test/x", Meta: map[string]string{"sagaid": "s"}},
		"upper-case name":     {URL: "http://example.test/x", OnDone: "done", Meta: map[string]string{"SagaID": "s"}},
		"reserved name":       {URL: "http://example.test/x", OnDone: "done", Meta: map[string]string{timer.ExtHTTPStatus: "200"}},
		"core attribute":      {URL: "http://example.test/x", OnDone: "done", Meta: map[string]string{"subject": "x"}},
	} {
		if _, err := s.ScheduleHTTP(context.Background(), t0, task); !errors.Is(err, timer.ErrInvalidTimer) {
			t.Errorf("%s: %v, want ErrInvalidTimer", name, err)
		}
	}
}
