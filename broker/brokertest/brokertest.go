package brokertest

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// Features says what a broker promises beyond the common contract.
type Features struct {
	// DedupByID: the broker drops a message whose (Source, ID) it has
	// already accepted on the same topic within its dedup window. Without it
	// the suite only checks that a re-published message is delivered at
	// least once.
	DedupByID bool
	// AttemptsSurviveCrash: Delivery.Attempt also counts deliveries made to
	// a client that crashed before settling, so a message that keeps
	// crashing its consumers still reaches MaxDeliver and is dead-lettered.
	// Without it the suite only checks that such a message is redelivered.
	AttemptsSurviveCrash bool
}

// Factory returns a new client connected to the same backend on every call
// made with the same t, so that a test can open two clients, "crash" one by
// closing it, and consume with the other. The suite closes every client it
// opens. Subtests run in parallel, so a Factory must be safe for concurrent
// use; it may keep one backend per t (each subtest has its own t).
type Factory func(t *testing.T) broker.Broker

// waitTimeout bounds every wait for a message or a return. It is generous
// because the suite runs under -race on small machines; a passing run never
// waits for it.
const waitTimeout = 20 * time.Second

// Run runs the conformance suite against the brokers newBroker returns. Each
// subtest runs in parallel with its own topics and groups.
func Run(t *testing.T, newBroker Factory, f Features) {
	s := &suite{newBroker: newBroker, features: f}
	tests := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"PublishedMessagesAreDelivered", s.testPublishedMessagesAreDelivered},
		{"AtLeastOnceAcrossBatches", s.testAtLeastOnceAcrossBatches},
		{"PerSubjectOrder", s.testPerSubjectOrder},
		{"NewGroupStartsAtOldestMessage", s.testNewGroupStartsAtOldestMessage},
		{"NakRedeliversAfterDelay", s.testNakRedeliversAfterDelay},
		{"UnsettledIsRedelivered", s.testUnsettledIsRedelivered},
		{"HandlerMayReorderItsBatch", s.testHandlerMayReorderItsBatch},
		{"CrashedConsumerMessagesRedelivered", s.testCrashedConsumerMessagesRedelivered},
		{"GroupResumesAfterRestart", s.testGroupResumesAfterRestart},
		{"GroupsAreIndependent", s.testGroupsAreIndependent},
		{"MembersShareGroup", s.testMembersShareGroup},
		{"DeadLetterWithReason", s.testDeadLetterWithReason},
		{"MaxDeliverDeadLetters", s.testMaxDeliverDeadLetters},
		{"HandlerPanicIsRedeliveredThenDeadLettered", s.testHandlerPanicIsRedeliveredThenDeadLettered},
		{"RepublishedID", s.testRepublishedID},
		{"StopWaitsForHandlerAndSettles", s.testStopWaitsForHandlerAndSettles},
		{"StopHonoursContext", s.testStopHonoursContext},
		{"ContextEndStopsSubscription", s.testContextEndStopsSubscription},
		{"CloseIsClean", s.testCloseIsClean},
		{"PublishAfterCloseFails", s.testPublishAfterCloseFails},
		{"PublishNothingIsNoop", s.testPublishNothingIsNoop},
		{"PublishWithCanceledContextFails", s.testPublishWithCanceledContextFails},
		{"SubscribeConfigValidated", s.testSubscribeConfigValidated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t)
		})
	}
}

type suite struct {
	newBroker Factory
	features  Features
	seq       atomic.Int64
}

// client is a broker opened by the suite, closed once at the end of the test
// unless the test closed it first.
type client struct {
	broker.Broker
	once     sync.Once
	closeErr error
}

// close closes the broker once and returns Close's error.
func (c *client) close() error {
	c.once.Do(func() { c.closeErr = c.Broker.Close() })
	return c.closeErr
}

// open returns a new client of t's backend, closed when t ends.
func (s *suite) open(t *testing.T) *client {
	t.Helper()
	b := s.newBroker(t)
	if b == nil {
		t.Fatal("Factory returned a nil broker")
	}
	c := &client{Broker: b}
	t.Cleanup(func() {
		done := make(chan struct{})
		go func() {
			defer close(done)
			if err := c.close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}()
		select {
		case <-done:
		case <-time.After(waitTimeout):
			t.Errorf("Close did not return within %v", waitTimeout)
		}
	})
	return c
}

// name returns a topic or group name unique to this run: letters, digits,
// '-' and '.', valid on every broker.
func (s *suite) name(t *testing.T, kind string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(t.Name()) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-':
			b.WriteRune(r)
		case r == '/':
			b.WriteRune('.')
		}
	}
	return fmt.Sprintf("bt.%s.%s%d-%06x", b.String(), kind, s.seq.Add(1), rand.Uint32()&0xffffff)
}

// subscribe subscribes or fails the test, and stops the subscription when
// the test ends.
func (s *suite) subscribe(t *testing.T, b broker.Broker, cfg broker.SubscribeConfig, h broker.Handler) broker.Subscription {
	t.Helper()
	// The subscription ends with the test's context at the latest; the
	// cleanup's Stop then returns at once.
	sub, err := b.Subscribe(t.Context(), cfg, h)
	if err != nil {
		t.Fatalf("Subscribe(topic %q, group %q): %v", cfg.Topic, cfg.Group, err)
	}
	if sub == nil {
		t.Fatalf("Subscribe(topic %q, group %q) returned a nil subscription", cfg.Topic, cfg.Group)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		_ = sub.Stop(ctx) // may already be stopped, or its broker closed
	})
	return sub
}

// publish publishes msgs or fails the test.
func publish(t *testing.T, b broker.Publisher, topic string, msgs ...*message.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := b.Publish(ctx, topic, msgs...); err != nil {
		t.Fatalf("Publish %d messages to %q: %v", len(msgs), topic, err)
	}
}

// publishInBatches publishes msgs in Publish calls of at most size messages.
func publishInBatches(t *testing.T, b broker.Publisher, topic string, size int, msgs []*message.Message) {
	t.Helper()
	for len(msgs) > 0 {
		n := min(size, len(msgs))
		publish(t, b, topic, msgs[:n]...)
		msgs = msgs[n:]
	}
}

// newMessage returns a message about subject whose data names i.
func newMessage(subject string, i int) *message.Message {
	m := message.New("/brokertest", "brokertest.numbered", fmt.Appendf(nil, `{"i":%d}`, i))
	m.Subject = subject
	m.DataContentType = "application/json"
	return m
}

// newMessages returns n messages spread round-robin over subjects.
func newMessages(n int, subjects ...string) []*message.Message {
	msgs := make([]*message.Message, n)
	for i := range msgs {
		msgs[i] = newMessage(subjects[i%len(subjects)], i)
	}
	return msgs
}

// got is one delivery seen by a handler.
type got struct {
	msg       *message.Message
	topic     string
	attempt   int
	at        time.Time
	batchSize int
	member    int
}

// inbox collects what handlers see. Handlers never block on it.
type inbox struct {
	mu     sync.Mutex
	all    []got
	notify chan struct{}
}

func newInbox() *inbox { return &inbox{notify: make(chan struct{}, 1)} }

func (in *inbox) add(g got) {
	in.mu.Lock()
	in.all = append(in.all, g)
	in.mu.Unlock()
	select {
	case in.notify <- struct{}{}:
	default:
	}
}

// snapshot returns a copy of what has been seen so far.
func (in *inbox) snapshot() []got {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]got(nil), in.all...)
}

// waitUntil waits until cond holds for what has been seen, and returns it.
// It fails the test after waitTimeout, describing what it waited for.
func (in *inbox) waitUntil(t *testing.T, what string, cond func([]got) bool) []got {
	t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		all := in.snapshot()
		if cond(all) {
			return all
		}
		select {
		case <-in.notify:
		case <-deadline.C:
			t.Fatalf("waited %v for %s; saw %d deliveries: %s", waitTimeout, what, len(all), describe(all))
		}
	}
}

// quiet waits until the time until, then returns everything seen. It serves
// the one check that needs time to pass: that something does not happen.
func (in *inbox) quiet(until time.Time) []got {
	time.Sleep(time.Until(until))
	return in.snapshot()
}

// waitIDs waits until every id in want has been seen, and returns everything
// seen.
func (in *inbox) waitIDs(t *testing.T, what string, want []*message.Message) []got {
	t.Helper()
	return in.waitUntil(t, what, func(all []got) bool {
		return len(missing(all, want)) == 0
	})
}

// missing returns the ids of want not seen in all.
func missing(all []got, want []*message.Message) []string {
	seen := make(map[string]bool, len(all))
	for _, g := range all {
		seen[g.msg.ID] = true
	}
	var out []string
	for _, m := range want {
		if !seen[m.ID] {
			out = append(out, m.ID)
		}
	}
	return out
}

// describe summarises deliveries for a failure message.
func describe(all []got) string {
	var b strings.Builder
	for i, g := range all {
		if i == 10 {
			fmt.Fprintf(&b, " ... (%d more)", len(all)-i)
			break
		}
		fmt.Fprintf(&b, "[%s subject=%q attempt=%d data=%s] ", g.msg.ID, g.msg.Subject, g.attempt, g.msg.Data)
	}
	return b.String()
}

// acking returns a handler that acks every delivery and records it in in.
func acking(in *inbox) broker.Handler {
	return recording(in, 0, func(d *broker.Delivery) { d.Ack() })
}

// recording returns a handler that records every delivery in in, as seen by
// member, and then settles it with settle.
func recording(in *inbox, member int, settle func(d *broker.Delivery)) broker.Handler {
	return func(_ context.Context, batch []*broker.Delivery) {
		now := time.Now()
		for _, d := range batch {
			in.add(got{msg: d.Msg, topic: d.Topic, attempt: d.Attempt, at: now, batchSize: len(batch), member: member})
			settle(d)
		}
	}
}

// countIDs counts deliveries per message id.
func countIDs(all []got) map[string]int {
	n := make(map[string]int, len(all))
	for _, g := range all {
		n[g.msg.ID]++
	}
	return n
}

// sameMessage reports how got differs from want, or "" when every
// CloudEvents attribute, extension and the data survived.
func sameMessage(got, want *message.Message) string {
	var diffs []string
	field := func(name, g, w string) {
		if g != w {
			diffs = append(diffs, fmt.Sprintf("%s = %q, want %q", name, g, w))
		}
	}
	field("ID", got.ID, want.ID)
	field("Source", got.Source, want.Source)
	field("Type", got.Type, want.Type)
	field("Subject", got.Subject, want.Subject)
	field("DataContentType", got.DataContentType, want.DataContentType)
	field("DataSchema", got.DataSchema, want.DataSchema)
	field("CorrelationID", got.CorrelationID, want.CorrelationID)
	field("CausationID", got.CausationID, want.CausationID)
	field("TraceParent", got.TraceParent, want.TraceParent)
	if !got.Time.Equal(want.Time) {
		diffs = append(diffs, fmt.Sprintf("Time = %v, want %v", got.Time, want.Time))
	}
	if !bytes.Equal(got.Data, want.Data) {
		diffs = append(diffs, fmt.Sprintf("Data = %q, want %q", got.Data, want.Data))
	}
	if len(got.Extensions) != 0 || len(want.Extensions) != 0 {
		if !maps.Equal(got.Extensions, want.Extensions) {
			diffs = append(diffs, fmt.Sprintf("Extensions = %v, want %v", got.Extensions, want.Extensions))
		}
	}
	return strings.Join(diffs, "; ")
}
