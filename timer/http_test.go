package timer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// received is one request an HTTP task made.
type received struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
	// At is the fake clock's time when the request arrived.
	At time.Time
}

// receiver is an HTTP server that records the requests it gets and answers
// with respond, which is told how many requests its path has had, this one
// included.
type receiver struct {
	clock   *clocktest.Clock
	respond func(w http.ResponseWriter, r *http.Request, n int)
	srv     *httptest.Server

	mu    sync.Mutex
	reqs  []received
	count map[string]int
}

func newReceiver(t testing.TB, clock *clocktest.Clock, respond func(w http.ResponseWriter, r *http.Request, n int)) *receiver {
	t.Helper()
	rc := &receiver{clock: clock, respond: respond, count: map[string]int{}}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	return rc
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	rc.reqs = append(rc.reqs, received{Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), Body: body, At: rc.clock.Now()})
	rc.count[r.URL.Path]++
	n := rc.count[r.URL.Path]
	rc.mu.Unlock()
	rc.respond(w, r, n)
}

func (rc *receiver) url(path string) string { return rc.srv.URL + path }

// requests returns the requests made to path, in arrival order.
func (rc *receiver) requests(path string) []received {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var out []received
	for _, r := range rc.reqs {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// receive receives from ch, failing the test after 20 s.
func receive[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// firedChan returns an OnFired that passes every report to the channel.
func firedChan() (chan timer.Fired, func([]timer.Fired)) {
	ch := make(chan timer.Fired, 100)
	return ch, func(fs []timer.Fired) {
		for _, f := range fs {
			ch <- f
		}
	}
}

func scheduleHTTP(t testing.TB, s *timer.Scheduler, at time.Time, task timer.HTTPTask) string {
	t.Helper()
	id, err := s.ScheduleHTTP(context.Background(), at, task)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// taskState is an HTTP task's row as stored.
type taskState struct {
	exists    bool
	due       time.Time
	attempts  int
	lastError string
	failed    bool
}

func readTask(t testing.TB, db *sqldb.DB, id string) taskState {
	t.Helper()
	st := taskState{exists: true}
	var failed int
	err := db.QueryRow(context.Background(), `SELECT due_at, attempts, last_error, CASE WHEN failed_at IS NULL THEN 0 ELSE 1 END FROM troupe_timers WHERE id = $1`, id).
		Scan(&st.due, &st.attempts, &st.lastError, &failed)
	if errors.Is(err, sqldb.ErrNoRows) {
		return taskState{}
	}
	if err != nil {
		t.Fatal(err)
	}
	st.due, st.failed = st.due.UTC(), failed == 1
	return st
}

func failedByID(t testing.TB, s *timer.Scheduler) map[string]timer.FailedTimer {
	t.Helper()
	fs, err := s.Failed(context.Background(), 100)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]timer.FailedTimer{}
	for _, f := range fs {
		out[f.ID] = f
	}
	return out
}

// everyRetryAfter is a Backoff of d for every attempt: deterministic retries.
func everyRetryAfter(d time.Duration) func(int) time.Duration {
	return func(int) time.Duration { return d }
}

// logCapture is a slog handler that keeps every record, so a test can wait
// for the scheduler to have reached a point it logs.
type logCapture struct {
	mu    *sync.Mutex
	recs  *[]logRecord
	attrs []slog.Attr
}

type logRecord struct {
	Level slog.Level
	Msg   string
	Attrs map[string]string
}

func newLogCapture() *logCapture {
	return &logCapture{mu: &sync.Mutex{}, recs: &[]logRecord{}}
}

func (h *logCapture) Enabled(context.Context, slog.Level) bool { return true }

func (h *logCapture) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{Level: r.Level, Msg: r.Message, Attrs: map[string]string{}}
	for _, a := range h.attrs {
		rec.Attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.Attrs[a.Key] = a.Value.String()
		return true
	})
	h.mu.Lock()
	*h.recs = append(*h.recs, rec)
	h.mu.Unlock()
	return nil
}

func (h *logCapture) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &c
}

func (h *logCapture) WithGroup(string) slog.Handler { return h }

// has reports whether a record matching ok was logged.
func (h *logCapture) has(ok func(logRecord) bool) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range *h.recs {
		if ok(r) {
			return true
		}
	}
	return false
}

func TestScheduleHTTP_CallsTheURLWhenDueWithTheTasksRequestThenDeletesIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusNoContent) })
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, OnFired: onFired})
			due := t0.Add(time.Minute)
			id := scheduleHTTP(t, s, due, timer.HTTPTask{
				ID:     "invoice-42",
				Method: http.MethodPut,
				URL:    rc.url("/jobs/invoice"),
				Header: http.Header{"X-Tenant": {"acme"}, "Content-Type": {"application/json"}},
				Body:   []byte(`{"invoice":42}`),
			})
			if id != "invoice-42" {
				t.Fatalf("ScheduleHTTP returned id %q, want the task's", id)
			}
			runStoppable(t, s)
			clock.Advance(59 * time.Second)
			var f timer.Fired
			driveClock(t, db, clock, time.Second, "OnFired", gotFired(fired, &f))
			if f.ID != id || f.Kind != timer.KindHTTP || f.Attempt != 1 || !f.Due.Equal(due) || f.At.Before(due) {
				t.Fatalf("OnFired got %+v, want id %q, kind http, attempt 1, due %v, at or after it", f, id, due)
			}
			reqs := rc.requests("/jobs/invoice")
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			r := reqs[0]
			if r.At.Before(due) {
				t.Errorf("called at %v, before its due time %v", r.At, due)
			}
			if r.Method != http.MethodPut || string(r.Body) != `{"invoice":42}` {
				t.Errorf("request %s %q, want PUT {\"invoice\":42}", r.Method, r.Body)
			}
			for k, want := range map[string]string{
				"X-Tenant":                 "acme",
				"Content-Type":             "application/json",
				timer.IdempotencyKeyHeader: id,
				timer.AttemptHeader:        "1",
			} {
				if got := r.Header.Get(k); got != want {
					t.Errorf("header %s = %q, want %q", k, got, want)
				}
			}
			if st := readTask(t, db, id); st.exists {
				t.Fatalf("task still stored after a 2xx: %+v", st)
			}
		})
	}
}

func TestHTTP_RetriesA503AfterTheBackoffWithTheSameIdempotencyKey(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, n int) {
				if n == 1 {
					http.Error(w, "busy", http.StatusServiceUnavailable)
				}
			})
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, OnFired: onFired, Backoff: everyRetryAfter(10 * time.Second)})
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/flaky")})
			runStoppable(t, s)

			waitFor(t, "the 503 recorded", func() bool { return readTask(t, db, id).lastError != "" })
			st := readTask(t, db, id)
			if st.failed || st.attempts != 1 || !st.due.Equal(t0.Add(10*time.Second)) || !strings.Contains(st.lastError, "503") {
				t.Fatalf("after a 503: %+v, want a retry due at %v after 1 attempt, with the status in the error", st, t0.Add(10*time.Second))
			}
			var f timer.Fired
			driveClock(t, db, clock, 10*time.Second, "OnFired", gotFired(fired, &f))
			if f.ID != id || f.Attempt != 2 {
				t.Fatalf("OnFired got %+v, want %q on attempt 2", f, id)
			}
			reqs := rc.requests("/flaky")
			if len(reqs) != 2 {
				t.Fatalf("%d requests, want 2", len(reqs))
			}
			if reqs[1].At.Before(t0.Add(10 * time.Second)) {
				t.Errorf("retried at %v, before the backoff ended", reqs[1].At)
			}
			for i, r := range reqs {
				if got := r.Header.Get(timer.IdempotencyKeyHeader); got != id {
					t.Errorf("attempt %d: Idempotency-Key %q, want %q", i+1, got, id)
				}
				if got, want := r.Header.Get(timer.AttemptHeader), fmt.Sprint(i+1); got != want {
					t.Errorf("request %d: Troupe-Attempt %q, want %q", i+1, got, want)
				}
			}
			if st := readTask(t, db, id); st.exists {
				t.Fatalf("task still stored after the 200: %+v", st)
			}
		})
	}
}

func TestHTTP_RetryAfterDelaysTheRetryBeyondTheBackoff(t *testing.T) {
	cases := []struct {
		name       string
		retryAfter string
		want       time.Duration // from the response to the retry
	}{
		{"seconds", "120", 120 * time.Second},
		{"http-date", t0.Add(300 * time.Second).Format(http.TimeFormat), 300 * time.Second},
		{"shorter than the backoff", "1", 5 * time.Second},
		{"unreadable", "soon", 5 * time.Second},
		{"huge, capped at an hour", "9300000000", time.Hour},
		{"beyond int64, capped at an hour", "99999999999999999999", time.Hour},
	}
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			byPath := map[string]string{}
			for i, c := range cases {
				byPath[fmt.Sprint("/c", i)] = c.retryAfter
			}
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					w.Header().Set("Retry-After", byPath[r.URL.Path])
					http.Error(w, "slow down", http.StatusTooManyRequests)
				}
			})
			s := newScheduler(t, db, timer.Config{Clock: clock, Backoff: everyRetryAfter(5 * time.Second)})
			ids := make([]string, len(cases))
			for i := range cases {
				ids[i] = scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url(fmt.Sprint("/c", i))})
			}
			runStoppable(t, s)
			for i, c := range cases {
				waitFor(t, c.name+": the 429 recorded", func() bool { return readTask(t, db, ids[i]).lastError != "" })
				st := readTask(t, db, ids[i])
				if want := t0.Add(c.want); !st.due.Equal(want) || st.failed {
					t.Errorf("%s: Retry-After %q: retry due at %v (failed %v), want %v", c.name, c.retryAfter, st.due, st.failed, want)
				}
			}
			// The 120 s one is called again only once the clock has passed
			// its Retry-After.
			clock.Set(t0.Add(120 * time.Second))
			waitFor(t, "the retry after 120 s", func() bool { return !readTask(t, db, ids[0]).exists })
			reqs := rc.requests("/c0")
			if len(reqs) != 2 || reqs[1].At.Before(t0.Add(120*time.Second)) {
				t.Fatalf("requests %+v, want a second one at or after %v", reqs, t0.Add(120*time.Second))
			}
		})
	}
}

func TestHTTP_ANon2xxAnswerThatRetryingCannotMendFailsAtOnceAndRetryTxRearmsIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			var healed atomic.Bool
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, _ int) {
				switch {
				case healed.Load():
				case r.URL.Path == "/gone":
					http.Error(w, "no such job: 7", http.StatusNotFound)
				case r.URL.Path == "/moved":
					http.Redirect(w, r, "/elsewhere", http.StatusFound)
				}
			})
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, OnFired: onFired})
			gone := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/gone")})
			moved := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/moved")})
			runStoppable(t, s)

			waitFor(t, "both tasks failed", func() bool { return len(failedByID(t, s)) == 2 })
			failed := failedByID(t, s)
			if f := failed[gone]; f.Kind != timer.KindHTTP || f.Attempts != 1 || !f.FailedAt.Equal(t0) ||
				!strings.Contains(f.LastError, "404") || !strings.Contains(f.LastError, "no such job: 7") {
				t.Errorf("404: failed record %+v, want kind http, 1 attempt, failed at %v, the status and the body in the error", f, t0)
			}
			if f := failed[moved]; f.Attempts != 1 || !strings.Contains(f.LastError, "302") {
				t.Errorf("302: failed record %+v, want 1 attempt and the status in the error", f)
			}
			if n := len(rc.requests("/elsewhere")); n != 0 {
				t.Errorf("the redirect was followed (%d requests to its target)", n)
			}
			if n := len(rc.requests("/gone")); n != 1 {
				t.Errorf("the 404 was called %d times, want once", n)
			}

			healed.Store(true)
			for _, id := range []string{gone, moved} {
				ok, err := s.Retry(context.Background(), id)
				if err != nil || !ok {
					t.Fatalf("Retry(%q) = %v, %v; want true", id, ok, err)
				}
			}
			s.Notify()
			got := map[string]int{}
			for range 2 {
				f := receive(t, fired, "OnFired after Retry")
				got[f.ID] = f.Attempt
			}
			if got[gone] != 1 || got[moved] != 1 {
				t.Errorf("after Retry, fired %v; want both on attempt 1 (attempts count from zero again)", got)
			}
			reqs := rc.requests("/gone")
			if len(reqs) != 2 || reqs[1].Header.Get(timer.IdempotencyKeyHeader) != gone {
				t.Errorf("requests to /gone %+v, want a second one with the same Idempotency-Key", reqs)
			}
			if n := len(failedByID(t, s)); n != 0 {
				t.Errorf("%d failed tasks left", n)
			}
		})
	}
}

// driveClock waits for cond while moving the clock to each pending HTTP
// task's due time that is at most maxJump ahead: a retry. maxJump stays
// below the lease, so a call under way is never taken over.
func driveClock(t testing.TB, db *sqldb.DB, clock *clocktest.Clock, maxJump time.Duration, what string, cond func() bool) {
	t.Helper()
	if maxJump >= timer.DefaultLeaseTTL {
		t.Fatalf("driveClock: a jump of %v would end leases", maxJump)
	}
	waitFor(t, what, func() bool {
		if cond() {
			return true
		}
		var due time.Time
		err := db.QueryRow(context.Background(), `SELECT due_at FROM troupe_timers WHERE failed_at IS NULL ORDER BY due_at LIMIT 1`).Scan(&due)
		if err != nil {
			return false
		}
		if d := due.Sub(clock.Now()); d > 0 && d <= maxJump {
			clock.Set(due)
		}
		return false
	})
}

// gotFired reports whether OnFired has sent a report, keeping it in *f.
func gotFired(ch <-chan timer.Fired, f *timer.Fired) func() bool {
	return func() bool {
		select {
		case *f = <-ch:
			return true
		default:
			return false
		}
	}
}

func TestHTTP_ExhaustingMaxAttemptsFailsTheTaskWithTheLastError(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, n int) {
				http.Error(w, fmt.Sprint("boom ", n), http.StatusInternalServerError)
			})
			s := newScheduler(t, db, timer.Config{Clock: clock, MaxAttempts: 3, Backoff: everyRetryAfter(time.Second)})
			own := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/own"), MaxAttempts: 5})
			dflt := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/default")})
			runStoppable(t, s)

			driveClock(t, db, clock, time.Second, "both tasks failed", func() bool { return len(failedByID(t, s)) == 2 })
			failed := failedByID(t, s)
			for _, c := range []struct {
				id, path string
				want     int
			}{{own, "/own", 5}, {dflt, "/default", 3}} {
				f := failed[c.id]
				if f.Attempts != c.want || !strings.Contains(f.LastError, "500") || !strings.Contains(f.LastError, fmt.Sprint("boom ", c.want)) {
					t.Errorf("%s: failed record %+v, want %d attempts and the last answer (boom %d) in the error", c.path, f, c.want, c.want)
				}
				reqs := rc.requests(c.path)
				if len(reqs) != c.want {
					t.Errorf("%s: %d calls, want %d", c.path, len(reqs), c.want)
				}
				for i, r := range reqs {
					if got := r.Header.Get(timer.AttemptHeader); got != fmt.Sprint(i+1) {
						t.Errorf("%s: call %d carried Troupe-Attempt %q", c.path, i+1, got)
					}
				}
			}
		})
	}
}

func TestHTTP_ACallSlowerThanItsTimeoutIsRetried(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					<-r.Context().Done() // the caller gave up
				}
			})
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, OnFired: onFired, Backoff: everyRetryAfter(time.Second)})
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/slow"), Timeout: 200 * time.Millisecond})
			runStoppable(t, s)

			waitFor(t, "the timeout recorded", func() bool { return readTask(t, db, id).lastError != "" })
			st := readTask(t, db, id)
			if st.failed || st.attempts != 1 || !st.due.Equal(t0.Add(time.Second)) {
				t.Fatalf("after a timeout: %+v, want a retry due at %v", st, t0.Add(time.Second))
			}
			if !strings.Contains(st.lastError, "deadline exceeded") {
				t.Errorf("last error %q does not say the call timed out", st.lastError)
			}
			var f timer.Fired
			driveClock(t, db, clock, time.Second, "OnFired", gotFired(fired, &f))
			if f.ID != id || f.Attempt != 2 {
				t.Fatalf("OnFired got %+v, want %q on attempt 2", f, id)
			}
		})
	}
}

func TestHTTP_AnOutcomeAfterTheLeaseWasTakenOverIsIgnored(t *testing.T) {
	for _, kind := range dialects {
		for _, late := range []int{http.StatusInternalServerError, http.StatusNotFound} {
			t.Run(fmt.Sprint(kind, "/", late), func(t *testing.T) {
				db, _ := openDB(t, kind)
				clock := newClock()
				aCalled, bCalled := make(chan struct{}), make(chan struct{})
				releaseA, releaseB := make(chan struct{}), make(chan struct{})
				rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, _ int) {
					first := r.Header.Get(timer.AttemptHeader) == "1"
					called, release := bCalled, releaseB
					if first {
						called, release = aCalled, releaseA
					}
					close(called)
					select {
					case <-release:
					case <-r.Context().Done():
						return
					}
					if first {
						http.Error(w, "late answer", late)
					}
				})
				logA := newLogCapture()
				// A runs one call at a time, so it cannot take the task over
				// from itself while its first call hangs.
				a := newScheduler(t, db, timer.Config{Clock: clock, Owner: "a", HTTPConcurrency: 1, Logger: slog.New(logA)})
				fired, onFired := firedChan()
				b := newScheduler(t, db, timer.Config{Clock: clock, Owner: "b", OnFired: onFired})
				id := scheduleHTTP(t, a, t0, timer.HTTPTask{URL: rc.url("/job")})

				stopA := runStoppable(t, a)
				receive(t, aCalled, "A's call")
				runStoppable(t, b)
				clock.Advance(timer.DefaultLeaseTTL) // A's lease ends; B takes the task
				receive(t, bCalled, "B's call")
				st := readTask(t, db, id)
				if st.attempts != 2 || !st.due.After(clock.Now()) {
					t.Fatalf("after B's claim: %+v, want attempt 2 leased past now (%v)", st, clock.Now())
				}

				close(releaseA) // A's late answer
				waitFor(t, "A to handle its late answer", func() bool {
					return logA.has(func(r logRecord) bool { return r.Attrs["id"] == id })
				})
				stopA()
				if got := readTask(t, db, id); !got.exists || got.failed || got.attempts != st.attempts || !got.due.Equal(st.due) || got.lastError != st.lastError {
					t.Fatalf("A's late %d changed B's task: %+v, was %+v", late, got, st)
				}

				close(releaseB)
				if f := receive(t, fired, "B's OnFired"); f.ID != id || f.Attempt != 2 {
					t.Fatalf("OnFired got %+v, want %q on attempt 2", f, id)
				}
				if got := readTask(t, db, id); got.exists {
					t.Fatalf("task resurrected: %+v", got)
				}
				if n := len(failedByID(t, b)); n != 0 {
					t.Fatalf("%d failed records, want none", n)
				}
				for _, r := range rc.requests("/job") {
					if got := r.Header.Get(timer.IdempotencyKeyHeader); got != id {
						t.Errorf("a call carried Idempotency-Key %q, want %q", got, id)
					}
				}
			})
		}
	}
}

func TestHTTP_ConcurrencyBoundsTheCallsInFlight(t *testing.T) {
	const tasks, limit = 20, 3
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			var inFlight, most atomic.Int32
			gate := make(chan struct{})
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, _ int) {
				n := inFlight.Add(1)
				defer inFlight.Add(-1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				select {
				case <-gate:
				case <-r.Context().Done():
				}
			})
			s := newScheduler(t, db, timer.Config{Clock: clock, HTTPConcurrency: limit})
			for i := range tasks {
				scheduleHTTP(t, s, t0, timer.HTTPTask{ID: fmt.Sprint("t", i), URL: rc.url("/work")})
			}
			runStoppable(t, s)

			waitFor(t, "the first calls", func() bool { return inFlight.Load() >= limit })
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE attempts > 0`); n != limit {
				t.Fatalf("%d tasks claimed while %d calls hang, want %d", n, limit, limit)
			}
			close(gate)
			waitFor(t, "every task done", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			if m := most.Load(); m > limit {
				t.Fatalf("%d calls in flight at once, want at most %d", m, limit)
			}
			keys := map[string]bool{}
			for _, r := range rc.requests("/work") {
				keys[r.Header.Get(timer.IdempotencyKeyHeader)] = true
			}
			if n := len(rc.requests("/work")); n != tasks || len(keys) != tasks {
				t.Fatalf("%d calls for %d distinct tasks, want %d each", n, len(keys), tasks)
			}
		})
	}
}

func TestHTTP_StoppingMidCallHandsTheTaskBackToBeCalledAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			called := make(chan struct{}, 1)
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) {
				if n == 1 {
					called <- struct{}{}
					<-r.Context().Done() // hangs until the caller goes away
				}
			})
			a := newScheduler(t, db, timer.Config{Clock: clock, Owner: "a"})
			id := scheduleHTTP(t, a, t0, timer.HTTPTask{URL: rc.url("/job")})
			stopA := runStoppable(t, a)
			receive(t, called, "the first call")
			stopA()
			if st := readTask(t, db, id); !st.exists || st.failed || st.due.After(clock.Now()) {
				t.Fatalf("after stopping mid-call: %+v, want the task pending and due now (%v)", st, clock.Now())
			}

			fired, onFired := firedChan()
			b := newScheduler(t, db, timer.Config{Clock: clock, Owner: "b", OnFired: onFired})
			runStoppable(t, b) // the clock does not move: no waiting for A's lease
			if f := receive(t, fired, "B's OnFired"); f.ID != id {
				t.Fatalf("OnFired got %+v, want %q", f, id)
			}
			reqs := rc.requests("/job")
			if len(reqs) != 2 || reqs[1].Header.Get(timer.IdempotencyKeyHeader) != id {
				t.Fatalf("requests %+v, want a second call with the same Idempotency-Key", reqs)
			}
		})
	}
}

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestHTTP_AnAnswerThatArrivesAsRunStopsIsRecorded(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(http.ResponseWriter, *http.Request, int) {})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			// The 200 is in hand when Run is told to stop.
			transport := rc.srv.Client().Transport
			client := &http.Client{
				CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
				Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
					resp, err := transport.RoundTrip(r)
					if err != nil {
						return nil, err
					}
					body, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					if err != nil {
						return nil, err
					}
					resp.Body = io.NopCloser(bytes.NewReader(body))
					cancel()
					<-r.Context().Done()
					return resp, nil
				}),
			}
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, HTTPClient: client, OnFired: onFired})
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/job")})
			if err := s.Run(ctx); err != nil {
				t.Fatal(err)
			}
			if st := readTask(t, db, id); st.exists {
				t.Fatalf("the answered task is still stored (%+v): it would be called again", st)
			}
			if f := receive(t, fired, "OnFired"); f.ID != id {
				t.Fatalf("OnFired got %+v, want %q", f, id)
			}
		})
	}
}

// refuseDeletes makes the database refuse to delete timers while the table
// down has a row: a database that is down for the scheduler's writes.
func refuseDeletes(t testing.TB, db *sqldb.DB) (down, up func()) {
	t.Helper()
	ctx := context.Background()
	stmts := []string{`CREATE TABLE down (x INTEGER)`}
	if db.Dialect() == sqldb.Postgres {
		stmts = append(stmts,
			`CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				IF EXISTS (SELECT 1 FROM down) THEN RAISE EXCEPTION 'database down'; END IF;
				RETURN OLD;
			END $$`,
			`CREATE TRIGGER refuse_delete BEFORE DELETE ON troupe_timers FOR EACH ROW EXECUTE FUNCTION refuse_delete()`)
	} else {
		stmts = append(stmts, `CREATE TRIGGER refuse_delete BEFORE DELETE ON troupe_timers
			WHEN EXISTS (SELECT 1 FROM down) BEGIN SELECT RAISE(ABORT, 'database down'); END`)
	}
	for _, q := range stmts {
		if _, err := db.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	exec := func(q string) {
		if _, err := db.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	return func() { exec(`INSERT INTO down (x) VALUES (1)`) }, func() { exec(`DELETE FROM down`) }
}

func TestHTTP_AnOutcomeTheDatabaseRefusedIsRecordedOnceItIsBackWithinTheLease(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			down, up := refuseDeletes(t, db)
			clock := newClock()
			rc := newReceiver(t, clock, func(http.ResponseWriter, *http.Request, int) {})
			logs := newLogCapture()
			fired, onFired := firedChan()
			s := newScheduler(t, db, timer.Config{Clock: clock, Logger: slog.New(logs), OnFired: onFired})
			id := scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/job")})
			down()
			runStoppable(t, s)
			waitFor(t, "recording the 200 to fail", func() bool {
				return logs.has(func(r logRecord) bool {
					return r.Attrs["id"] == id && strings.Contains(r.Attrs["err"], "database down")
				})
			})
			up()
			// Time moves on in small steps, staying inside the call's lease.
			limit := t0.Add(timer.DefaultLeaseTTL / 2)
			waitFor(t, "the outcome recorded", func() bool {
				if clock.Now().Before(limit) {
					clock.Advance(100 * time.Millisecond)
				}
				return !readTask(t, db, id).exists
			})
			if f := receive(t, fired, "OnFired"); f.ID != id || f.Attempt != 1 {
				t.Fatalf("OnFired got %+v, want %q on attempt 1", f, id)
			}
			if n := len(rc.requests("/job")); n != 1 {
				t.Fatalf("%d calls, want 1", n)
			}
		})
	}
}

func TestScheduleHTTPTx_RefusesATaskThatCannotBeCalled(t *testing.T) {
	ok := timer.HTTPTask{URL: "https://example.test/hook"}
	with := func(f func(*timer.HTTPTask)) timer.HTTPTask {
		task := ok
		f(&task)
		return task
	}
	cases := []struct {
		name    string
		at      time.Duration // from now
		task    timer.HTTPTask
		wantErr error
	}{
		{"empty URL", 0, with(func(t *timer.HTTPTask) { t.URL = "" }), timer.ErrInvalidTimer},
		{"relative URL", 0, with(func(t *timer.HTTPTask) { t.URL = "/hook" }), timer.ErrInvalidTimer},
		{"no host", 0, with(func(t *timer.HTTPTask) { t.URL = "http:///hook" }), timer.ErrInvalidTimer},
		{"ftp", 0, with(func(t *timer.HTTPTask) { t.URL = "ftp://example.test/file" }), timer.ErrInvalidTimer},
		{"lower-case method", 0, with(func(t *timer.HTTPTask) { t.Method = "post" }), timer.ErrInvalidTimer},
		{"method with a space", 0, with(func(t *timer.HTTPTask) { t.Method = "PO ST" }), timer.ErrInvalidTimer},
		{"timeout equal to the lease", 0, with(func(t *timer.HTTPTask) { t.Timeout = timer.DefaultLeaseTTL }), timer.ErrInvalidTimer},
		{"timeout longer than the lease", 0, with(func(t *timer.HTTPTask) { t.Timeout = time.Hour }), timer.ErrInvalidTimer},
		{"negative timeout", 0, with(func(t *timer.HTTPTask) { t.Timeout = -time.Second }), timer.ErrInvalidTimer},
		{"negative MaxAttempts", 0, with(func(t *timer.HTTPTask) { t.MaxAttempts = -1 }), timer.ErrInvalidTimer},
		{"Idempotency-Key set by the caller", 0, with(func(t *timer.HTTPTask) { t.Header = http.Header{"Idempotency-Key": {"mine"}} }), timer.ErrInvalidTimer},
		{"idempotency-key in lower case", 0, with(func(t *timer.HTTPTask) { t.Header = http.Header{"idempotency-key": {"mine"}} }), timer.ErrInvalidTimer},
		{"in the past", -time.Hour, ok, timer.ErrInPast},
	}
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			ctx := context.Background()
			for _, c := range cases {
				err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					_, err := s.ScheduleHTTPTx(ctx, tx, clock.Now().Add(c.at), c.task)
					return err
				})
				if !errors.Is(err, c.wantErr) {
					t.Errorf("%s: err %v, want %v", c.name, err, c.wantErr)
				}
			}
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				_, err := s.ScheduleHTTPTx(ctx, tx, time.Time{}, ok)
				return err
			})
			if !errors.Is(err, timer.ErrInPast) {
				t.Errorf("zero time: err %v, want ErrInPast", err)
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d tasks stored, want none", n)
			}
		})
	}
}

func TestScheduleHTTPTx_StoresTheTaskWithTheCallersTransaction(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			ctx := context.Background()
			task := timer.HTTPTask{ID: "order-9-reminder", URL: "https://example.test/hook"}
			rollback := errors.New("roll back")
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if _, err := s.ScheduleHTTPTx(ctx, tx, t0.Add(time.Hour), task); err != nil {
					return err
				}
				return rollback
			})
			if !errors.Is(err, rollback) {
				t.Fatal(err)
			}
			if st := readTask(t, db, task.ID); st.exists {
				t.Fatalf("a rolled-back task is stored: %+v", st)
			}
			scheduleHTTP(t, s, t0.Add(time.Hour), task)
			if _, err := s.ScheduleHTTP(ctx, t0.Add(2*time.Hour), task); !errors.Is(err, timer.ErrExists) {
				t.Fatalf("scheduling the same id again: err %v, want ErrExists", err)
			}
			if st := readTask(t, db, task.ID); !st.due.Equal(t0.Add(time.Hour)) {
				t.Fatalf("the pending task moved to %v", st.due)
			}
		})
	}
}

// Cancelling an HTTP task under way and scheduling one with the same id:
// the old call's late outcome must not complete the new task.
func TestHTTP_ALateOutcomeOfACancelledCallDoesNotTouchANewTaskWithTheSameID(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			firstCalled, secondCalled := make(chan struct{}), make(chan struct{})
			releaseFirst, releaseSecond := make(chan struct{}), make(chan struct{})
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) {
				switch n {
				case 1:
					close(firstCalled)
					<-releaseFirst
					w.WriteHeader(http.StatusOK)
				case 2:
					close(secondCalled)
					<-releaseSecond
					http.Error(w, "busy", http.StatusServiceUnavailable)
				default:
					w.WriteHeader(http.StatusOK)
				}
			})
			log := newLogCapture()
			s := newScheduler(t, db, timer.Config{Clock: clock, Backoff: everyRetryAfter(time.Minute), Logger: slog.New(log)})
			ctx := context.Background()
			scheduleHTTP(t, s, t0, timer.HTTPTask{ID: "job", URL: rc.url("/job")})
			runStoppable(t, s)
			receive(t, firstCalled, "first call")
			if ok, err := s.Cancel(ctx, "job"); err != nil || !ok {
				t.Fatalf("Cancel = %v, %v", ok, err)
			}
			scheduleHTTP(t, s, clock.Now(), timer.HTTPTask{ID: "job", URL: rc.url("/job")})
			s.Notify()
			receive(t, secondCalled, "the new task's call")
			close(releaseFirst)
			waitFor(t, "the first outcome", func() bool {
				return log.has(func(r logRecord) bool { return r.Attrs["id"] == "job" }) || !readTask(t, db, "job").exists
			})
			close(releaseSecond)
			waitFor(t, "the second outcome", func() bool {
				return log.has(func(r logRecord) bool {
					return r.Attrs["id"] == "job" && r.Attrs["err"] != "" && r.Attrs["err"] != "<nil>"
				})
			})
			if st := readTask(t, db, "job"); !st.exists {
				t.Fatalf("the new task is gone after its only call answered 503: lost (the cancelled call's 200 deleted it)")
			}
		})
	}
}

// Two schedulers claim HTTP tasks with FOR UPDATE SKIP LOCKED (SQLite: its
// write lock): each task is called once.
func TestHTTP_TwoSchedulersCallEachTaskOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, n int) { w.WriteHeader(http.StatusOK) })
			a := newScheduler(t, db, timer.Config{Clock: clock, Owner: "a"})
			b := newScheduler(t, db, timer.Config{Clock: clock, Owner: "b"})
			const n = 40
			for i := range n {
				scheduleHTTP(t, a, t0, timer.HTTPTask{ID: fmt.Sprint("t", i), URL: rc.url(fmt.Sprint("/", i))})
			}
			runStoppable(t, a)
			runStoppable(t, b)
			waitFor(t, "every task done", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			for i := range n {
				if got := len(rc.requests(fmt.Sprint("/", i))); got != 1 {
					t.Errorf("task %d called %d times, want 1", i, got)
				}
			}
		})
	}
}
