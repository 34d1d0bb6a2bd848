package reserve_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// dialects lists the databases every test runs on.
var dialects = []string{"sqlite", "postgres"}

// t0 is where every fake clock starts.
var t0 = time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)

// env is a service's database with a timer scheduler on a fake clock and
// a Reserver.
type env struct {
	db    *sqldb.DB
	clock *clocktest.Clock
	sched *timer.Scheduler
	r     *reserve.Reserver
}

// newEnv opens a fresh database of kind, migrated, with a Reserver whose
// scheduler is not running (see run). maxConns 0 is sqldb's default.
func newEnv(t *testing.T, kind string, maxConns int) *env {
	t.Helper()
	ctx := context.Background()
	url := "sqlite://" + filepath.Join(t.TempDir(), "reserve.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, &sqldb.Config{MaxConns: maxConns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := timer.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if err := reserve.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	clock := clocktest.New(t0)
	sched, err := timer.New(db, timer.Config{Clock: clock, PollInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	r, err := reserve.New(db, sched, reserve.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return &env{db: db, clock: clock, sched: sched, r: r}
}

// run runs the scheduler until the test ends.
func (e *env) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := e.sched.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// add puts resources in a pool.
func (e *env) add(t *testing.T, pool string, ids ...string) {
	t.Helper()
	if err := e.r.Add(context.Background(), pool, ids...); err != nil {
		t.Fatal(err)
	}
}

// try reserves in pool for owner (the reservation's id), expiring in ttl.
func (e *env) try(t *testing.T, id, pool string, ttl time.Duration) (reserve.Reservation, error) {
	t.Helper()
	return e.r.Try(context.Background(), reserve.Try{ID: id, Pool: pool, Owner: id, ExpiresAt: e.clock.Now().Add(ttl)})
}

// resources returns pool's resources by id.
func (e *env) resources(t *testing.T, pool string) map[string]reserve.Resource {
	t.Helper()
	rs, err := e.r.Resources(context.Background(), pool)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]reserve.Resource{}
	for _, r := range rs {
		out[r.ID] = r
	}
	return out
}

// get returns reservation id.
func (e *env) get(t *testing.T, id string) reserve.Reservation {
	t.Helper()
	res, err := e.r.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// count runs a count query.
func (e *env) count(t *testing.T, q string, args ...any) int {
	t.Helper()
	var n int
	if err := e.db.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls cond until it holds or 20 s pass.
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

// wantResource fails t unless resource id of pool is in state, held by
// reservation ("" for none).
func (e *env) wantResource(t *testing.T, pool, id string, state reserve.ResourceState, reservation string) {
	t.Helper()
	got, ok := e.resources(t, pool)[id]
	if !ok {
		t.Fatalf("resource %s/%s missing", pool, id)
	}
	if got.State != state || got.Reservation != reservation {
		t.Fatalf("resource %s/%s is %s by %q, want %s by %q", pool, id, got.State, got.Reservation, state, reservation)
	}
}
