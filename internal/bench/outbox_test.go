package bench

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestOutbox_PublishesEveryCommittedMessageAndMeasuresCommitToAck(t *testing.T) {
	cfg := Config{DB: "sqlite", Mode: "notify", Rate: 400, Batch: 10, Concurrency: 2, Duration: time.Second, DataDir: t.TempDir()}
	r, err := Run(context.Background(), Outbox(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r.Ops == 0 || r.Errors != 0 || r.P99Ms <= 0 {
		t.Fatalf("result %+v: want messages published, no errors, a latency", r)
	}
	if r.Config.Mode != "notify" || !strings.Contains(r.Latency, "commit") {
		t.Errorf("result does not say what it measured: mode %q, latency %q", r.Config.Mode, r.Latency)
	}
}

func TestOutbox_RefusesAnUnknownModeAndWALOnSQLite(t *testing.T) {
	for _, mode := range []string{"tail", "wal"} {
		_, err := Run(context.Background(), Outbox(), Config{DB: "sqlite", Mode: mode, Duration: time.Millisecond, DataDir: t.TempDir()})
		if err == nil || !strings.Contains(err.Error(), "--mode") {
			t.Errorf("mode %q: err = %v, want one naming --mode", mode, err)
		}
	}
}
