package outbox_test

import (
	"context"
	"testing"

	"github.com/troupedev/troupe/outbox"
)

// A service stopped while it starts (its context ends before the relay has
// read its lease rows) is not a failure: Run returns nil, as it does when
// stopped later.
func TestRelay_RunStoppedBeforeItStartedReturnsNil(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			b := startNATS(t, t.TempDir(), "")
			r, err := outbox.NewRelay(db, b, outbox.RelayConfig{})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := r.Run(ctx); err != nil {
				t.Fatalf("Run with an ended context: %v, want nil", err)
			}
		})
	}
}
