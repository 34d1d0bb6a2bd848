package timer_test

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/troupedev/troupe/timer"
)

// A holds a call past its lease; B takes the task over, is answered and
// runs OnDone. A's late 2xx then changes nothing: OnDone ran once, B's.
func TestHTTP_OnDoneRunsOnceWhenALateAnswerFollowsATakeover(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			aCalled, releaseA := make(chan struct{}), make(chan struct{})
			rc := newReceiver(t, clock, func(w http.ResponseWriter, r *http.Request, _ int) {
				if r.Header.Get(timer.AttemptHeader) == "1" {
					close(aCalled)
					select {
					case <-releaseA:
					case <-r.Context().Done():
						return
					}
					w.Write([]byte("a"))
					return
				}
				w.Write([]byte("b"))
			})
			logA := newLogCapture()
			a, oa := newDoneScheduler(t, db, timer.Config{Clock: clock, Owner: "a", HTTPConcurrency: 1, Logger: slog.New(logA)})
			b, ob := newDoneScheduler(t, db, timer.Config{Clock: clock, Owner: "b"})
			id := scheduleHTTP(t, a, t0, timer.HTTPTask{URL: rc.url("/job"), OnDone: "done"})
			stopA := runStoppable(t, a)
			receive(t, aCalled, "A's call")
			runStoppable(t, b)
			clock.Advance(timer.DefaultLeaseTTL) // A's lease ends; B takes the task
			waitFor(t, "B's OnDone", func() bool { return len(ob.list()) == 1 && committedOutcomes(t, db) == 1 })
			close(releaseA)
			waitFor(t, "A to handle its late answer", func() bool {
				return logA.has(func(r logRecord) bool { return r.Attrs["id"] == id })
			})
			stopA()
			if got := oa.list(); len(got) != 0 {
				t.Fatalf("A's OnDone ran for a lease it had lost: %+v", got)
			}
			if n := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = $1`, id); n != 1 {
				t.Fatalf("%d effects of OnDone, want 1", n)
			}
		})
	}
}

// A 2xx whose body is over MaxDoneBody is no answer OnDone can be handed
// whole: the task fails at once (calling again gets the same), and OnDone
// is told so rather than given the first MaxDoneBody bytes as the body.
func TestHTTP_ASuccessOverTheBodyLimitIsToldToOnDoneAsAFailure(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			big, err := json.Marshal(map[string]string{"receipt": strings.Repeat("x", timer.MaxDoneBody)})
			if err != nil {
				t.Fatal(err)
			}
			rc := newReceiver(t, clock, func(w http.ResponseWriter, _ *http.Request, _ int) { w.Write(big) })
			s, o := newDoneScheduler(t, db, timer.Config{Clock: clock, Backoff: everyRetryAfter(0)})
			scheduleHTTP(t, s, t0, timer.HTTPTask{URL: rc.url("/job"), OnDone: "done", MaxAttempts: 3})
			runStoppable(t, s)
			waitFor(t, "OnDone", func() bool { return len(o.list()) == 1 && committedOutcomes(t, db) == 1 })
			got := o.list()[0]
			if got.Err == "" || !strings.Contains(got.Err, "over") {
				t.Fatalf("OnDone got status %d, error %q, a %d-byte body: want a failure saying the body is over the limit", got.Status, got.Err, len(got.Body))
			}
			if n := len(rc.requests("/job")); n != 1 {
				t.Fatalf("%d calls, want 1: the same answer would come again", n)
			}
		})
	}
}
