package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/kafka"
	"github.com/troupedev/troupe/message"
)

// TestSubscribe_CommitsOnlyAfterHandling: the group's committed offset
// covers only the records the handler settled, so the group's next
// subscription starts at the first record not acked, and knows it was
// delivered once already.
func TestSubscribe_CommitsOnlyAfterHandling(t *testing.T) {
	t.Parallel()
	const n, k = 10, 4
	c := newCluster(t)
	b := newBroker(t, c)
	topic, group := "orders", "billing"
	msgs := numbered("order-1", n)
	publish(t, b, topic, msgs...)

	first := newCollector()
	cfg := broker.SubscribeConfig{Topic: topic, Group: group, NakDelay: time.Hour}
	sub := subscribe(t, b, cfg, first.handler(0, func(d *broker.Delivery) {
		if i, _ := strconv.Atoi(string(d.Msg.Data)); i < k {
			d.Ack()
		} // the others are left unsettled
	}))
	first.waitIDs(t, fmt.Sprintf("message %d", k), msgs[k])
	stop(t, sub)

	offs := committed(t, c, group, topic)
	if len(offs) != 1 {
		t.Fatalf("committed offsets = %v, want one partition (one subject)", offs)
	}
	for p, o := range offs {
		if o.At != k {
			t.Errorf("partition %d committed at %d, want %d: only the first %d records were acked", p, o.At, k, k)
		}
		if want := "troupe.attempts=1"; o.Metadata != want {
			t.Errorf("partition %d commit metadata = %q, want %q", p, o.Metadata, want)
		}
	}

	second := newCollector()
	cfg.NakDelay = 0
	subscribe(t, b, cfg, second.acking())
	all := second.waitIDs(t, "the records not acked", msgs[k:]...)
	if all[0].data != strconv.Itoa(k) || all[0].attempt != 2 {
		t.Errorf("next subscription starts with %s, want %d/2 (its second delivery)", sequence(all[:1]), k)
	}
	for _, d := range all {
		if i, _ := strconv.Atoi(d.data); i < k {
			t.Errorf("acked message %d delivered again to the group's next subscription", i)
		}
	}
}

// TestSubscribe_ContextEndCommitsSettledAndLeavesGroup: when Subscribe's
// context ends during a handler call, the acks the handler makes after
// seeing its context canceled are committed, the rest of the batch is not,
// and the member leaves the group on its own; Stop then has nothing left to
// do.
func TestSubscribe_ContextEndCommitsSettledAndLeavesGroup(t *testing.T) {
	t.Parallel()
	const n, k = 10, 4
	c := newCluster(t)
	b := newBroker(t, c)
	topic, group := "orders", "billing"
	msgs := numbered("order-1", n)
	publish(t, b, topic, msgs...)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	entered := make(chan struct{}, 1)
	ended := make(chan error, 1)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: group}, func(hctx context.Context, batch []*broker.Delivery) {
		holdsK := slices.ContainsFunc(batch, func(d *broker.Delivery) bool { return string(d.Msg.Data) == strconv.Itoa(k) })
		if holdsK {
			select {
			case entered <- struct{}{}:
			default:
			}
			<-hctx.Done()
			select {
			case ended <- hctx.Err():
			default:
			}
		}
		for _, d := range batch {
			if i, _ := strconv.Atoi(string(d.Msg.Data)); i < k {
				d.Ack()
			} // the others are left unsettled
		}
	})
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = sub.Stop(ctx) // cancels the handler's context if nothing else did
	})
	select {
	case <-entered:
	case <-time.After(20 * time.Second):
		t.Fatalf("handler not called with message %d within 20s", k)
	}

	cancel()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("handler context ended with %v, want context.Canceled", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("handler context not canceled within 20s of the Subscribe context ending")
	}
	waitForEmptyGroup(t, c, group)

	offs := committed(t, c, group, topic)
	if len(offs) != 1 {
		t.Fatalf("committed offsets = %v, want one partition (one subject)", offs)
	}
	for p, o := range offs {
		if o.At != k || o.Metadata != "troupe.attempts=1" {
			t.Errorf("partition %d committed at %d with metadata %q, want %d with %q: records before %d were acked, %d once delivered",
				p, o.At, o.Metadata, k, "troupe.attempts=1", k, k)
		}
	}
	start := time.Now()
	stop(t, sub)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Stop after the subscription ended took %v", d)
	}
}

// TestSubscribe_EndedContextFails: Subscribe with a context that has already
// ended reports the context's error, even when the topics are known and it
// has nothing to ask the cluster, instead of returning a subscription that
// is over before it starts.
func TestSubscribe_EndedContextFails(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	cfg := broker.SubscribeConfig{Topic: "orders", Group: "billing"}
	subscribe(t, b, cfg, newCollector().acking()) // the topics are known now

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sub, err := b.Subscribe(ctx, cfg, newCollector().acking())
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Subscribe with an ended context = %v, want context.Canceled", err)
	}
	if sub != nil {
		t.Errorf("Subscribe with an ended context returned a subscription")
		stop(t, sub)
	}
}

// waitForEmptyGroup waits until group has no members.
func waitForEmptyGroup(t *testing.T, c *kfake.Cluster, group string) {
	t.Helper()
	adm := kadm.NewClient(rawClient(t, c))
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		groups, err := adm.DescribeGroups(ctx, group)
		cancel()
		if g, ok := groups[group]; err == nil && ok && g.Err == nil && len(g.Members) == 0 {
			return
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("group %q still has members after 20s: %+v (%v)", group, groups[group], err)
		}
	}
}

// TestNak_KeepsPartitionOrder: a Nak'ed record comes back before any later
// record of its partition is delivered.
func TestNak_KeepsPartitionOrder(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	msgs := numbered("order-1", 6)
	publish(t, b, "orders", msgs...)

	seen := newCollector()
	subscribe(t, b, broker.SubscribeConfig{Topic: "orders", Group: "billing", MaxBatch: 1, NakDelay: 50 * time.Millisecond},
		seen.handler(0, func(d *broker.Delivery) {
			if string(d.Msg.Data) == "2" && d.Attempt == 1 {
				d.Nak(0)
				return
			}
			d.Ack()
		}))
	all := seen.waitIDs(t, "every message", msgs...)
	if got, want := sequence(all), "0/1 1/1 2/1 2/2 3/1 4/1 5/1"; got != want {
		t.Errorf("deliveries (data/attempt) = %s, want %s", got, want)
	}
}

// TestNak_BatchMatesBehindItAreNotCommitted: records acked in the same batch
// as a Nak'ed one, behind it, are not committed until it is settled: the
// committed offset stays on the Nak'ed record.
func TestNak_BatchMatesBehindItAreNotCommitted(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	msgs := numbered("order-1", 6)
	publish(t, b, "orders", msgs...) // one produce batch, so one fetch

	seen := newCollector()
	cfg := broker.SubscribeConfig{Topic: "orders", Group: "billing"}
	sub := subscribe(t, b, cfg, seen.handler(0, func(d *broker.Delivery) {
		if string(d.Msg.Data) == "2" {
			d.Nak(time.Hour)
			return
		}
		d.Ack()
	}))
	all := seen.waitIDs(t, "the batch", msgs...)
	if all[2].batch != all[5].batch {
		t.Fatalf("precondition: messages 2 and 5 arrived in different batches (%s)", sequence(all))
	}
	stop(t, sub)

	for p, o := range committed(t, c, "billing", "orders") {
		if o.At != 2 {
			t.Errorf("partition %d committed at %d, want 2 (the Nak'ed record) although 3..5 were acked", p, o.At)
		}
	}
}

// TestNak_BatchMatesBehindItAreNotRedelivered: records acked in the same
// batch as a Nak'ed one, behind it, are not delivered again when it comes
// back; once it is acked the position moves past all of them.
func TestNak_BatchMatesBehindItAreNotRedelivered(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	msgs := numbered("order-1", 6)
	publish(t, b, "orders", msgs...) // one produce batch, so one fetch

	seen := newCollector()
	cfg := broker.SubscribeConfig{Topic: "orders", Group: "billing", NakDelay: 50 * time.Millisecond}
	sub := subscribe(t, b, cfg, seen.handler(0, func(d *broker.Delivery) {
		if string(d.Msg.Data) == "2" && d.Attempt == 1 {
			d.Nak(0)
			return
		}
		d.Ack()
	}))
	seen.waitFor(t, "message 2 redelivered", func(all []delivery) bool {
		return slices.ContainsFunc(all, func(d delivery) bool { return d.data == "2" && d.attempt == 2 })
	})
	last := numbered("order-1", 7)[6]
	publish(t, b, "orders", last)
	all := seen.waitIDs(t, "the last message", last)
	if all[2].batch != all[5].batch {
		t.Fatalf("precondition: messages 2 and 5 arrived in different batches (%s)", sequence(all))
	}
	if got, want := sequence(all), "0/1 1/1 2/1 3/1 4/1 5/1 2/2 6/1"; got != want {
		t.Errorf("deliveries (data/attempt) = %s, want %s", got, want)
	}
	stop(t, sub)
	for p, o := range committed(t, c, "billing", "orders") {
		if o.At != 7 {
			t.Errorf("partition %d committed at %d, want 7", p, o.At)
		}
	}
}

// TestNak_OtherPartitionsProceed: a record waiting for its redelivery holds
// back its own partition only.
func TestNak_OtherPartitionsProceed(t *testing.T) {
	t.Parallel()
	const partitions = 2
	c := newCluster(t)
	b := newBroker(t, c, func(cfg *kafka.Config) { cfg.Partitions = partitions })
	held, free := "a", "b"
	for i := 0; partitionOf(free, partitions) == partitionOf(held, partitions); i++ {
		free = "b" + strconv.Itoa(i)
	}
	stuck := numbered(held, 2)
	flowing := numbered(free, 5)

	seen := newCollector()
	subscribe(t, b, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, seen.handler(0, func(d *broker.Delivery) {
		if d.Msg.ID == stuck[0].ID {
			d.Nak(time.Hour)
			return
		}
		d.Ack()
	}))
	publish(t, b, "orders", stuck[0])
	seen.waitIDs(t, "the message to hold", stuck[0])
	publish(t, b, "orders", stuck[1])
	publish(t, b, "orders", flowing...)
	all := seen.waitIDs(t, "the other partition's messages", flowing...)
	for _, d := range all {
		if d.id == stuck[1].ID {
			t.Errorf("message behind the Nak'ed one, on its partition, delivered before it came back")
		}
	}
}

// TestRebalance_SettledRecordsNotRedelivered: when a second member joins and
// takes partitions over, it starts after what the first member settled, so
// nothing is handled twice.
func TestRebalance_SettledRecordsNotRedelivered(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	one, two := newBroker(t, c), newBroker(t, c)
	var subjects []string
	for i := range 12 {
		subjects = append(subjects, "customer-"+strconv.Itoa(i))
	}
	var before, after []*message.Message
	for _, s := range subjects {
		before = append(before, numbered(s, 10)...)
		after = append(after, numbered(s, 10)...)
	}
	cfg := broker.SubscribeConfig{Topic: "orders", Group: "billing", MaxBatch: 10}

	seen := newCollector()
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	ack := func(d *broker.Delivery) { d.Ack() }
	first := seen.handler(1, ack)
	subscribe(t, one, cfg, func(ctx context.Context, batch []*broker.Delivery) {
		first(ctx, batch)
		once.Do(func() { close(entered); <-release }) // hold the first batch until the second member has asked to join
	})
	publish(t, one, "orders", before...)
	<-entered
	subscribe(t, two, cfg, seen.handler(2, ack))
	close(release)
	waitForMembers(t, c, "billing", 2)
	publish(t, one, "orders", after...)

	all := seen.waitIDs(t, "every message", append(before, after...)...)
	perMember := map[int]int{}
	count := map[string]int{}
	for _, d := range all {
		perMember[d.member]++
		count[d.id]++
	}
	for id, n := range count {
		if n != 1 {
			t.Errorf("message %s handled %d times across the rebalance", id, n)
		}
	}
	if perMember[2] == 0 {
		t.Errorf("second member got nothing after joining: %v", perMember)
	}
	t.Logf("deliveries per member: %v", perMember)
}

// waitForMembers waits until group is stable with n members that each have
// partitions.
func waitForMembers(t *testing.T, c interface{ ListenAddrs() []string }, group string, n int) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		groups, err := adm.DescribeGroups(ctx, group)
		cancel()
		if err == nil && balanced(groups[group], n) {
			return
		}
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("group %q not stable with %d members with partitions within 20s: %+v (%v)", group, n, groups[group], err)
		}
	}
}

func balanced(g kadm.DescribedGroup, n int) bool {
	if g.Err != nil || g.State != "Stable" || len(g.Members) != n {
		return false
	}
	for _, m := range g.Members {
		a, ok := m.Assigned.AsConsumer()
		if !ok || len(a.Topics) == 0 || len(a.Topics[0].Partitions) == 0 {
			return false
		}
	}
	return true
}

// TestSubscribe_UndecodableRecordIsDeadLettered: a record that is not a
// CloudEvent goes to the dead-letter topic as it was, with the reason and
// origin in headers, and the records behind it are delivered.
func TestSubscribe_UndecodableRecordIsDeadLettered(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	b := newBroker(t, c)
	seen := newCollector()
	subscribe(t, b, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, seen.acking()) // creates the topics

	raw := rawClient(t, c)
	bad := &kgo.Record{Topic: "orders", Key: []byte("order-1"), Value: []byte("not a cloud event"), Headers: []kgo.RecordHeader{
		{Key: "ce_source", Value: []byte("/elsewhere")},
		{Key: "ce_deadletterreason", Value: []byte("stale")},
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := raw.ProduceSync(ctx, bad).FirstErr(); err != nil {
		t.Fatal(err)
	}
	good := numbered("order-1", 1)[0]
	publish(t, b, "orders", good)

	all := seen.waitIDs(t, "the message behind the bad record", good)
	if len(all) != 1 {
		t.Errorf("handler got %s, want only the good message", sequence(all))
	}

	dlq := rawClient(t, c, kgo.ConsumeTopics("orders.dlq"))
	var dead *kgo.Record
	for dead == nil {
		fetches := dlq.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("no record on orders.dlq: %v", err)
		}
		if recs := fetches.Records(); len(recs) > 0 {
			dead = recs[0]
		}
	}
	if string(dead.Value) != string(bad.Value) || string(dead.Key) != string(bad.Key) {
		t.Errorf("dead letter key/value = %q/%q, want %q/%q", dead.Key, dead.Value, bad.Key, bad.Value)
	}
	headers := map[string]string{}
	for _, h := range dead.Headers {
		if _, dup := headers[h.Key]; dup {
			t.Errorf("header %q appears twice", h.Key)
		}
		headers[h.Key] = string(h.Value)
	}
	if r := headers["ce_deadletterreason"]; r == "" || r == "stale" {
		t.Errorf("ce_deadletterreason = %q, want the decode error", r)
	}
	for k, want := range map[string]string{
		"ce_source":             "/elsewhere",
		"ce_deadlettertopic":    "orders",
		"ce_deadlettergroup":    "billing",
		"ce_deadletterattempts": "1",
	} {
		if headers[k] != want {
			t.Errorf("dead letter header %s = %q, want %q", k, headers[k], want)
		}
	}
	t.Logf("reason: %s", headers["ce_deadletterreason"])
}

// TestCrashedMember_RecordsRedeliveredAfterSessionTimeout: a member that
// disappears without leaving the group (here a static member, which never
// sends a leave request, as a killed process would not) has its unsettled
// records redelivered to another member once its session times out.
func TestCrashedMember_RecordsRedeliveredAfterSessionTimeout(t *testing.T) {
	t.Parallel()
	const session = time.Second
	c := newCluster(t)
	crashing := newBroker(t, c, func(cfg *kafka.Config) {
		cfg.SessionTimeout = session
		cfg.Options = []kgo.Opt{kgo.InstanceID("crashing")}
	})
	m := numbered("order-1", 1)[0]
	entered := make(chan struct{}, 1)
	subscribe(t, crashing, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, func(ctx context.Context, _ []*broker.Delivery) {
		entered <- struct{}{}
		<-ctx.Done() // never settles
	})
	publish(t, crashing, "orders", m)
	<-entered
	if err := crashing.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	closed := time.Now()

	other := newBroker(t, c, func(cfg *kafka.Config) { cfg.SessionTimeout = session })
	seen := newCollector()
	subscribe(t, other, broker.SubscribeConfig{Topic: "orders", Group: "billing"}, seen.acking())
	seen.waitIDs(t, "the crashed member's message", m)
	t.Logf("redelivered %v after the member vanished (session timeout %v)", time.Since(closed).Round(time.Millisecond), session)
}

// TestSubscribe_HandlerPanicIsLoggedAndItsAttemptCommitted: a handler that
// panics neither ends the process nor loses count. The panic is logged at
// Error level with its stack; what the handler acked before panicking is
// committed; the delivery it did not settle is committed as attempted once,
// so the group's next subscription gets it as attempt 2 and a message that
// panics every time still reaches MaxDeliver across restarts.
func TestSubscribe_HandlerPanicIsLoggedAndItsAttemptCommitted(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	errs := newErrorLog()
	b := newBroker(t, c, func(cfg *kafka.Config) { cfg.Logger = slog.New(errs) })
	msgs := numbered("order-1", 3)
	publish(t, b, "orders", msgs...)

	first := newCollector()
	cfg := broker.SubscribeConfig{Topic: "orders", Group: "billing", NakDelay: time.Hour}
	sub := subscribe(t, b, cfg, first.handler(0, func(d *broker.Delivery) {
		if string(d.Msg.Data) == "1" {
			panic("poison order")
		}
		d.Ack()
	}))
	rec := errs.wait(t, "kafka: handler panicked; its unsettled deliveries will be redelivered")
	if got := rec["panic"]; got != "poison order" {
		t.Errorf("logged panic = %q, want %q", got, "poison order")
	}
	if got := rec["stack"]; !strings.Contains(got, "TestSubscribe_HandlerPanicIsLoggedAndItsAttemptCommitted") {
		t.Errorf("logged stack does not show the panicking handler:\n%s", got)
	}
	if rec["topic"] != "orders" || rec["group"] != "billing" {
		t.Errorf("log record names topic %q and group %q, want orders and billing", rec["topic"], rec["group"])
	}
	stop(t, sub)

	offs := committed(t, c, "billing", "orders")
	if len(offs) != 1 {
		t.Fatalf("committed offsets = %v, want one partition (one subject)", offs)
	}
	for p, o := range offs {
		if o.At != 1 || o.Metadata != "troupe.attempts=1" {
			t.Errorf("partition %d committed at %d with metadata %q, want 1 with troupe.attempts=1", p, o.At, o.Metadata)
		}
	}

	second := newCollector()
	cfg.NakDelay = 0
	subscribe(t, b, cfg, second.acking())
	all := second.waitIDs(t, "the records after the acked one", msgs[1:]...)
	if all[0].data != "1" || all[0].attempt != 2 {
		t.Errorf("next subscription got %s first, want 1/2: the panicked delivery counts as an attempt", sequence(all))
	}
	for _, d := range all {
		if d.data == "0" {
			t.Errorf("record acked before the panic was delivered again: %s", sequence(all))
		}
	}
}

// errorLog is a slog.Handler that keeps the Error records logged through it,
// each as its message and attributes (those added with Logger.With too).
type errorLog struct {
	shared *errorLogRecords
	attrs  []slog.Attr
}

type errorLogRecords struct {
	mu      sync.Mutex
	records []map[string]string
	notify  chan struct{}
}

func newErrorLog() *errorLog {
	return &errorLog{shared: &errorLogRecords{notify: make(chan struct{}, 1)}}
}

func (l *errorLog) Enabled(_ context.Context, level slog.Level) bool { return level >= slog.LevelError }

func (l *errorLog) Handle(_ context.Context, r slog.Record) error {
	rec := map[string]string{"msg": r.Message}
	for _, a := range l.attrs {
		rec[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec[a.Key] = a.Value.String()
		return true
	})
	l.shared.mu.Lock()
	l.shared.records = append(l.shared.records, rec)
	l.shared.mu.Unlock()
	select {
	case l.shared.notify <- struct{}{}:
	default:
	}
	return nil
}

func (l *errorLog) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &errorLog{shared: l.shared, attrs: append(slices.Clip(l.attrs), attrs...)}
}

func (l *errorLog) WithGroup(string) slog.Handler { return l }

// wait waits up to 20s for a record with message msg and returns it.
func (l *errorLog) wait(t *testing.T, msg string) map[string]string {
	t.Helper()
	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	for {
		l.shared.mu.Lock()
		for _, rec := range l.shared.records {
			if rec["msg"] == msg {
				l.shared.mu.Unlock()
				return rec
			}
		}
		l.shared.mu.Unlock()
		select {
		case <-l.shared.notify:
		case <-deadline.C:
			t.Fatalf("waited 20s for the error %q", msg)
		}
	}
}
