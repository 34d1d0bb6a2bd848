package outbox_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// The fault tests re-execute the test binary as a service process: it
// commits messages to the outbox and runs a relay whose publisher kills the
// process with SIGKILL at a chosen point. These environment variables tell
// the child what to do.
const (
	envChild      = "TROUPE_OUTBOX_FAULT_CHILD" // "before-publish" or "after-publish"
	envChildDB    = "TROUPE_OUTBOX_FAULT_DB"
	envChildNATS  = "TROUPE_OUTBOX_FAULT_NATS"
	envChildTopic = "TROUPE_OUTBOX_FAULT_TOPIC"
	envChildShape = "TROUPE_OUTBOX_FAULT_SHAPE" // "subjects,perSubject"
)

// childLeaseTTL is the lease of the child's relay: the parent's relay takes
// its partitions over this long after the kill.
const childLeaseTTL = time.Second

// childMain runs the child's part when the test binary was started by a
// fault test, and reports whether it did. The child never returns normally:
// it is killed, or exits with a code that names what went wrong.
func childMain() bool {
	point := os.Getenv(envChild)
	if point == "" {
		return false
	}
	fail := func(code int, err error) {
		fmt.Fprintln(os.Stderr, "fault child:", err)
		os.Exit(code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	db, err := sqldb.Open(ctx, os.Getenv(envChildDB), nil)
	if err != nil {
		fail(10, err)
	}
	b, err := natsjs.New(ctx, natsjs.Config{URL: os.Getenv(envChildNATS)})
	if err != nil {
		fail(11, err)
	}
	var nSubjects, perSubject int
	if _, err := fmt.Sscanf(os.Getenv(envChildShape), "%d,%d", &nSubjects, &perSubject); err != nil {
		fail(12, err)
	}
	topic := os.Getenv(envChildTopic)
	// Commit every message first, 10 per transaction, as a service would.
	var batch []*message.Message
	for i := range perSubject {
		for _, s := range subjects(nSubjects) {
			batch = append(batch, newMsg(s, i))
			if len(batch) == 10 || (i == perSubject-1 && s == fmt.Sprintf("order-%d", nSubjects-1)) {
				if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					return outbox.Add(ctx, tx, topic, batch...)
				}); err != nil {
					fail(13, err)
				}
				batch = nil
			}
		}
	}
	pub := &killingPublisher{next: b, point: point}
	r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond, LeaseTTL: childLeaseTTL})
	if err != nil {
		fail(14, err)
	}
	err = r.Run(ctx)
	fail(15, fmt.Errorf("relay returned without being killed: %v", err))
	return true
}

// killingPublisher kills its own process with SIGKILL right before
// publishing ("before-publish"), or right after the broker acknowledged the
// first batch ("after-publish"), before the relay can mark it delivered.
type killingPublisher struct {
	next  broker.Publisher
	point string
}

func (p *killingPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	if p.point == "before-publish" {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
	err := p.next.Publish(ctx, topic, msgs...)
	if err == nil {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return err
}

// runKilledChild runs the child process and checks that it was killed by
// SIGKILL, as planned.
func runKilledChild(t *testing.T, point, dbURL, natsURL, topic string, nSubjects, perSubject int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		envChild+"="+point,
		envChildDB+"="+dbURL,
		envChildNATS+"="+natsURL,
		envChildTopic+"="+topic,
		envChildShape+"="+strconv.Itoa(nSubjects)+","+strconv.Itoa(perSubject),
	)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	ee, ok := err.(*exec.ExitError)
	if !ok {
		t.Fatalf("child: %v (want killed by SIGKILL); stderr:\n%s", err, stderr.String())
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, not SIGKILL; stderr:\n%s", err, stderr.String())
	}
}
