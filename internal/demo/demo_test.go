package demo_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/demo"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The demo checks each claim it prints (rows in the view, deliveries seen,
// events kept across the restart) and fails when one does not hold, so a
// run that returns nil shows every step worked.
func TestDemo_RunsEveryStepOnEmbeddedDefaults(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out bytes.Buffer
	if err := demo.Run(ctx, demo.Config{DataDir: t.TempDir(), Orders: 300, Out: &out}); err != nil {
		t.Fatalf("demo failed: %v\noutput:\n%s", err, out.String())
	}
	for _, want := range []string{
		"[1/5] placed 300 orders: each order row and its \"shop.order.placed\" event committed in one transaction",
		"the order-history view (SQLite) applied all 300",
		"redelivered after 200ms and applied once",
		"published them again: the broker's dedup dropped the copies",
		`went to "shop.orders.dlq" with its reason: "order-history cannot read shop.order.placed`,
		"read all 302 events from the start, each once: nothing lost",
		"[5/5] the order-history group resumed where it stopped: 10 new orders applied",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q\noutput:\n%s", want, out.String())
		}
	}
}

func TestDemo_RequiresOutput(t *testing.T) {
	if err := demo.Run(context.Background(), demo.Config{}); err == nil {
		t.Fatal("Run without Out succeeded, want an error")
	}
}
