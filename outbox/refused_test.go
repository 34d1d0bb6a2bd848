package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
)

// logCapture is a slog.Handler that keeps the records it is given.
type logCapture struct {
	mu      sync.Mutex
	recs    []slog.Record
	changed chan struct{}
}

func (h *logCapture) Enabled(context.Context, slog.Level) bool { return true }
func (h *logCapture) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logCapture) WithGroup(string) slog.Handler            { return h }
func (h *logCapture) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	select {
	case h.changed <- struct{}{}:
	default:
	}
	return nil
}

// waitRecord waits for a record whose attributes include every key of want
// with a value containing want's.
func (h *logCapture) waitRecord(t *testing.T, want map[string]string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		h.mu.Lock()
		for _, r := range h.recs {
			found := 0
			r.Attrs(func(a slog.Attr) bool {
				if w, ok := want[a.Key]; ok && strings.Contains(a.Value.String(), w) {
					found++
				}
				return true
			})
			if found == len(want) {
				h.mu.Unlock()
				return
			}
		}
		n := len(h.recs)
		h.mu.Unlock()
		select {
		case <-h.changed:
		case <-deadline:
			t.Fatalf("no log record with %v among %d", want, n)
		}
	}
}

// TestRelay_OversizedMessageIsNotOvertakenBySubjectMates runs the relay
// against real NATS with a message that can never be published in the
// middle of its subject: too large for the server (the broker refuses it) or
// too large even for the relay to decode. The later messages of that subject
// are not delivered while it is pending (a message of another subject,
// published after them in the same batch, is), the relay logs the blocking
// row's seq, id and reason, and once an operator deletes that row the rest
// of the subject follows in order.
func TestRelay_OversizedMessageIsNotOvertakenBySubjectMates(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int    // the oversized message's envelope size
		reason string // what the log says
	}{
		// The server's payload limit counts the NATS headers, which are
		// larger than the envelope's attributes: an envelope just under
		// 1 MiB decodes, but the server refuses it.
		{"refused-by-broker", message.DefaultMaxSize - 8, "maximum payload"},
		{"too-large-to-decode", 2 * message.DefaultMaxSize, "too large"},
	} {
		for _, kind := range dialects {
			t.Run(tc.name+"/"+kind, func(t *testing.T) {
				testOversized(t, kind, tc.size, tc.reason)
			})
		}
	}
}

func testOversized(t *testing.T, kind string, size int, reason string) {
	db, _ := openDB(t, kind)
	b := startNATS(t, t.TempDir(), "")
	const topic = "shop.orders"
	// Another subject in another partition, so its row is not held back
	// by the relay itself.
	other := ""
	for i := 2; other == ""; i++ {
		if s := fmt.Sprint("order-", i); outbox.Partition(topic, s) != outbox.Partition(topic, "order-1") {
			other = s
		}
	}
	big := newMsg("order-1", 1)
	env, err := message.EncodeJSON(big)
	if err != nil {
		t.Fatal(err)
	}
	big.Data = []byte(`{"n":1,"pad":"` + strings.Repeat("x", size-len(env)-len(`,"pad":""`)) + `"}`)
	if env, _ := message.EncodeJSON(big); len(env) != size {
		t.Fatalf("envelope of %d bytes, want %d", len(env), size)
	}
	msgs := []*message.Message{newMsg("order-1", 0), big, newMsg("order-1", 2), newMsg(other, 0)}
	addAll(t, db, topic, msgs)
	var bigSeq int64
	if err := db.QueryRow(context.Background(), "SELECT seq FROM troupe_outbox WHERE id = $1", big.ID).Scan(&bigSeq); err != nil {
		t.Fatal(err)
	}

	got := make(chan string, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "g"}, func(ctx context.Context, ds []*broker.Delivery) {
		for _, d := range ds {
			got <- d.Msg.ID
			d.Ack()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Stop(context.Background())
	logs := &logCapture{changed: make(chan struct{}, 1)}
	r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Logger: slog.New(logs)})
	if err != nil {
		t.Fatal(err)
	}
	runRelay(t, r)

	// The stream keeps publish order, so had order-1's third message been
	// stored it would arrive before the other subject's.
	next := func() string {
		t.Helper()
		select {
		case id := <-got:
			return id
		case <-time.After(10 * time.Second):
			t.Fatal("no delivery")
			return ""
		}
	}
	if first, second := next(), next(); first != msgs[0].ID || second != msgs[3].ID {
		t.Fatalf("delivered %s then %s, want order-1#0 (%s) then %s#0 (%s): order-1#2 overtook the refused order-1#1",
			first, second, msgs[0].ID, other, msgs[3].ID)
	}
	logs.waitRecord(t, map[string]string{"seq": fmt.Sprint(bigSeq), "id": big.ID, "err": reason})
	waitFor(t, 10*time.Second, "the refused row and the one behind it pending", func() bool { return pendingRows(t, db) == 2 })

	// The operator removes the row that can never be published.
	if _, err := db.Exec(context.Background(), "DELETE FROM troupe_outbox WHERE seq = $1", bigSeq); err != nil {
		t.Fatal(err)
	}
	if id := next(); id != msgs[2].ID {
		t.Fatalf("delivered %s after the row was deleted, want order-1#2 (%s)", id, msgs[2].ID)
	}
	waitFor(t, 10*time.Second, "every row delivered", func() bool { return pendingRows(t, db) == 0 })
}
