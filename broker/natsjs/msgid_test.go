package natsjs

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// TestMsgID_ReadableBoundedAndUnambiguous: dedup ids read as
// topic:id@source, stay short however long the attributes, are the same for
// the same message, and differ whenever topic, id, source or (for dead
// letters) origin and group differ, even when the attributes contain the
// separators.
func TestMsgID_ReadableBoundedAndUnambiguous(t *testing.T) {
	order := &message.Message{ID: "9b2e-41", Source: "/services/order"}
	if got, want := msgID("shop.orders", order), "shop.orders:9b2e-41@/services/order"; got != want {
		t.Errorf("msgID = %q, want %q", got, want)
	}
	if got, want := deadLetterMsgID("shop.orders.dlq", "shop.orders", "billing", order),
		"shop.orders.dlq:9b2e-41@/services/order;from=shop.orders;group=billing"; got != want {
		t.Errorf("deadLetterMsgID = %q, want %q", got, want)
	}
	if got, want := rawDeadLetterMsgID("shop.orders.dlq", "shop_orders", 42, "shop.orders", "billing"),
		"shop.orders.dlq:stream=shop_orders;seq=42;from=shop.orders;group=billing"; got != want {
		t.Errorf("rawDeadLetterMsgID = %q, want %q", got, want)
	}

	long := "https://example.com/" + strings.Repeat("a", 5000)
	longMsg := &message.Message{ID: strings.Repeat("i", 5000), Source: long}
	id := msgID("shop.orders", longMsg)
	if len(id) > len("shop.orders:@")+2*(len(digestPrefix)+32) {
		t.Errorf("msgID of a 5000-byte id and source is %d bytes: %q", len(id), id)
	}
	if again := msgID("shop.orders", longMsg.Clone()); again != id {
		t.Errorf("msgID of the same message differs: %q, then %q", id, again)
	}

	m := func(id, source string) *message.Message { return &message.Message{ID: id, Source: source} }
	distinct := []struct{ name, a, b string }{
		{"same id, other source",
			msgID("t", m("1", "/a")), msgID("t", m("1", "/b"))},
		{"same message, other topic",
			msgID("t.a", m("1", "/a")), msgID("t.b", m("1", "/a"))},
		{"'@' in the id or in the source",
			msgID("t", m("a@b", "c")), msgID("t", m("a", "b@c"))},
		{"long sources that differ at the end",
			msgID("t", m("1", long+"x")), msgID("t", m("1", long+"y"))},
		{"a source written like the digest of another",
			msgID("t", m("1", long)), msgID("t", m("1", idPart(long)))},
		{"an escape written out and the character it escapes",
			msgID("t", m("a b", "s")), msgID("t", m("a%20b", "s"))},
		{"a message whose id looks like a dead letter's suffix, and the dead letter",
			msgID("t.dlq", m("1", "/a;from=t;group=g")), deadLetterMsgID("t.dlq", "t", "g", m("1", "/a"))},
		{"dead letters of two groups",
			deadLetterMsgID("t.dlq", "t", "g1", m("1", "/a")), deadLetterMsgID("t.dlq", "t", "g2", m("1", "/a"))},
		{"dead letters from two topics",
			deadLetterMsgID("dlq", "t.a", "g", m("1", "/a")), deadLetterMsgID("dlq", "t.b", "g", m("1", "/a"))},
	}
	for _, tt := range distinct {
		if tt.a == tt.b {
			t.Errorf("%s: both have dedup id %q", tt.name, tt.a)
		}
	}

	// Every dedup id is a valid header value: printable ASCII without spaces.
	odd := m("id with spaces, \"quotes\" and ü", "/sources/ünïcode % 100")
	for _, id := range []string{msgID("t", odd), deadLetterMsgID("t.dlq", "t", "g", odd), id} {
		for i := 0; i < len(id); i++ {
			if id[i] <= ' ' || id[i] >= 0x7f {
				t.Errorf("dedup id %q has byte %#x at %d", id, id[i], i)
				break
			}
		}
	}
}

// TestPublish_DedupIsPerTopicSourceAndID: the server drops a message only
// when the same (source, id) was published to the same topic: two services
// may use the same id, and one message published to two topics is stored on
// both, also when an operator's stream holds both topics.
func TestPublish_DedupIsPerTopicSourceAndID(t *testing.T) {
	for _, shared := range []bool{false, true} {
		name := "stream per topic"
		if shared {
			name = "one stream for both topics"
		}
		t.Run(name, func(t *testing.T) {
			const orders, audit = "shop.orders", "shop.audit"
			b := newBroker(t, Config{DataDir: t.TempDir()})
			ctx := t.Context()
			if shared {
				if _, err := b.js.CreateStream(ctx, jetstream.StreamConfig{Name: "SHOP", Subjects: []string{"shop.>"}}); err != nil {
					t.Fatal(err)
				}
			}
			longSource := "/services/" + strings.Repeat("s", 300)
			fromA := &message.Message{ID: "order-42", Source: "/services/a", Type: "shop.order.created"}
			fromB := &message.Message{ID: "order-42", Source: "/services/b", Type: "shop.order.created"}
			fromLong1 := &message.Message{ID: "order-43", Source: longSource + "1", Type: "shop.order.created"}
			fromLong2 := &message.Message{ID: "order-43", Source: longSource + "2", Type: "shop.order.created"}
			last := &message.Message{ID: "last", Source: "/services/a", Type: "shop.order.created"}

			for _, p := range []struct {
				topic string
				m     *message.Message
			}{
				{orders, fromA}, {orders, fromB}, {orders, fromA.Clone()}, // the clone is a retry
				{orders, fromLong1}, {orders, fromLong2}, {orders, fromLong2.Clone()},
				{audit, fromA}, {orders, last}, {audit, last},
			} {
				if err := b.Publish(ctx, p.topic, p.m); err != nil {
					t.Fatalf("Publish %s from %.20s to %s: %v", p.m.ID, p.m.Source, p.topic, err)
				}
			}

			// A group with one member gets a topic's messages in order, so
			// everything before "last" has arrived when "last" does.
			for topic, want := range map[string][]*message.Message{
				orders: {fromA, fromB, fromLong1, fromLong2, last},
				audit:  {fromA, last},
			} {
				h, got := collect()
				subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "billing"}, h)
				var seen []*message.Message
				timeout := time.After(wait)
				for len(seen) == 0 || seen[len(seen)-1].ID != last.ID {
					select {
					case d := <-got:
						seen = append(seen, d.Msg)
					case <-timeout:
						t.Fatalf("%s: %q not received within %v; got %d messages", topic, last.ID, wait, len(seen))
					}
				}
				if len(seen) != len(want) {
					t.Errorf("%s: %d deliveries, want %d", topic, len(seen), len(want))
				}
				for i := range min(len(seen), len(want)) {
					if seen[i].ID != want[i].ID || seen[i].Source != want[i].Source {
						t.Errorf("%s: delivery %d is %s from %.20s, want %s from %.20s",
							topic, i, seen[i].ID, seen[i].Source, want[i].ID, want[i].Source)
					}
				}
			}
		})
	}
}

// TestSubscribe_DeadLettersAreKeptPerMessageTopicAndGroup: dead letters of
// messages that share an id but not a source, and of one message consumed
// from two topics that share a dead-letter topic, are all kept.
func TestSubscribe_DeadLettersAreKeptPerMessageTopicAndGroup(t *testing.T) {
	const orders, refunds, dead = "shop.orders", "shop.refunds", "shop.dead"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	reject := func(_ context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			d.DeadLetter("rejected")
		}
	}
	subscribe(t, b, broker.SubscribeConfig{Topic: orders, Group: "billing", DeadLetterTopic: dead}, reject)
	subscribe(t, b, broker.SubscribeConfig{Topic: refunds, Group: "billing", DeadLetterTopic: dead}, reject)
	h, got := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: dead, Group: "ops"}, h)

	fromA := &message.Message{ID: "42", Source: "/services/a", Type: "shop.order.created"}
	fromB := &message.Message{ID: "42", Source: "/services/b", Type: "shop.order.created"}
	publishAll(t, b, orders, 2, []*message.Message{fromA, fromB})
	publishAll(t, b, refunds, 1, []*message.Message{fromA})

	want := map[string]bool{
		"/services/a from " + orders:  true,
		"/services/b from " + orders:  true,
		"/services/a from " + refunds: true,
	}
	timeout := time.After(wait)
	for len(want) > 0 {
		select {
		case d := <-got:
			key := d.Msg.Source + " from " + d.Msg.Extensions[broker.ExtDeadLetterTopic]
			if !want[key] {
				t.Fatalf("unexpected dead letter of %s", key)
			}
			delete(want, key)
		case <-timeout:
			t.Fatalf("dead letters missing: %v", want)
		}
	}
	s, err := b.js.Stream(ctx, escapeName(dead))
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 3 {
		t.Errorf("dead-letter stream holds %d messages, want 3", info.State.Msgs)
	}
}
