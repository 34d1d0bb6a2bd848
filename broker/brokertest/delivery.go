package brokertest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// testPublishedMessagesAreDelivered: every CloudEvents attribute, extension
// and the data arrive unchanged, including binary data and a message with
// only the required attributes.
func (s *suite) testPublishedMessagesAreDelivered(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")

	full := &message.Message{
		ID:              message.NewID(),
		Source:          "/brokertest/orders",
		Type:            "brokertest.order.created",
		Subject:         "order-42",
		Time:            time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC),
		DataContentType: "application/json",
		DataSchema:      "https://schemas.example.com/order-created/v1.json",
		Data:            []byte(`{"order":"42","total":{"amount":1999,"currency":"EUR"},"note":"caf\u00e9 – ü"}`),
		CorrelationID:   "corr-7f3a",
		CausationID:     "cause-19b2",
		TraceParent:     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		Extensions:      map[string]string{"tenant": "acme", "priority": "high", "region": "eu-west-1/zone a%b"},
	}
	binary := &message.Message{
		ID:              message.NewID(),
		Source:          "/brokertest/blobs",
		Type:            "brokertest.blob.stored",
		Subject:         "blob-1",
		Time:            time.Date(2024, 1, 2, 3, 4, 5, 0, time.FixedZone("CET", 3600)),
		DataContentType: "application/octet-stream",
		Data:            []byte{0, 1, 2, 0xfe, 0xff, '\n', '\r', 0x80},
	}
	minimal := &message.Message{
		ID:     message.NewID(),
		Source: "/brokertest/minimal",
		Type:   "brokertest.minimal",
	}
	want := []*message.Message{full, binary, minimal}

	in := newInbox()
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group}, acking(in))
	publish(t, b, topic, want...)

	all := in.waitIDs(t, "the three published messages", want)
	byID := make(map[string]got, len(all))
	for _, g := range all {
		byID[g.msg.ID] = g
	}
	for _, w := range want {
		g := byID[w.ID]
		if diff := sameMessage(g.msg, w); diff != "" {
			t.Errorf("message %s (%s) changed in transit: %s", w.ID, w.Type, diff)
		}
		if g.topic != topic {
			t.Errorf("message %s: Delivery.Topic = %q, want %q", w.ID, g.topic, topic)
		}
		if g.attempt != 1 {
			t.Errorf("message %s: first Delivery.Attempt = %d, want 1", w.ID, g.attempt)
		}
	}
}

// testAtLeastOnceAcrossBatches: 500 messages published in batches of 50 all
// arrive, in handler batches no larger than MaxBatch, and a message acked on
// its first delivery is not delivered again.
func (s *suite) testAtLeastOnceAcrossBatches(t *testing.T) {
	const n, publishBatch, maxBatch = 500, 50, 64
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	msgs := newMessages(n, "a", "b", "c", "d", "e", "f", "g", "h", "i", "j")

	in := newInbox()
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: maxBatch}, acking(in))
	publishInBatches(t, b, topic, publishBatch, msgs)

	all := in.waitIDs(t, fmt.Sprintf("all %d messages", n), msgs)
	for id, c := range countIDs(all) {
		if c != 1 {
			t.Errorf("message %s delivered %d times although acked on its first delivery", id, c)
		}
	}
	sizes := map[int]int{}
	for _, g := range all {
		sizes[g.batchSize]++
		if g.batchSize < 1 || g.batchSize > maxBatch {
			t.Errorf("handler called with a batch of %d deliveries, want 1..%d", g.batchSize, maxBatch)
		}
		if g.attempt != 1 {
			t.Errorf("message %s: Attempt = %d, want 1", g.msg.ID, g.attempt)
		}
	}
	t.Logf("deliveries per handler batch size: %v", sizes)
}

// testPerSubjectOrder: messages of each subject arrive in publish order when
// subjects are interleaved across several Publish calls, and the handler is
// never called again before its previous call returned.
func (s *suite) testPerSubjectOrder(t *testing.T) {
	const n = 160
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	subjects := []string{"order-1", "order-2", "order-3", "order-4"}
	msgs := newMessages(n, subjects...)
	index := make(map[string]int, n)
	for i, m := range msgs {
		index[m.ID] = i
	}

	in := newInbox()
	var inFlight, overlaps atomic.Int32
	ack := acking(in)
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 7},
		func(ctx context.Context, batch []*broker.Delivery) {
			if inFlight.Add(1) != 1 {
				overlaps.Add(1)
			}
			defer inFlight.Add(-1)
			ack(ctx, batch)
		})
	publishInBatches(t, b, topic, 20, msgs)

	all := in.waitIDs(t, fmt.Sprintf("all %d messages", n), msgs)
	if c := overlaps.Load(); c != 0 {
		t.Errorf("handler called %d times while a previous call was still running", c)
	}
	// Redelivered duplicates are allowed; the first delivery of each message
	// must follow its subject's publish order.
	seen := make(map[string]bool, n)
	last := make(map[string]int, len(subjects))
	for _, g := range all {
		if seen[g.msg.ID] {
			continue
		}
		seen[g.msg.ID] = true
		i := index[g.msg.ID]
		if prev, ok := last[g.msg.Subject]; ok && i < prev {
			t.Errorf("subject %q: message #%d arrived after #%d", g.msg.Subject, i, prev)
		}
		last[g.msg.Subject] = i
	}
}

// testNewGroupStartsAtOldestMessage: a group that subscribes after messages
// were published receives them, so a consumer deployed after its producer
// misses nothing.
func (s *suite) testNewGroupStartsAtOldestMessage(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	msgs := newMessages(3, "s")
	publish(t, b, topic, msgs...)

	in := newInbox()
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group}, acking(in))
	in.waitIDs(t, "the messages published before the group existed", msgs)
}

// testNakRedeliversAfterDelay: a Nak'ed message comes back no sooner than
// its delay (the subscription's NakDelay for Nak(0)), with Attempt counting
// up.
func (s *suite) testNakRedeliversAfterDelay(t *testing.T) {
	const nakDelay, explicitDelay = 150 * time.Millisecond, 250 * time.Millisecond
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	m := newMessage("s", 0)

	in := newInbox()
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, NakDelay: nakDelay},
		recording(in, 0, func(d *broker.Delivery) {
			switch d.Attempt {
			case 1:
				d.Nak(explicitDelay)
			case 2:
				d.Nak(0)
			default:
				d.Ack()
			}
		}))
	publish(t, b, topic, m)

	all := in.waitUntil(t, "three deliveries", func(all []got) bool { return len(all) >= 3 })
	for i, g := range all[:3] {
		if g.msg.ID != m.ID {
			t.Fatalf("delivery %d is message %s, want %s", i+1, g.msg.ID, m.ID)
		}
		if g.attempt != i+1 {
			t.Errorf("delivery %d: Attempt = %d, want %d", i+1, g.attempt, i+1)
		}
	}
	if d := all[1].at.Sub(all[0].at); d < explicitDelay {
		t.Errorf("Nak(%v) redelivered after %v", explicitDelay, d)
	}
	if d := all[2].at.Sub(all[1].at); d < nakDelay {
		t.Errorf("Nak(0) with NakDelay %v redelivered after %v", nakDelay, d)
	}
}

// testHandlerMayReorderItsBatch: a handler may reorder its batch in place
// (sort it by entity, to lock rows in one order); each settlement still
// reaches the message of its own delivery. Every other message is Nak'ed on
// its first delivery and its neighbours acked, and the handler moves its
// first delivery to the end: a settlement that followed the slice's place
// instead of the delivery would redeliver an acked message and drop a
// Nak'ed one.
func (s *suite) testHandlerMayReorderItsBatch(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	msgs := newMessages(40, "a", "b", "c", "d")
	nak := make(map[string]bool, len(msgs))
	for i, m := range msgs {
		nak[m.ID] = i%2 == 1
	}
	publish(t, b, topic, msgs...)

	in := newInbox()
	settle := recording(in, 0, func(d *broker.Delivery) {
		if nak[d.Msg.ID] && d.Attempt == 1 {
			d.Nak(10 * time.Millisecond)
			return
		}
		d.Ack()
	})
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, NakDelay: 10 * time.Millisecond},
		func(ctx context.Context, batch []*broker.Delivery) {
			first := batch[0]
			copy(batch, batch[1:])
			batch[len(batch)-1] = first
			settle(ctx, batch)
		})

	acked := func(all []got) []string {
		var again []string
		for id, n := range countIDs(all) {
			if !nak[id] && n > 1 {
				again = append(again, id)
			}
		}
		return again
	}
	all := in.waitUntil(t, "every Nak'ed message delivered again, and no acked one", func(all []got) bool {
		if len(acked(all)) > 0 {
			return true // fails below
		}
		n := countIDs(all)
		for _, m := range msgs {
			if nak[m.ID] && n[m.ID] < 2 {
				return false
			}
		}
		return true
	})
	if again := acked(all); len(again) > 0 {
		t.Fatalf("%d acked messages delivered again (a settlement reached another delivery's message): %v", len(again), again)
	}
	if !slices.ContainsFunc(all, func(g got) bool { return g.batchSize > 1 }) {
		t.Error("no batch of two or more deliveries: the reordering was not exercised")
	}
}

// testUnsettledIsRedelivered: a delivery the handler leaves unsettled comes
// back; its acked batch mates do not stop it.
func (s *suite) testUnsettledIsRedelivered(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	keep, drop := newMessage("s", 0), newMessage("s", 1)

	in := newInbox()
	s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, NakDelay: 100 * time.Millisecond},
		recording(in, 0, func(d *broker.Delivery) {
			if d.Msg.ID == drop.ID && d.Attempt == 1 {
				return // left unsettled
			}
			d.Ack()
		}))
	publish(t, b, topic, keep, drop)

	all := in.waitUntil(t, "the unsettled message redelivered", func(all []got) bool {
		for _, g := range all {
			if g.msg.ID == drop.ID && g.attempt >= 2 {
				return true
			}
		}
		return false
	})
	if c := countIDs(all)[keep.ID]; c != 1 {
		t.Errorf("acked message delivered %d times, want 1", c)
	}
}

// testCrashedConsumerMessagesRedelivered: a message whose handler never
// settled it, on a client that is then closed, reaches another client of the
// same group.
func (s *suite) testCrashedConsumerMessagesRedelivered(t *testing.T) {
	crashing := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	cfg := broker.SubscribeConfig{Topic: topic, Group: group, AckWait: time.Second, NakDelay: 100 * time.Millisecond}
	m := newMessage("s", 0)

	entered := make(chan int, 16)
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	s.subscribe(t, crashing, cfg, func(ctx context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			entered <- d.Attempt
		}
		select { // never settles; returns only when Close cancels ctx
		case <-ctx.Done():
		case <-release:
		}
	})
	publish(t, crashing, topic, m)
	select {
	case <-entered:
	case <-time.After(waitTimeout):
		t.Fatalf("first client did not receive the message within %v", waitTimeout)
	}

	closed := make(chan error, 1)
	go func() { closed <- crashing.close() }()

	other := s.open(t)
	in := newInbox()
	s.subscribe(t, other, cfg, acking(in))
	all := in.waitIDs(t, "the crashed consumer's message at another client", []*message.Message{m})
	if s.features.AttemptsSurviveCrash && all[0].attempt < 2 {
		t.Errorf("redelivered message has Attempt %d, want at least 2: the broker promises to count the crashed delivery", all[0].attempt)
	}
	if all[0].attempt < 1 {
		t.Errorf("redelivered message has Attempt %d, want at least 1", all[0].attempt)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close with a handler in flight: %v", err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("Close did not return within %v while a handler waited on its context", waitTimeout)
	}
}
