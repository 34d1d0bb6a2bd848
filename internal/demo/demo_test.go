package demo_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/demo"
	"github.com/troupedev/troupe/internal/pgtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(pgtest.WithCluster(m)) }

// The demo checks the shop's invariants from both databases at the end and
// returns an error when one does not hold (shop's tests show the check
// catches a broken one), so a run that returns nil, with faults injected,
// is the claim of the README's first command.
func TestDemo_EveryInvariantHoldsWithFaultsInjected(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mode     order.Mode
		postgres bool
	}{
		{"sqlite/orchestrated", order.Orchestrated, false},
		{"sqlite/choreographed", order.Choreographed, false},
		{"postgres/orchestrated", order.Orchestrated, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cfg := demo.Config{DataDir: t.TempDir(), Mode: tc.mode, Orders: 300, Clients: 8, Out: &bytes.Buffer{}}
			if tc.postgres {
				cfg.Postgres = pgtest.URL(t)
			}
			out := cfg.Out.(*bytes.Buffer)
			if err := demo.Run(ctx, cfg); err != nil {
				t.Fatalf("demo failed: %v\noutput:\n%s", err, out)
			}
			for _, want := range []string{
				"300 orders ended",
				"orders still pending                              0",
				"injected: Order service restarts                  1",
				"✓ for each of the 50 customers, reserved credit = the sum of its approved orders",
				"All invariants hold.",
			} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("output lacks %q\noutput:\n%s", want, out)
				}
			}
			if strings.Contains(out.String(), "injected: messages duplicated (late)              0") {
				t.Errorf("no message was duplicated: the run injected no broker fault\n%s", out)
			}
		})
	}
}

func TestDemo_RequiresOutput(t *testing.T) {
	if err := demo.Run(context.Background(), demo.Config{}); err == nil {
		t.Fatal("Run without Out succeeded, want an error")
	}
}
