package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/cli"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	code = cli.Main(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

// lastJSON decodes the last line of out, which `--json` promises is one
// JSON object.
func lastJSON(t *testing.T, out string) map[string]any {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var v map[string]any
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &v); err != nil {
		t.Fatalf("last line is not a JSON object: %v\n%s", err, out)
	}
	return v
}

func TestBench_JSONReportsFiguresAndConfiguration(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"broker on embedded NATS", []string{"bench", "broker", "--broker", "nats", "--duration", "500ms", "--concurrency", "2", "--batch", "50", "--json", "--data-dir", t.TempDir()}},
		{"broker on the Kafka protocol", []string{"bench", "broker", "--broker", "kafka", "--duration", "500ms", "--concurrency", "2", "--batch", "50", "--json"}},
		{"commit on SQLite", []string{"bench", "commit", "--db", "sqlite", "--duration", "300ms", "--concurrency", "2", "--batch", "10", "--json", "--data-dir", t.TempDir()}},
		{"commit on SQLite with an fsync per commit", []string{"bench", "commit", "--db", "sqlite", "--sqlite-sync", "full", "--duration", "300ms", "--concurrency", "2", "--batch", "10", "--json", "--data-dir", t.TempDir()}},
		{"broker paced by --rate", []string{"bench", "broker", "--duration", "500ms", "--concurrency", "2", "--batch", "10", "--rate", "2000", "--json", "--data-dir", t.TempDir()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := run(t, tc.args...)
			if code != 0 {
				t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
			}
			v := lastJSON(t, out)
			if slices.Contains(tc.args, "--sqlite-sync") {
				if cfg, _ := v["config"].(map[string]any); cfg["sqlite_full_sync"] != true || !strings.Contains(out, "synchronous=FULL") {
					t.Errorf("--sqlite-sync full: config %v, want sqlite_full_sync and synchronous=FULL reported:\n%s", cfg, out)
				}
			}
			for _, k := range []string{"name", "throughput_per_s", "p50_ms", "p99_ms", "config", "gomaxprocs"} {
				if _, ok := v[k]; !ok {
					t.Errorf("JSON lacks %q: %s", k, out)
				}
			}
			if tp, _ := v["throughput_per_s"].(float64); tp <= 0 {
				t.Errorf("throughput_per_s = %v, want > 0", v["throughput_per_s"])
			}
			if ops, _ := v["ops"].(float64); ops <= 0 {
				t.Errorf("ops = %v, want > 0", v["ops"])
			}
			cfg, _ := v["config"].(map[string]any)
			if cfg["concurrency"] != float64(2) {
				t.Errorf("config.concurrency = %v, want 2", cfg["concurrency"])
			}
		})
	}
}

func TestBench_CommitOnPostgres(t *testing.T) {
	// With no --postgres URL the benchmark starts its own throwaway cluster,
	// the same way the tests do.
	code, out, errOut := run(t, "bench", "commit", "--db", "postgres", "--duration", "300ms", "--concurrency", "2", "--batch", "10", "--json")
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	v := lastJSON(t, out)
	if cfg, _ := v["config"].(map[string]any); cfg["db"] != "postgres" {
		t.Errorf("config.db = %v, want postgres", cfg["db"])
	}
}

func TestBench_TableForPeople(t *testing.T) {
	code, out, errOut := run(t, "bench", "commit", "--duration", "200ms", "--concurrency", "1", "--batch", "1", "--data-dir", t.TempDir())
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"throughput", "p99", "GOMAXPROCS="} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestBadInput_ClearErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"unknown benchmark", []string{"bench", "nope"}, 1, `unknown benchmark "nope"`},
		{"unknown broker", []string{"bench", "broker", "--broker", "rabbit://x", "--duration", "10ms"}, 1, `unknown broker "rabbit://x"`},
		{"unknown db", []string{"bench", "commit", "--db", "oracle"}, 1, `--db "oracle": want sqlite or postgres`},
		{"negative rate", []string{"bench", "commit", "--rate", "-5"}, 1, `--rate -5`},
		{"unknown SQLite sync", []string{"bench", "commit", "--sqlite-sync", "sometimes"}, 1, `--sqlite-sync "sometimes": want normal or full`},
		{"unreachable postgres", []string{"bench", "commit", "--db", "postgres", "--postgres", "postgres://postgres@127.0.0.1:1/x?connect_timeout=2"}, 1, "127.0.0.1:1"},
		{"unreachable nats", []string{"bench", "broker", "--broker", "nats://127.0.0.1:1", "--duration", "10ms"}, 1, "127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := run(t, tc.args...)
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d; stderr: %s", code, tc.wantCode, errOut)
			}
			if !strings.Contains(errOut, tc.wantErr) {
				t.Errorf("stderr %q lacks %q", errOut, tc.wantErr)
			}
		})
	}
}

func TestBench_ListsBenchmarks(t *testing.T) {
	code, out, _ := run(t, "bench")
	if code != 0 || !strings.Contains(out, "broker") || !strings.Contains(out, "commit") {
		t.Fatalf("exit %d, output:\n%s", code, out)
	}
}

// With --rate the benchmark offers that load rather than running flat out:
// the publishers cannot exceed it.
func TestBench_RateLimitsOfferedLoad(t *testing.T) {
	code, out, errOut := run(t, "bench", "broker", "--duration", "1s", "--concurrency", "2", "--batch", "10", "--rate", "500", "--json", "--data-dir", t.TempDir())
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	v := lastJSON(t, out)
	// 500/s for 1s is at most 500 messages (plus a batch per worker at the
	// edge); a flat-out run sends tens of thousands.
	if ops, _ := v["ops"].(float64); ops <= 0 || ops > 520 {
		t.Errorf("ops = %v at --rate 500 for 1s, want at most 520", ops)
	}
	if cfg, _ := v["config"].(map[string]any); cfg["rate"] != float64(500) {
		t.Errorf("config.rate = %v, want 500", cfg["rate"])
	}
}

func TestDemoDelivery_RunsAndChecksItsInvariants(t *testing.T) {
	code, out, errOut := run(t, "demo", "delivery", "--orders", "40", "--clients", "4", "--packets", "20", "--agents", "3", "--data-dir", t.TempDir())
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	for _, want := range []string{"orders placed", "no packet or agent is assigned twice", "All invariants hold"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if code, _, errOut := run(t, "demo", "delivery", "--agents", "many"); code == 0 || !strings.Contains(errOut, "-agents") {
		t.Errorf("--agents many: exit %d, stderr %q; want the flag named", code, errOut)
	}
}
