package bench

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(pgtest.WithCluster(m)) }

// timerConfig returns a small configuration on db ("sqlite" or "postgres").
func timerConfig(t *testing.T, db string) Config {
	cfg := Config{DB: db, Concurrency: 2, Batch: 50, DataDir: t.TempDir()}
	if db == "postgres" {
		cfg.PostgresURL = pgtest.URL(t)
	}
	return cfg
}

// note returns the result's note that starts with prefix, or "".
func note(r *Result, prefix string) string {
	for _, n := range r.Notes {
		if strings.HasPrefix(n, prefix) {
			return n
		}
	}
	return ""
}

func TestTimer_DrainFiresEveryTimerOnceAndReportsTheRate(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		for _, target := range []string{TimerHandler, TimerTopic} {
			t.Run(db+"/"+target, func(t *testing.T) {
				cfg := timerConfig(t, db)
				cfg.Mode = TimerDrain
				r, err := Run(context.Background(), Timer(TimerOptions{Pending: 300, Target: target}), cfg)
				if err != nil {
					t.Fatal(err)
				}
				if r.Ops != 300 || r.Errors != 0 || r.OmittedOps != 0 {
					t.Fatalf("ops %d, errors %d, omitted %d: want 300 timers fired, no errors, none left\n%v", r.Ops, r.Errors, r.OmittedOps, r.Notes)
				}
				if r.ThroughputPerS <= 0 || r.P50Ms > r.P99Ms || r.P99Ms > r.MaxMs {
					t.Errorf("throughput %.0f/s, lateness p50 %.2f p99 %.2f max %.2f ms: want a rate and ordered percentiles", r.ThroughputPerS, r.P50Ms, r.P99Ms, r.MaxMs)
				}
				want := "exactly once: ok: 300 of 300 due fired, each once (300 "
				if n := note(r, "exactly once"); !strings.HasPrefix(n, want) || !strings.Contains(n, "0 still pending") {
					t.Errorf("note %q: want it to start %q and say none is pending", n, want)
				}
			})
		}
	}
}

func TestTimer_SteadyMeasuresTheTimersDueInTheWindowAndLeavesTheRestPending(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			cfg := timerConfig(t, db)
			cfg.Mode, cfg.Rate, cfg.Duration = TimerSteady, 800, 500*time.Millisecond
			r, err := Run(context.Background(), Timer(TimerOptions{Pending: 2000}), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if r.Ops != 400 || r.Errors != 0 || r.OmittedOps != 0 || r.OfferedPerS != 800 {
				t.Fatalf("ops %d, errors %d, omitted %d, offered %.0f/s: want the 400 timers due in 500ms at 800/s fired, no errors\n%v",
					r.Ops, r.Errors, r.OmittedOps, r.OfferedPerS, r.Notes)
			}
			n := note(r, "exactly once")
			if !strings.HasPrefix(n, "exactly once: ok: 400 of 400 due fired, each once") {
				t.Errorf("note %q: want every timer due in the window fired once", n)
			}
			// The others stay pending, bar those that fell due while the
			// schedulers were being stopped.
			if !strings.Contains(n, "still pending") || strings.Contains(n, " 0 still pending") {
				t.Errorf("note %q: want timers still pending after the window", n)
			}
			if !strings.Contains(r.Latency, "lateness") {
				t.Errorf("latency %q does not say it is lateness", r.Latency)
			}
		})
	}
}

func TestTimer_RefusesUnknownModeTargetAndRateInADrain(t *testing.T) {
	for _, tc := range []struct {
		mode, target string
		rate         int
		want         string
	}{
		{"tail", TimerHandler, 0, "--mode"},
		{TimerDrain, "queue", 0, "--target"},
		{TimerDrain, TimerHandler, 100, "--rate"},
	} {
		cfg := Config{Mode: tc.mode, Rate: tc.rate, DataDir: t.TempDir()}
		_, err := Run(context.Background(), Timer(TimerOptions{Pending: 10, Target: tc.target}), cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("mode %q target %q rate %d: err = %v, want one naming %s", tc.mode, tc.target, tc.rate, err, tc.want)
		}
	}
}

func TestTimer_SQLiteDataDirRunsAgainButNeverFiresTimersItDidNotLoad(t *testing.T) {
	ctx := context.Background()
	cfg := Config{DB: "sqlite", Concurrency: 1, Batch: 50, DataDir: t.TempDir(), Mode: TimerDrain}
	for run := range 2 {
		if _, err := Run(ctx, Timer(TimerOptions{Pending: 100}), cfg); err != nil {
			t.Fatalf("run %d in the same --data-dir: %v", run+1, err)
		}
	}

	// A timer of someone else's in the kept database: the benchmark refuses
	// to run rather than fire it.
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(cfg.DataDir, "bench.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s, err := timer.New(db, timer.Config{})
	if err != nil {
		t.Fatal(err)
	}
	m := message.New("/test", "test.reminder", []byte(`{}`))
	if err := s.Schedule(ctx, time.Now(), timer.ToTopic("reminders"), m); err != nil {
		t.Fatal(err)
	}
	_, err = Run(ctx, Timer(TimerOptions{Pending: 100}), cfg)
	if err == nil || !strings.Contains(err.Error(), "holds 1 timers") {
		t.Fatalf("err = %v, want a refusal naming the timer already there", err)
	}
	var n int
	if err := db.QueryRow(ctx, "SELECT count(*) FROM troupe_timers WHERE id = $1", m.ID).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the other timer: count %d, err %v; want it still pending", n, err)
	}
}
