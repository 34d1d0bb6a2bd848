package kafka_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// TestPublish_RecordsAreCloudEventsKeyedBySubject: each message is a record
// in CloudEvents binary mode keyed by its subject, or by its id when it has
// none, so any Kafka consumer can read it and a subject keeps its partition.
func TestPublish_RecordsAreCloudEventsKeyedBySubject(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	about := message.New("/orders", "shop.order.created", []byte(`{"id":"7"}`))
	about.Subject = "order-7"
	about.DataContentType = "application/json"
	anonymous := message.New("/orders", "shop.audit.tick", []byte("tick"))
	publish(t, b, "orders", about, anonymous)

	raw := rawClient(t, c, kgo.ConsumeTopics("orders"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	byID := map[string]*kgo.Record{}
	for len(byID) < 2 {
		fetches := raw.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("read back %d of 2 records: %v", len(byID), err)
		}
		for _, r := range fetches.Records() {
			for _, h := range r.Headers {
				if h.Key == "ce_id" {
					byID[string(h.Value)] = r
				}
			}
		}
	}
	for _, tt := range []struct {
		m   *message.Message
		key string
	}{{about, "order-7"}, {anonymous, anonymous.ID}} {
		r := byID[tt.m.ID]
		if r == nil {
			t.Fatalf("no record with ce_id %s", tt.m.ID)
		}
		if string(r.Key) != tt.key {
			t.Errorf("message %s: key %q, want %q", tt.m.Type, r.Key, tt.key)
		}
		if string(r.Value) != string(tt.m.Data) {
			t.Errorf("message %s: value %q, want the data %q", tt.m.Type, r.Value, tt.m.Data)
		}
		h := map[string]string{}
		for _, kv := range r.Headers {
			h[kv.Key] = string(kv.Value)
		}
		for k, want := range map[string]string{"ce_specversion": "1.0", "ce_source": tt.m.Source, "ce_type": tt.m.Type} {
			if h[k] != want {
				t.Errorf("message %s: header %s = %q, want %q", tt.m.Type, k, h[k], want)
			}
		}
	}
}

// TestPublish_ReportsFailedMessagesAndAcceptsTheRest: a message that cannot
// be encoded is reported by its index in a *broker.PublishError, and the
// rest of the batch is delivered.
func TestPublish_ReportsFailedMessagesAndAcceptsTheRest(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	msgs := numbered("order-1", 3)
	msgs[1].Source = "" // required
	msgs[2].Subject = "order-2"

	err := b.Publish(context.Background(), "orders", msgs...)
	var perr *broker.PublishError
	if !errors.As(err, &perr) {
		t.Fatalf("Publish = %v, want a *broker.PublishError", err)
	}
	if perr.Total != 3 || len(perr.Failed) != 1 || perr.Failed[1] == nil {
		t.Errorf("PublishError = %+v, want message 1 of 3 failed", perr)
	}
	if !errors.Is(err, message.ErrInvalid) {
		t.Errorf("Publish error %v does not match message.ErrInvalid", err)
	}

	seen := newCollector()
	subscribe(t, b, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, seen.acking())
	all := seen.waitIDs(t, "the accepted messages", msgs[0], msgs[2])
	for _, d := range all {
		if d.id == msgs[1].ID {
			t.Errorf("the refused message was delivered")
		}
	}
}

// A message that fails before it is sent holds back the later messages of
// its subject in the same call, so they never overtake it; other subjects
// go on.
func TestPublish_FailedMessageHoldsBackItsSubjectMates(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	a := numbered("a", 3)
	other := numbered("b", 1)
	a[1].Data = make([]byte, 2<<20) // over the producer's batch limit
	msgs := []*message.Message{a[0], a[1], other[0], a[2]}

	err := b.Publish(context.Background(), "orders", msgs...)
	var perr *broker.PublishError
	if !errors.As(err, &perr) {
		t.Fatalf("Publish = %v, want a *broker.PublishError", err)
	}
	if len(perr.Failed) != 2 || !errors.Is(perr.Failed[1], message.ErrTooLarge) || !errors.Is(perr.Failed[3], broker.ErrNotSent) {
		t.Fatalf("PublishError.Failed = %v, want message 1 too large and message 3 not sent", perr.Failed)
	}
	seen := newCollector()
	subscribe(t, b, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, seen.acking())
	for _, d := range seen.waitIDs(t, "the messages sent", a[0], other[0]) {
		if d.id == a[1].ID || d.id == a[2].ID {
			t.Errorf("message %s was delivered, want it held back", d.id)
		}
	}
}
