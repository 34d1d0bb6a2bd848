package natsjs

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// TestSubscribe_UndecodableMessageIsDeadLetteredAsIs: a message that is not
// a valid CloudEvent goes to the dead-letter topic with its headers and body
// unchanged plus the reason, and the messages after it are handled.
func TestSubscribe_UndecodableMessageIsDeadLetteredAsIs(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	before, after := numbered(1, "s"), numbered(1, "s")
	publishAll(t, b, topic, 1, before)
	raw := nats.NewMsg(topic)
	raw.Header.Set("ce-specversion", "1.0")
	raw.Header.Set("ce-id", "raw-1")
	raw.Header.Set("ce-source", "/legacy")
	raw.Header.Set("ce-type", "legacy.thing")
	raw.Header.Set("ce-time", "yesterday")
	raw.Header.Set("x-origin", "legacy")
	raw.Data = []byte("not a cloudevent \xff")
	if _, err := b.js.PublishMsg(ctx, raw); err != nil {
		t.Fatal(err)
	}
	publishAll(t, b, topic, 1, after)

	h, got := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "billing"}, h)
	receive(t, got, append(before, after...))

	// The dead letter was stored before the next message reached the handler.
	dlq, err := b.js.Stream(ctx, escapeName(topic+".dlq"))
	if err != nil {
		t.Fatalf("dead-letter stream: %v", err)
	}
	dead, err := dlq.GetLastMsgForSubject(ctx, topic+".dlq")
	if err != nil {
		t.Fatalf("dead letter: %v", err)
	}
	if string(dead.Data) != string(raw.Data) {
		t.Errorf("dead letter body = %q, want the original %q", dead.Data, raw.Data)
	}
	for k, want := range map[string]string{"ce-id": "raw-1", "ce-time": "yesterday", "x-origin": "legacy", "ce-deadlettergroup": "billing", "ce-deadlettertopic": topic, "ce-deadletterattempts": "1"} {
		if got := dead.Header.Get(k); got != want {
			t.Errorf("dead letter header %s = %q, want %q", k, got, want)
		}
	}
	if r := dead.Header.Get("ce-deadletterreason"); !strings.Contains(r, "decode") || !strings.Contains(r, "time") {
		t.Errorf("dead letter reason %q does not say the time attribute could not be decoded", r)
	}
}

// TestSubscribe_DeadLettersOfTwoGroupsAreBothKept: two groups giving up on
// the same message each leave a dead letter, although the message id (the
// dedup key) is the same.
func TestSubscribe_DeadLettersOfTwoGroupsAreBothKept(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	poison := numbered(1, "s")[0]
	reject := func(_ context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			d.DeadLetter("rejected")
		}
	}
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "billing"}, reject)
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "shipping"}, reject)
	h, dead := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: topic + ".dlq", Group: "ops"}, h)
	publishAll(t, b, topic, 1, []*message.Message{poison})

	groups := map[string]bool{}
	timeout := time.After(wait)
	for len(groups) < 2 {
		select {
		case d := <-dead:
			if d.Msg.ID != poison.ID {
				t.Fatalf("unexpected dead letter %s", d.Msg.ID)
			}
			groups[d.Msg.Extensions[broker.ExtDeadLetterGroup]] = true
		case <-timeout:
			t.Fatalf("dead letters from groups %v only", groups)
		}
	}
	if !groups["billing"] || !groups["shipping"] {
		t.Errorf("dead letters from groups %v, want billing and shipping", groups)
	}
}

// TestSubscribe_LastAttemptThatCrashedIsDeadLettered: a message whose last
// allowed delivery was never settled (its consumer died) is dead-lettered at
// the next delivery instead of being stranded or handled again.
func TestSubscribe_LastAttemptThatCrashedIsDeadLettered(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	cfg := broker.SubscribeConfig{Topic: topic, Group: "billing", MaxDeliver: 1, AckWait: 300 * time.Millisecond}
	var calls atomic.Int32
	h := func(_ context.Context, batch []*broker.Delivery) {
		calls.Add(int32(len(batch)))
		for _, d := range batch {
			d.Ack()
		}
	}
	stopSub(t, subscribe(t, b, cfg, h)) // creates the group's consumer
	m := numbered(1, "s")[0]
	publishAll(t, b, topic, 1, []*message.Message{m})

	// A member takes the message and dies without settling it.
	cons, err := b.js.Consumer(ctx, escapeName(topic), "billing")
	if err != nil {
		t.Fatal(err)
	}
	fetched, err := cons.Fetch(1, jetstream.FetchMaxWait(wait))
	if err != nil {
		t.Fatal(err)
	}
	if jm := <-fetched.Messages(); jm == nil {
		t.Fatalf("crashing member got nothing: %v", fetched.Error())
	}

	dh, dead := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: topic + ".dlq", Group: "ops"}, dh)
	subscribe(t, b, cfg, h)
	d := receive(t, dead, []*message.Message{m})[0]
	if got := d.Msg.Extensions[broker.ExtDeadLetterReason]; !strings.Contains(got, "not settled") {
		t.Errorf("reason = %q, want it to say the message was not settled", got)
	}
	if got := d.Msg.Extensions[broker.ExtDeadLetterAttempts]; got != "2" {
		t.Errorf("attempts = %q, want 2", got)
	}
	if c := calls.Load(); c != 0 {
		t.Errorf("handler called with %d deliveries beyond MaxDeliver", c)
	}
}

// TestSubscribe_HandlerPanicRedelivers: a handler that panics does not stop
// the subscription; its unsettled deliveries come back.
func TestSubscribe_HandlerPanicRedelivers(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	got := make(chan int, 16)
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "billing", NakDelay: 20 * time.Millisecond},
		func(_ context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				got <- d.Attempt
				if d.Attempt == 1 {
					panic("handler bug")
				}
				d.Ack()
			}
		})
	publishAll(t, b, topic, 1, numbered(1, "s"))
	for want := 1; want <= 2; want++ {
		select {
		case a := <-got:
			if a != want {
				t.Fatalf("delivery with attempt %d, want %d", a, want)
			}
		case <-time.After(wait):
			t.Fatalf("attempt %d not delivered", want)
		}
	}
}

// TestSubscribe_ContextEndStopsSubscription: ending Subscribe's context
// cancels the handler's context and ends the subscription.
func TestSubscribe_ContextEndStopsSubscription(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	entered := make(chan struct{}, 1)
	returned := make(chan error, 1)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "billing"},
		func(ctx context.Context, batch []*broker.Delivery) {
			entered <- struct{}{}
			<-ctx.Done()
			returned <- ctx.Err()
		})
	if err != nil {
		t.Fatal(err)
	}
	publishAll(t, b, topic, 1, numbered(1, "s"))
	select {
	case <-entered:
	case <-time.After(wait):
		t.Fatal("handler not called")
	}
	cancel()
	select {
	case err := <-returned:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("handler context ended with %v, want context.Canceled", err)
		}
	case <-time.After(wait):
		t.Fatal("handler context not canceled")
	}
	stopSub(t, sub) // returns at once: the subscription has ended
}

// TestPublish_ExistingStreamIsUsed: a topic captured by a stream an operator
// created is stored there, and its groups live there too.
func TestPublish_ExistingStreamIsUsed(t *testing.T) {
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	if _, err := b.js.CreateStream(ctx, jetstream.StreamConfig{Name: "SHOP", Subjects: []string{"shop.>"}}); err != nil {
		t.Fatal(err)
	}
	msgs := numbered(3, "s")
	h, got := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: "shop.orders", Group: "billing"}, h)
	publishAll(t, b, "shop.orders", 3, msgs)
	receive(t, got, msgs)

	shop, err := b.js.Stream(ctx, "SHOP")
	if err != nil {
		t.Fatal(err)
	}
	if info, err := shop.Info(ctx); err != nil || info.State.Msgs != 3 {
		t.Errorf("stream SHOP holds %v messages (err %v), want 3", info.State.Msgs, err)
	}
	if _, err := shop.Consumer(ctx, "billing_shop_orders"); err != nil {
		t.Errorf("group consumer in SHOP: %v", err)
	}
	if _, err := b.js.Stream(ctx, escapeName("shop.orders")); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("a stream of its own was made for the topic (err %v)", err)
	}
}

// TestPublish_FailuresAreReportedPerMessage: an invalid message without a
// Subject fails alone; the rest of the batch, larger than one asynchronous
// window, is stored.
func TestPublish_FailuresAreReportedPerMessage(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	msgs := numbered(publishWindow+500, "")
	msgs[7].Source = ""
	err := b.Publish(ctx, topic, msgs...)
	var perr *broker.PublishError
	if !errors.As(err, &perr) {
		t.Fatalf("Publish = %v, want a *broker.PublishError", err)
	}
	if len(perr.Failed) != 1 || perr.Failed[7] == nil || perr.Total != len(msgs) || !errors.Is(err, message.ErrInvalid) {
		t.Errorf("PublishError = %+v, want message 7 failed with message.ErrInvalid out of %d", perr, len(msgs))
	}
	s, err := b.js.Stream(ctx, escapeName(topic))
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != uint64(len(msgs)-1) {
		t.Errorf("stream holds %d messages, want %d", info.State.Msgs, len(msgs)-1)
	}
}

// TestClose_OwnServerStopsSharedServerStays: closing a broker that shares
// another's server leaves the server running; closing the owner stops it.
func TestClose_OwnServerStopsSharedServerStays(t *testing.T) {
	owner := newBroker(t, Config{DataDir: t.TempDir()})
	guest := newBroker(t, Config{Server: owner.Server()})
	if err := guest.Close(); err != nil {
		t.Fatal(err)
	}
	publishAll(t, owner, "shop.orders", 1, numbered(1, "s"))
	if err := owner.Close(); err != nil {
		t.Fatal(err)
	}
	if owner.Server().Running() {
		t.Error("embedded server still running after its owner closed")
	}
}

// TestSubscribe_DeletedConsumerIsRecreated: a group whose consumer an
// operator deleted goes on receiving messages.
func TestSubscribe_DeletedConsumerIsRecreated(t *testing.T) {
	const topic = "shop.orders"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	first, second := numbered(1, "s"), numbered(1, "s")
	h, got := collect()
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "billing"}, h)
	publishAll(t, b, topic, 1, first)
	receive(t, got, first)
	if err := b.js.DeleteConsumer(t.Context(), escapeName(topic), "billing"); err != nil {
		t.Fatal(err)
	}
	publishAll(t, b, topic, 1, second)
	receive(t, got, second)
}

// TestSubscribe_HandlerSlowerThanAckWaitKeepsItsMessages: while a handler
// works on a batch for longer than AckWait, neither the batch nor the
// message of the same pull waiting behind it is redelivered to another
// member of the group, and both are handled on their first attempt.
func TestSubscribe_HandlerSlowerThanAckWaitKeepsItsMessages(t *testing.T) {
	const topic, ackWait = "shop.orders", time.Second
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	cfg := broker.SubscribeConfig{Topic: topic, Group: "billing", AckWait: ackWait, MaxBatch: 10}
	first, second := numbered(1, "s"), numbered(1, "s")

	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	handled := make(chan *broker.Delivery, 16)
	var calls atomic.Int32
	subscribe(t, b, cfg, func(ctx context.Context, batch []*broker.Delivery) {
		if calls.Add(1) == 1 {
			close(entered)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		for _, d := range batch {
			d.Ack()
			handled <- d
		}
	})
	t.Cleanup(func() { once.Do(func() { close(release) }) }) // before the Stop of subscribe's cleanup

	publishAll(t, b, topic, 1, first)
	select {
	case <-entered:
	case <-time.After(wait):
		t.Fatal("handler not called")
	}
	// Published while the pull is still open: it arrives at the slow member
	// and waits behind the handler call.
	publishAll(t, b, topic, 1, second)
	cons, err := b.js.Consumer(ctx, escapeName(topic), "billing")
	if err != nil {
		t.Fatal(err)
	}
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for deadline := time.Now().Add(wait); ; <-poll.C {
		info, err := cons.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.NumAckPending == 2 && info.NumPending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("both messages not delivered to the slow member: %d awaiting ack, %d not delivered",
				info.NumAckPending, info.NumPending)
		}
	}

	// Another member joins; for three times AckWait it gets nothing.
	other := make(chan *broker.Delivery, 16)
	subscribe(t, b, cfg, func(_ context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			d.Ack()
			other <- d
		}
	})
	select {
	case d := <-other:
		t.Fatalf("message %s (attempt %d) redelivered to another member while the first was handling it", d.Msg.Data, d.Attempt)
	case <-time.After(3 * ackWait):
	}

	once.Do(func() { close(release) })
	for range 2 {
		select {
		case d := <-handled:
			if d.Attempt != 1 {
				t.Errorf("message %s handled on attempt %d, want 1", d.Msg.Data, d.Attempt)
			}
		case d := <-other:
			t.Fatalf("message %s (attempt %d) redelivered to another member", d.Msg.Data, d.Attempt)
		case <-time.After(wait):
			t.Fatal("slow member did not handle both messages")
		}
	}
	info, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.NumRedelivered != 0 {
		t.Errorf("%d messages were redelivered", info.NumRedelivered)
	}
}

// TestStop_MessagesOnTheWayAreNotStranded: stopping members while messages
// flow loses none of those the server had sent to them: the group gets
// every message long before AckWait would bring a stranded one back, none
// is dead-lettered for the attempts its bounces cost, and each Stop returns
// within about a second.
func TestStop_MessagesOnTheWayAreNotStranded(t *testing.T) {
	const topic, members = "shop.orders", 6
	b := newBroker(t, Config{DataDir: t.TempDir()})
	// A stranded message would come back only after AckWait, beyond the
	// test's wait.
	cfg := broker.SubscribeConfig{Topic: topic, Group: "billing", AckWait: 2 * wait, MaxBatch: 20}

	var mu sync.Mutex
	var published []*message.Message
	stopPublishing, publisherDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(publisherDone)
		for {
			select {
			case <-stopPublishing:
				return
			default:
			}
			m := numbered(1, "s")
			if err := b.Publish(context.Background(), topic, m...); err != nil {
				t.Errorf("Publish: %v", err)
				return
			}
			mu.Lock()
			published = append(published, m[0])
			mu.Unlock()
		}
	}()
	defer func() {
		select {
		case <-stopPublishing:
		default:
			close(stopPublishing)
		}
		<-publisherDone
	}()

	got := make(chan *broker.Delivery, 1<<16)
	handler := func(_ context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			d.Ack()
			got <- d
		}
	}
	received := make(map[string]bool)
	var slowest time.Duration
	for i := range members {
		sub := subscribe(t, b, cfg, handler)
		// Stop once this member has handled some messages, while more flow.
		for n := 0; n < 20; {
			select {
			case d := <-got:
				received[d.Msg.ID] = true
				n++
			case <-time.After(wait):
				t.Fatalf("member %d received %d messages within %v", i, n, wait)
			}
		}
		start := time.Now()
		stopSub(t, sub)
		slowest = max(slowest, time.Since(start))
	}
	close(stopPublishing)
	<-publisherDone

	last := subscribe(t, b, cfg, handler)
	mu.Lock()
	all := published
	mu.Unlock()
	missing := 0
	for _, m := range all {
		if !received[m.ID] {
			missing++
		}
	}
	timeout := time.After(wait)
	for missing > 0 {
		select {
		case d := <-got:
			if !received[d.Msg.ID] {
				received[d.Msg.ID] = true
				missing--
			}
		case <-timeout:
			t.Fatalf("%d of %d messages not received within %v (AckWait %v): stranded at a stopped member, or dead-lettered",
				missing, len(all), wait, cfg.AckWait)
		}
	}
	// An idle member waits for its pull to expire.
	start := time.Now()
	stopSub(t, last)
	slowest = max(slowest, time.Since(start))
	if slowest > 3*pullWait {
		t.Errorf("slowest Stop took %v, want about pullWait (%v) at most", slowest, pullWait)
	}
}
