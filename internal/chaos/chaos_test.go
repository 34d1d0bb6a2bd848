package chaos_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/chaos"
)

// nodeEnv makes the test binary run as a chaos node process (RunNode)
// instead of running the tests: the harness starts it so in these tests.
const nodeEnv = "TROUPE_CHAOS_TEST_NODE"

func TestMain(m *testing.M) {
	if os.Getenv(nodeEnv) != "" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
		err := chaos.RunNode(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "chaos node:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// nodeCommand runs this test binary as a node.
func nodeCommand(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), nodeEnv+"=1")
	return cmd
}

func TestRun_ProcessesKilledBrokerAndDatabaseCrashedNothingLostNothingTwice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	rep, err := chaos.Run(ctx, chaos.Config{
		Duration:   20 * time.Second,
		Seed:       7,
		FaultEvery: 2 * time.Second,
		Clients:    3,
		// CI's two-minute run is orchestrated: this one covers the
		// choreography.
		ShopMode: order.Choreographed,
		Command:  nodeCommand,
		Progress: &progress,
	})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep.Write(&out)
	t.Log(progress.String() + out.String())
	for _, k := range chaos.FaultKinds {
		if rep.Faults[k] == 0 {
			t.Errorf("no %q injected: the run proves nothing about it", k)
		}
	}
	if rep.Messages.Duplicated == 0 {
		t.Error("no message was published twice")
	}
	if rep.Clients.Replayed == 0 {
		t.Error("no order was sent again with its Idempotency-Key")
	}
	for _, e := range []string{chaos.Shop, chaos.Delivery} {
		n := 0
		for _, v := range rep.Counts[e].Sagas {
			n += v
		}
		for _, v := range rep.Counts[e].Flows {
			n += v
		}
		if n == 0 {
			t.Errorf("no %s saga or flow ran", e)
		}
	}
	if len(rep.Violations) > 0 {
		t.Errorf("%d violations:\n%s", len(rep.Violations), strings.Join(rep.Violations, "\n"))
	}
	last := strings.TrimSpace(out.String())
	if last = last[strings.LastIndex(last, "\n")+1:]; last != fmt.Sprintf("violations: %d", len(rep.Violations)) {
		t.Errorf("the report's last line is %q", last)
	}
}

func TestRun_InvalidConfigSaysWhatIsWrong(t *testing.T) {
	_, err := chaos.Run(context.Background(), chaos.Config{Examples: []string{"bank"}, Duplicate: 2, ShopMode: "improvised", Command: nodeCommand})
	for _, want := range []string{`unknown example "bank"`, "Duplicate 2", `unknown mode "improvised"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v, want it to name %s", err, want)
		}
	}
}

func TestRunNode_RefusesAnIncompleteCommandLine(t *testing.T) {
	for _, args := range [][]string{
		{"--role", "dragon"},
		{"--role", "nats"},
		{"--role", "shop-order", "--addr", "127.0.0.1:0"},
		{"--role", "delivery-order", "--db", "postgres://x", "--nats", "nats://x", "--addr", "127.0.0.1:0"},
		{"--role", "shop-order", "--db", "postgres://x", "--nats", "nats://x", "--addr", "127.0.0.1:0", "--shop-mode", "improvised"},
	} {
		var stderr bytes.Buffer
		if err := chaos.RunNode(context.Background(), args, &bytes.Buffer{}, &stderr); err == nil {
			t.Errorf("RunNode(%q) = nil, want an error", args)
		}
	}
}
