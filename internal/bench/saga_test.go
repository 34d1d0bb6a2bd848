package bench

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/pgtest"
)

func TestSaga_EverySagaEndsAndReservedCreditMatchesApprovedOrders(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			cfg := Config{DB: db, Concurrency: 4, Duration: 500 * time.Millisecond, DataDir: t.TempDir()}
			if db == "postgres" {
				cfg.PostgresURL = pgtest.URL(t)
			}
			r, err := Run(context.Background(), Saga(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if r.Ops == 0 || r.Errors != 0 || r.P50Ms <= 0 || r.P50Ms > r.P99Ms {
				t.Fatalf("sagas %d, errors %d, p50 %.2f p99 %.2f ms: want sagas ended, no errors, ordered percentiles\n%v", r.Ops, r.Errors, r.P50Ms, r.P99Ms, r.Notes)
			}
			if n := note(r, "invariants: ok: all "); n == "" || !strings.Contains(n, "each of 1000 customers' reserved credit equals") {
				t.Fatalf("notes %q: want the invariants checked and holding", r.Notes)
			}
			// Every client's tenth order is over the limit: with 4 clients
			// that ran at least 10 sagas each, some were rejected.
			if n := note(r, "orders: "); r.Ops >= 40 && strings.Contains(n, " 0 rejected") {
				t.Errorf("note %q: want the over-limit orders rejected", n)
			}
		})
	}
}
