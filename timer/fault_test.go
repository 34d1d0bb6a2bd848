package timer_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// The process fault tests: a service process (child_test.go) runs a
// scheduler on the test's database and is killed with SIGKILL at a point of
// its work; a scheduler in this process then finishes the work. Every timer
// must have fired once: its effect committed exactly once, none pending.

func TestScheduler_KilledWhileABatchIsClaimedFiresEachTimerOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) { testKilledBatch(t, kind, false) })
	}
}

func TestScheduler_KilledWhileABatchIsClaimedAddsEachMessageToTheOutboxOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) { testKilledBatch(t, kind, true) })
	}
}

// testKilledBatch schedules n due timers, lets a child claim them all in
// one batch and kills it with the batch's transaction open, after its
// handler applied some effects. With topics, the timers go to the outbox,
// and one handler timer, due last, holds the batch open.
func testKilledBatch(t *testing.T, kind string, topics bool) {
	const n = 200
	ctx := context.Background()
	db, url := openDB(t, kind)
	s := newScheduler(t, db, timer.Config{Owner: "parent"})
	if err := s.Handle("work", recordEffect("parent")); err != nil {
		t.Fatal(err)
	}
	target, after, last := timer.ToHandler("work"), 5, ""
	if topics {
		target, after, last = timer.ToTopic("reminders"), 1, "last"
	}
	var ids []string
	if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		for i := range n {
			id := fmt.Sprintf("t%03d", i)
			ids = append(ids, id)
			if err := s.ScheduleTx(ctx, tx, s.Now(), target, newMsg(id)); err != nil {
				return err
			}
		}
		if last != "" {
			return s.ScheduleTx(ctx, tx, s.Now(), timer.ToHandler("work"), newMsg(last))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	pending := n
	if last != "" {
		pending++
	}

	c := startChild(t, partBatch, url, after)
	c.waitLine(lineClaimed)
	// The child's batch transaction is open, holding every timer. On
	// SQLite it holds the write lock too: this scheduler waits for it.
	run(t, s)
	if kind == "postgres" {
		// The claim holds: this scheduler skips the locked timers and fires
		// only a probe scheduled after them.
		if err := s.Schedule(ctx, s.Now(), timer.ToHandler("work"), newMsg("probe")); err != nil {
			t.Fatal(err)
		}
		s.Notify()
		waitFor(t, "the probe fired past the claimed timers", func() bool {
			return countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id = 'probe'`) == 1
		})
	}
	if got := countRows(t, db, `SELECT count(*) FROM effects WHERE timer_id <> 'probe'`); got != 0 {
		t.Fatalf("%d effects visible while the child's batch is open, want 0", got)
	}
	if got := countRows(t, db, `SELECT count(*) FROM troupe_timers`); got != pending {
		t.Fatalf("%d timers pending while the child's batch is open, want %d", got, pending)
	}
	if got := countRows(t, db, `SELECT count(*) FROM troupe_outbox`); got != 0 {
		t.Fatalf("%d outbox rows while the child's batch is open, want 0", got)
	}

	c.kill()
	waitFor(t, "every timer fired after the kill", func() bool {
		return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0
	})
	if got := countRows(t, db, `SELECT count(*) FROM effects WHERE owner = 'child'`); got != 0 {
		t.Errorf("%d effects of the killed batch survived, want 0 (rolled back)", got)
	}
	effects := perID(t, db, `SELECT timer_id, count(*) FROM effects WHERE timer_id <> 'probe' GROUP BY timer_id`)
	if topics {
		checkOnce(t, "outbox row", perID(t, db, `SELECT id, count(*) FROM troupe_outbox WHERE topic = 'reminders' GROUP BY id`), ids)
		checkOnce(t, "effect", effects, []string{last})
	} else {
		checkOnce(t, "effect", effects, ids)
	}
}

func TestScheduler_KilledMidCallRunsEachHTTPTaskAgainAfterItsLeaseWithTheSameKey(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			const n = 10
			ctx := context.Background()
			db, url := openDB(t, kind)

			// The receiver records every call. Until the kill it holds the
			// calls (they come from the child); then it answers at once.
			type call struct{ key, attempt string }
			var (
				mu     sync.Mutex
				calls  = map[string][]call{} // by task, from the URL's path
				killed bool
			)
			release := make(chan struct{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				task := strings.TrimPrefix(r.URL.Path, "/")
				mu.Lock()
				calls[task] = append(calls[task], call{key: r.Header.Get(timer.IdempotencyKeyHeader), attempt: r.Header.Get(timer.AttemptHeader)})
				hold := !killed
				mu.Unlock()
				if hold {
					select {
					case <-r.Context().Done(): // the child died
					case <-release:
					}
					return
				}
				w.WriteHeader(http.StatusNoContent)
			}))
			t.Cleanup(srv.Close)
			t.Cleanup(func() { close(release) })
			nCalls := func() int {
				mu.Lock()
				defer mu.Unlock()
				k := 0
				for _, cs := range calls {
					k += len(cs)
				}
				return k
			}

			// The child's leases end by the system clock; this scheduler's
			// clock starts at the system's time and jumps past them.
			clock := clocktest.New(time.Now())
			s := newScheduler(t, db, timer.Config{Clock: clock, Owner: "parent", HTTPClient: srv.Client()})
			var ids []string
			for i := range n {
				id, err := s.ScheduleHTTP(ctx, clock.Now(), timer.HTTPTask{ID: fmt.Sprintf("task-%02d", i), URL: srv.URL + fmt.Sprintf("/task-%02d", i)})
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, id)
			}

			c := startChild(t, partHTTP, url, 0)
			waitFor(t, "the child's calls", func() bool { return nCalls() >= childHTTPConcurrency })
			c.kill()
			mu.Lock()
			killed = true
			var held []string
			for task := range calls {
				held = append(held, task)
			}
			mu.Unlock()
			slices.Sort(held)
			if got := countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE attempts = 1`); got != len(held) {
				t.Fatalf("%d tasks leased after the kill, want the %d called (%v)", got, len(held), held)
			}

			// The tasks the child never claimed run at once; those it held
			// wait for their lease to end.
			run(t, s)
			waitFor(t, "the unclaimed tasks done", func() bool {
				return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == len(held)
			})
			mu.Lock()
			for _, id := range held {
				if len(calls[id]) != 1 {
					t.Errorf("task %s called %d times before the child's lease ended, want once", id, len(calls[id]))
				}
			}
			mu.Unlock()
			clock.Advance(childHTTPLease + time.Minute)
			s.Notify()
			waitFor(t, "every task done", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })

			mu.Lock()
			defer mu.Unlock()
			for _, id := range ids {
				want := []call{{id, "1"}}
				if slices.Contains(held, id) {
					want = append(want, call{id, "2"})
				}
				if got := calls[id]; !slices.Equal(got, want) {
					t.Errorf("task %s: calls (key, attempt) %v, want %v", id, got, want)
				}
			}
		})
	}
}

// TestScheduler_KilledAnywhereInAStreamFiresEachTimerOnce kills a child
// firing a stream of timers at a random point, in a batch or right after a
// commit; each run logs its seed, and a failure names it (the subtest's
// name): to replay it, use that seed instead of a random one.
func TestScheduler_KilledAnywhereInAStreamFiresEachTimerOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			for _, where := range []string{whereInBatch, whereAfterCommit, whereInBatch} {
				seed := rand.Uint64()
				t.Run(fmt.Sprintf("%s/seed=%d", where, seed), func(t *testing.T) { testKilledStream(t, kind, where, seed) })
			}
		})
	}
}

// testKilledStream lets a child fire a stream of due timers in batches of
// childStreamBatch, and kill itself at a point drawn from seed: the
// batches it committed stay fired, the one it was in leaves nothing, and
// the rest fire once afterwards.
func testKilledStream(t *testing.T, kind, where string, seed uint64) {
	const n, b = 1000, childStreamBatch
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0))
	after := 1 + rng.IntN(n/2) // the timer in whose batch, or after whose commit, the child dies
	committed := (after - 1) / b * b
	if where == whereAfterCommit {
		committed = (after + b - 1) / b * b
	}
	db, url := openDB(t, kind)
	s := newScheduler(t, db, timer.Config{Owner: "parent", BatchSize: 500})
	if err := s.Handle("work", recordEffect("parent")); err != nil {
		t.Fatal(err)
	}
	ids := make([]string, n)
	if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		for i := range ids {
			ids[i] = fmt.Sprintf("t%04d", i)
			if err := s.ScheduleTx(ctx, tx, s.Now(), timer.ToHandler("work"), newMsg(ids[i])); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	c := startChild(t, partStream, url, after, envChildWhere+"="+where)
	c.waitKilled()

	// Each timer is either fired, with its effect, or pending without one;
	// the fired ones are the batches the child committed.
	byChild := countRows(t, db, `SELECT count(*) FROM effects`)
	pending := countRows(t, db, `SELECT count(*) FROM troupe_timers`)
	t.Logf("seed %d: killed %s at timer %d: %d effects, %d timers pending", seed, where, after, byChild, pending)
	if byChild != committed || pending != n-committed {
		t.Fatalf("seed %d: killed %s at timer %d: %d effects and %d timers pending, want %d and %d", seed, where, after, byChild, pending, committed, n-committed)
	}

	run(t, s)
	waitFor(t, "every timer fired", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
	if got := countRows(t, db, `SELECT count(*) FROM effects WHERE owner = 'child'`); got != committed {
		t.Errorf("seed %d: %d effects by the child, want the %d it committed", seed, got, committed)
	}
	checkOnce(t, fmt.Sprintf("effect (seed %d)", seed), perID(t, db, `SELECT timer_id, count(*) FROM effects GROUP BY timer_id`), ids)
}

// perID runs a query of (id, count) rows and returns the counts by id.
func perID(t testing.TB, db *sqldb.DB, q string) map[string]int {
	t.Helper()
	rs, err := db.Query(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int{}
	for rs.Next() {
		var id string
		var k int
		if err := rs.Scan(&id, &k); err != nil {
			rs.Close()
			t.Fatal(err)
		}
		m[id] = k
	}
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	return m
}

// checkOnce checks that counts holds exactly the ids, each once.
func checkOnce(t testing.TB, what string, counts map[string]int, ids []string) {
	t.Helper()
	var wrong []string
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
		if k := counts[id]; k != 1 {
			wrong = append(wrong, fmt.Sprintf("%s×%d", id, k))
		}
	}
	for id, k := range counts {
		if !want[id] {
			wrong = append(wrong, fmt.Sprintf("unexpected %s×%d", id, k))
		}
	}
	if len(wrong) > 0 {
		if len(wrong) > 20 {
			wrong = append(wrong[:20], "...")
		}
		t.Errorf("%d of %d ids not with exactly one %s: %v", len(wrong), len(ids), what, wrong)
	}
}
