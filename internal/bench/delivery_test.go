package bench

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/pgtest"
)

func TestDelivery_PlacesOrdersAndItsInvariantsHold(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			cfg := Config{DB: db, Concurrency: 4, Duration: 500 * time.Millisecond, DataDir: t.TempDir()}
			if db == "postgres" {
				cfg.PostgresURL = pgtest.URL(t)
			}
			r, err := Run(context.Background(), Delivery(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			if r.Ops == 0 || r.Errors != 0 || r.P50Ms <= 0 || r.P50Ms > r.P99Ms {
				t.Fatalf("placed %d, errors %d, p50 %.2f p99 %.2f ms: want orders placed, no errors, ordered percentiles\n%v", r.Ops, r.Errors, r.P50Ms, r.P99Ms, r.Notes)
			}
			if n := note(r, "invariants: ok"); n == "" || !strings.Contains(n, "no resource assigned twice") {
				t.Fatalf("notes %q: want the invariants checked and holding", r.Notes)
			}
		})
	}
}
