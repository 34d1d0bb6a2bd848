package demo_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/demo"
	"github.com/troupedev/troupe/internal/pgtest"
)

// The delivery demo checks its invariants from the three databases at the
// end and returns an error when one does not hold (the example's tests
// show the check catches each broken one), so a run that returns nil,
// with faults injected in the confirm phase, is the claim of `troupe demo
// delivery`.
func TestRunDelivery_EveryInvariantHoldsWithFaultsInjected(t *testing.T) {
	for _, postgres := range []bool{false, true} {
		name := "sqlite"
		if postgres {
			name = "postgres"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cfg := demo.DeliveryConfig{DataDir: t.TempDir(), Orders: 200, Clients: 8, Packets: 120, Agents: 6}
			if postgres {
				cfg.Postgres = pgtest.URL(t)
			}
			var out bytes.Buffer
			if err := demo.RunDelivery(ctx, &out, cfg); err != nil {
				t.Fatalf("demo failed: %v\noutput:\n%s", err, &out)
			}
			for _, want := range []string{
				"200 orders ended",
				"orders still pending                         0",
				"✓ every PLACED order has exactly its packets and one agent assigned",
				"✓ after quiescence and expiry, no reservation is left held",
				"All invariants hold",
			} {
				if !strings.Contains(out.String(), want) {
					t.Errorf("output lacks %q\noutput:\n%s", want, &out)
				}
			}
			for _, never := range []string{
				"orders placed (packets and agent assigned)   0\n",
				"injected: Store confirmations failed once    0\n",
				"injected: Delivery calls answered 503        0\n",
			} {
				if strings.Contains(out.String(), never) {
					t.Errorf("output has %q: the run placed nothing or injected no fault\n%s", never, &out)
				}
			}
		})
	}
}

func TestRunDelivery_RequiresAWriter(t *testing.T) {
	if err := demo.RunDelivery(context.Background(), nil, demo.DeliveryConfig{}); err == nil {
		t.Fatal("RunDelivery without a writer succeeded, want an error")
	}
}
