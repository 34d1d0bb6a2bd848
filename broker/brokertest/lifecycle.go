package brokertest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// stop stops sub or fails the test.
func stop(t *testing.T, sub broker.Subscription) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := sub.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}

// blockingHandler returns a handler that reports each call on entered, acks
// its deliveries, and returns once release is closed, setting returned just
// before it does.
func blockingHandler(entered chan<- []string, release <-chan struct{}, returned *atomic.Bool) broker.Handler {
	return func(_ context.Context, batch []*broker.Delivery) {
		ids := make([]string, len(batch))
		for i, d := range batch {
			ids[i] = d.Msg.ID
			d.Ack()
		}
		entered <- ids
		<-release
		returned.Store(true)
	}
}

// testStopWaitsForHandlerAndSettles: Stop returns only after the handler
// call in flight has returned, promptly once it has, and settles that call's
// deliveries: the group's next subscription does not see the acked message.
func (s *suite) testStopWaitsForHandlerAndSettles(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	cfg := broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 1}
	m := newMessage("s", 0)

	entered := make(chan []string, 16)
	release := make(chan struct{})
	var returned atomic.Bool
	sub := s.subscribe(t, b, cfg, blockingHandler(entered, release, &returned))
	publish(t, b, topic, m)
	select {
	case <-entered:
	case <-time.After(waitTimeout):
		t.Fatalf("handler not called within %v", waitTimeout)
	}

	stopped := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		stopped <- sub.Stop(ctx)
	}()
	// Give a wrong Stop a moment to return early; a right one cannot.
	select {
	case <-stopped:
		t.Fatal("Stop returned while the handler was still running")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	released := time.Now()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Stop: %v", err)
		}
		if !returned.Load() {
			t.Fatal("Stop returned before the handler did")
		}
		if d := time.Since(released); d > 5*time.Second {
			t.Errorf("Stop took %v after the handler returned", d)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("Stop did not return within %v of the handler returning", waitTimeout)
	}
	select {
	case ids := <-entered:
		t.Errorf("handler called again after Stop, with %v", ids)
	default:
	}

	// The acked message stays acked: the next subscription of the group sees
	// only the message published after it.
	last := newMessage("s", 1)
	publish(t, b, topic, last)
	in := newInbox()
	s.subscribe(t, b, cfg, acking(in))
	all := in.waitIDs(t, "the message published after Stop", []*message.Message{last})
	if c := countIDs(all)[m.ID]; c != 0 {
		t.Errorf("message acked in the call Stop waited for was delivered again")
	}
}

// testStopHonoursContext: Stop gives up when its context ends before the
// handler returns, and says so.
func (s *suite) testStopHonoursContext(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")

	entered := make(chan []string, 16)
	release := make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	var returned atomic.Bool
	sub := s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group}, blockingHandler(entered, release, &returned))
	publish(t, b, topic, newMessage("s", 0))
	select {
	case <-entered:
	case <-time.After(waitTimeout):
		t.Fatalf("handler not called within %v", waitTimeout)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- sub.Stop(ctx) }()
	select {
	case err := <-stopped:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Stop with a stuck handler and an expired context = %v, want context.DeadlineExceeded", err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("Stop did not return within %v after its context ended", waitTimeout)
	}
	releaseOnce.Do(func() { close(release) })
}

// testContextEndStopsSubscription: ending the context passed to Subscribe
// cancels the context of the handler call in flight and ends the
// subscription: the handler is not called again, a later Stop returns
// without error, what was acked stays acked, and the message the cut-short
// call left unsettled is delivered to the group's next subscription.
func (s *suite) testContextEndStopsSubscription(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	cfg := broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 1, NakDelay: 50 * time.Millisecond}
	// One subject: acked is handled, and its ack settled, before cut.
	acked, cut := newMessage("s", 0), newMessage("s", 1)

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	calls := make(chan string, 16)
	ended := make(chan error, 1)
	release := make(chan struct{}) // frees a handler the broker never cancels
	sub, err := b.Subscribe(ctx, cfg, func(hctx context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			calls <- d.Msg.ID
			if d.Msg.ID != cut.ID {
				d.Ack()
				continue
			}
			select { // cut stays unsettled
			case <-hctx.Done():
				ended <- hctx.Err()
			case <-release:
			}
		}
	})
	if err != nil {
		t.Fatalf("Subscribe(topic %q, group %q): %v", topic, group, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		_ = sub.Stop(ctx)
	})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })

	publish(t, b, topic, acked, cut)
	var seen []string
	for len(seen) < 2 {
		select {
		case id := <-calls:
			seen = append(seen, id)
		case <-time.After(waitTimeout):
			t.Fatalf("handler not called with both messages within %v; saw %v", waitTimeout, seen)
		}
	}
	if seen[0] != acked.ID || seen[1] != cut.ID {
		t.Fatalf("handler saw %v, want [%s %s]", seen, acked.ID, cut.ID)
	}

	cancel()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("handler context ended with %v, want context.Canceled", err)
		}
	case <-time.After(waitTimeout):
		t.Fatalf("handler context not canceled within %v of the Subscribe context ending", waitTimeout)
	}
	stop(t, sub)
	select {
	case id := <-calls:
		t.Errorf("handler called again, with %s, after the Subscribe context ended", id)
	default:
	}

	// The next subscription of the group gets cut, counted as delivered
	// once already, and not acked: per-subject order would bring acked
	// before cut, had its ack been lost.
	in := newInbox()
	s.subscribe(t, b, cfg, acking(in))
	all := in.waitIDs(t, "the message left unsettled when the context ended", []*message.Message{cut})
	for _, g := range all {
		switch g.msg.ID {
		case acked.ID:
			t.Errorf("message acked before the context ended was delivered again (attempt %d)", g.attempt)
		case cut.ID:
			if g.attempt < 2 {
				t.Errorf("message cut short by the context's end redelivered with Attempt %d, want at least 2", g.attempt)
			}
		}
	}
}

// testCloseIsClean: Close stops running subscriptions and returns nil, and a
// second Close and a Stop after Close return without hanging.
func (s *suite) testCloseIsClean(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	in := newInbox()
	sub := s.subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group}, acking(in))
	m := newMessage("s", 0)
	publish(t, b, topic, m)
	in.waitIDs(t, "one message", []*message.Message{m})

	if err := b.close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = b.Broker.Close()
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		_ = sub.Stop(ctx)
	}()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		t.Fatalf("a second Close, or Stop after Close, did not return within %v", waitTimeout)
	}
}

// testPublishAfterCloseFails: Publish and Subscribe on a closed broker return
// broker.ErrClosed.
func (s *suite) testPublishAfterCloseFails(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	publish(t, b, topic, newMessage("s", 0))
	if err := b.close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := b.Publish(ctx, topic, newMessage("s", 1)); !errors.Is(err, broker.ErrClosed) {
		t.Errorf("Publish after Close = %v, want broker.ErrClosed", err)
	}
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: group}, func(context.Context, []*broker.Delivery) {})
	if !errors.Is(err, broker.ErrClosed) {
		t.Errorf("Subscribe after Close = %v, want broker.ErrClosed", err)
	}
	if sub != nil {
		_ = sub.Stop(ctx)
	}
}

// testPublishNothingIsNoop: publishing no messages succeeds.
func (s *suite) testPublishNothingIsNoop(t *testing.T) {
	b := s.open(t)
	publish(t, b, s.name(t, "t"))
}

// testPublishWithCanceledContextFails: Publish with a context that has
// already ended reports the context's error instead of claiming success.
func (s *suite) testPublishWithCanceledContextFails(t *testing.T) {
	b := s.open(t)
	topic := s.name(t, "t")
	publish(t, b, topic, newMessage("s", 0)) // the topic exists
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Publish(ctx, topic, newMessage("s", 1), newMessage("s", 2)); !errors.Is(err, context.Canceled) {
		t.Errorf("Publish with a canceled context = %v, want context.Canceled", err)
	}
}

// testSubscribeConfigValidated: Subscribe rejects a config without Topic or
// Group, or whose dead-letter topic is the topic itself.
func (s *suite) testSubscribeConfigValidated(t *testing.T) {
	b := s.open(t)
	topic, group := s.name(t, "t"), s.name(t, "g")
	h := func(context.Context, []*broker.Delivery) {}
	for _, tt := range []struct {
		name string
		cfg  broker.SubscribeConfig
	}{
		{"no topic", broker.SubscribeConfig{Group: group}},
		{"no group", broker.SubscribeConfig{Topic: topic}},
		{"nothing", broker.SubscribeConfig{}},
		{"dead letters to itself", broker.SubscribeConfig{Topic: topic, Group: group, DeadLetterTopic: topic}},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		sub, err := b.Subscribe(ctx, tt.cfg, h)
		if err == nil {
			t.Errorf("%s: Subscribe(%+v) succeeded, want an error", tt.name, tt.cfg)
		}
		if sub != nil {
			_ = sub.Stop(ctx)
		}
		cancel()
	}
}
