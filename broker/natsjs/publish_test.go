package natsjs

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// TestPublish_FailedMessageHoldsBackTheLaterOnesOfItsSubjectOnly: once a
// message of a batch fails before it is sent (too large for the server, or
// invalid), the later messages of its subject are not sent and are reported
// with broker.ErrNotSent, so none of them is stored ahead of it; messages of
// other subjects, and without one, are stored in order.
func TestPublish_FailedMessageHoldsBackTheLaterOnesOfItsSubjectOnly(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	mk := func(subject, data string) *message.Message {
		m := message.New("/test", "test.held", []byte(data))
		m.Subject = subject
		return m
	}
	msgs := []*message.Message{
		mk("a", "a0"),
		mk("c", "c0"),
		mk("a", "a1"),
		mk("b", "b0"),
		mk("a", "a2"),
		mk("c", "c1"),
		mk("", "n0"),
		mk("b", "b1"),
	}
	msgs[1].Source = ""                             // invalid: cannot be encoded
	msgs[2].Data = bytes.Repeat([]byte("x"), 2<<20) // above the server's 1 MiB payload limit
	err := b.Publish(ctx, topic, msgs...)
	var perr *broker.PublishError
	if !errors.As(err, &perr) {
		t.Fatalf("Publish = %v, want a *broker.PublishError", err)
	}
	if len(perr.Failed) != 4 || perr.Total != len(msgs) {
		t.Errorf("failed %v of %d, want messages 1, 2, 4 and 5 of %d", perr.Failed, perr.Total, len(msgs))
	}
	for i, want := range map[int]error{1: message.ErrInvalid, 2: nats.ErrMaxPayload, 4: broker.ErrNotSent, 5: broker.ErrNotSent} {
		if !errors.Is(perr.Failed[i], want) {
			t.Errorf("message %d failed with %v, want %v", i, perr.Failed[i], want)
		}
	}
	s, err := b.js.Stream(ctx, escapeName(topic))
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("stream message %d: %v", seq, err)
		}
		got = append(got, string(m.Data))
	}
	if want := []string{"a0", "b0", "n0", "b1"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("stream holds %q, want %q", got, want)
	}
}
