package timer_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

func TestMain(m *testing.M) {
	if childMain() {
		return
	}
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// dialects lists the databases every test runs on.
var dialects = []string{"sqlite", "postgres"}

// t0 is where every fake clock starts.
var t0 = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

// openDB opens a fresh database of the given kind for t, with the timer,
// outbox and effect tables, and returns it with its URL.
func openDB(t testing.TB, kind string) (*sqldb.DB, string) {
	t.Helper()
	ctx := context.Background()
	var url string
	if kind == "postgres" {
		url = pgtest.URL(t)
	} else {
		url = "sqlite://" + filepath.Join(t.TempDir(), "timer.db")
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := timer.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if err := outbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	// effects records what handlers did, one row per effect, with no
	// unique key: a timer applied twice shows as two rows.
	if _, err := db.Exec(ctx, `CREATE TABLE effects (timer_id TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '')`); err != nil {
		t.Fatal(err)
	}
	return db, url
}

// newScheduler returns a scheduler on db with a fake clock (unless cfg has
// a clock) and a short poll interval.
func newScheduler(t testing.TB, db *sqldb.DB, cfg timer.Config) *timer.Scheduler {
	t.Helper()
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 50 * time.Millisecond
	}
	s, err := timer.New(db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// run starts s.Run and stops it when the test ends.
func run(t testing.TB, s *timer.Scheduler) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := s.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// recordEffect is a handler that records one effect row per fired timer.
func recordEffect(owner string) timer.HandlerFunc {
	return func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
		_, err := tx.Exec(ctx, `INSERT INTO effects (timer_id, owner) VALUES ($1, $2)`, f.ID, owner)
		return err
	}
}

// countRows runs a count query.
func countRows(t testing.TB, db *sqldb.DB, q string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls cond until it holds or 20 s pass.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newMsg(id string) *message.Message {
	m := message.New("/test/timer", "test.timer.fired", []byte(`{"id":"`+id+`"}`))
	m.ID = id
	m.DataContentType = "application/json"
	return m
}

func newClock() *clocktest.Clock { return clocktest.New(t0) }

// runStoppable runs s until the returned stop is called (or the test
// ends); stop returns once Run has.
func runStoppable(t testing.TB, s *timer.Scheduler) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}
