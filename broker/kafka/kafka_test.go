package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/brokertest"
	"github.com/troupedev/troupe/broker/kafka"
	"github.com/troupedev/troupe/message"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// newCluster starts an in-process three-broker cluster, closed when t ends.
func newCluster(t testing.TB) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.GroupMinSessionTimeout(time.Second))
	if err != nil {
		t.Fatalf("start kfake cluster: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// newBroker returns a Broker on c, closed when t ends.
func newBroker(t testing.TB, c *kfake.Cluster, mod ...func(*kafka.Config)) *kafka.Broker {
	t.Helper()
	cfg := kafka.Config{Brokers: c.ListenAddrs(), ClientID: "troupe-test"}
	for _, f := range mod {
		f(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := kafka.New(ctx, cfg)
	if err != nil {
		t.Fatalf("kafka.New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

func TestBroker_Conformance(t *testing.T) {
	c := newCluster(t)
	brokertest.Run(t, func(t *testing.T) broker.Broker {
		// The suite closes the brokers it opens.
		b, err := kafka.New(t.Context(), kafka.Config{Brokers: c.ListenAddrs(), ClientID: "troupe-conformance"})
		if err != nil {
			t.Fatalf("kafka.New: %v", err)
		}
		return b
	}, brokertest.Features{DedupByID: false})
}

// TestNew_UnreachableBrokersFailWithinDialTimeout: New fails with
// ErrUnreachable, naming the addresses, both when nothing listens and when a
// listener never answers, and gives up within DialTimeout.
func TestNew_UnreachableBrokersFailWithinDialTimeout(t *testing.T) {
	t.Parallel()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := closed.Addr().String()
	closed.Close() // nothing listens there any more

	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	conns.Go(func() { // accept and never answer
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	})
	t.Cleanup(func() { silent.Close(); conns.Wait() })

	const timeout = 500 * time.Millisecond
	for _, tt := range []struct{ name, addr string }{
		{"connection refused", closedAddr},
		{"no answer", silent.Addr().String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			b, err := kafka.New(context.Background(), kafka.Config{Brokers: []string{tt.addr}, DialTimeout: timeout})
			took := time.Since(start)
			if err == nil {
				b.Close()
				t.Fatal("New with an unreachable broker succeeded")
			}
			if !errors.Is(err, kafka.ErrUnreachable) {
				t.Errorf("New error = %v, want kafka.ErrUnreachable", err)
			}
			if !strings.Contains(err.Error(), tt.addr) {
				t.Errorf("New error %q does not name the address %s", err, tt.addr)
			}
			if took > timeout+time.Second {
				t.Errorf("New took %v to fail, DialTimeout %v", took, timeout)
			}
			t.Logf("after %v: %v", took.Round(time.Millisecond), err)
		})
	}
}

func TestNew_ConfigValidated(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  kafka.Config
		want []string
	}{
		{"no brokers", kafka.Config{}, []string{"Brokers is required"}},
		{"every problem at once", kafka.Config{Brokers: []string{" "}, Partitions: -1, ReplicationFactor: -2, DialTimeout: -1},
			[]string{"Brokers[0] is empty", "Partitions", "ReplicationFactor", "DialTimeout"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b, err := kafka.New(context.Background(), tt.cfg)
			if err == nil {
				b.Close()
				t.Fatal("New succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("New error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// collector records deliveries and lets a test wait for a condition on them.
type collector struct {
	mu      sync.Mutex
	all     []delivery
	batches int
	notify  chan struct{}
}

// delivery is one delivery seen by a handler.
type delivery struct {
	id      string
	subject string
	data    string
	attempt int
	batch   int // which handler call, from 1
	member  int
}

func newCollector() *collector { return &collector{notify: make(chan struct{}, 1)} }

// handler returns a handler, as member, that records each delivery and then
// settles it with settle.
func (c *collector) handler(member int, settle func(d *broker.Delivery)) broker.Handler {
	return func(_ context.Context, batch []*broker.Delivery) {
		c.mu.Lock()
		c.batches++
		for _, d := range batch {
			c.all = append(c.all, delivery{
				id: d.Msg.ID, subject: d.Msg.Subject, data: string(d.Msg.Data),
				attempt: d.Attempt, batch: c.batches, member: member,
			})
		}
		c.mu.Unlock()
		for _, d := range batch {
			settle(d)
		}
		select {
		case c.notify <- struct{}{}:
		default:
		}
	}
}

// acking returns a handler that records and acks every delivery.
func (c *collector) acking() broker.Handler {
	return c.handler(0, func(d *broker.Delivery) { d.Ack() })
}

func (c *collector) snapshot() []delivery {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]delivery(nil), c.all...)
}

// waitFor waits until cond holds on what was delivered, for up to 20s.
func (c *collector) waitFor(t *testing.T, what string, cond func([]delivery) bool) []delivery {
	t.Helper()
	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	for {
		all := c.snapshot()
		if cond(all) {
			return all
		}
		select {
		case <-c.notify:
		case <-deadline.C:
			t.Fatalf("waited 20s for %s; got %v", what, all)
		}
	}
}

// waitIDs waits until every message in want was delivered.
func (c *collector) waitIDs(t *testing.T, what string, want ...*message.Message) []delivery {
	t.Helper()
	return c.waitFor(t, what, func(all []delivery) bool {
		seen := make(map[string]bool, len(all))
		for _, d := range all {
			seen[d.id] = true
		}
		for _, m := range want {
			if !seen[m.ID] {
				return false
			}
		}
		return true
	})
}

// numbered returns n messages about subject whose data is their index.
func numbered(subject string, n int) []*message.Message {
	msgs := make([]*message.Message, n)
	for i := range msgs {
		msgs[i] = message.New("/kafka-test", "kafka.test.numbered", []byte(strconv.Itoa(i)))
		msgs[i].Subject = subject
	}
	return msgs
}

// sequence renders deliveries as "data/attempt" in delivery order.
func sequence(all []delivery) string {
	parts := make([]string, len(all))
	for i, d := range all {
		parts[i] = fmt.Sprintf("%s/%d", d.data, d.attempt)
	}
	return strings.Join(parts, " ")
}

func publish(t *testing.T, b *kafka.Broker, topic string, msgs ...*message.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Publish(ctx, topic, msgs...); err != nil {
		t.Fatalf("Publish: %v", err)
	}
}

func subscribe(t *testing.T, b *kafka.Broker, cfg broker.SubscribeConfig, h broker.Handler) broker.Subscription {
	t.Helper()
	sub, err := b.Subscribe(context.Background(), cfg, h)
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	t.Cleanup(func() { _ = sub.Stop(context.Background()) })
	return sub
}

func stop(t *testing.T, sub broker.Subscription) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sub.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}

// rawClient returns a plain client of c for looking under the broker,
// closed when t ends.
func rawClient(t *testing.T, c *kfake.Cluster, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(c.ListenAddrs()...)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// committed returns group's committed offsets on topic by partition.
func committed(t *testing.T, c *kfake.Cluster, group, topic string) map[int32]kadm.Offset {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resps, err := kadm.NewClient(rawClient(t, c)).FetchOffsets(ctx, group)
	if err != nil {
		t.Fatalf("fetch offsets of %q: %v", group, err)
	}
	out := make(map[int32]kadm.Offset)
	for p, r := range resps[topic] {
		if r.Err != nil {
			t.Fatalf("fetch offset of %q partition %d: %v", group, p, r.Err)
		}
		if r.At >= 0 {
			out[p] = r.Offset
		}
	}
	return out
}

// partitionOf returns the partition the broker's producer picks for subject
// among n partitions.
func partitionOf(subject string, n int) int32 {
	return int32(kgo.StickyKeyPartitioner(nil).ForTopic("").Partition(&kgo.Record{Key: []byte(subject)}, n))
}
