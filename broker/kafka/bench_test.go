package kafka_test

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// benchMessages returns n messages over 64 subjects with a 256-byte payload.
func benchMessages(n int) []*message.Message {
	data := make([]byte, 256)
	msgs := make([]*message.Message, n)
	for i := range msgs {
		msgs[i] = message.New("/bench", "bench.tick", data)
		msgs[i].Subject = "subject-" + strconv.Itoa(i%64)
	}
	return msgs
}

// BenchmarkPublish publishes 256-byte messages to a three-broker in-process
// cluster, in Publish calls of batch messages; one op is one message.
func BenchmarkPublish(b *testing.B) {
	for _, batch := range []int{1, 100} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			c := newCluster(b)
			br := newBroker(b, c)
			msgs := benchMessages(batch)
			ctx := context.Background()
			if err := br.Publish(ctx, "bench", msgs...); err != nil { // create the topic
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for sent := 0; sent < b.N; sent += batch {
				if err := br.Publish(ctx, "bench", msgs[:min(batch, b.N-sent)]...); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.ReportMetric(float64(runtime.GOMAXPROCS(0)), "GOMAXPROCS")
		})
	}
}

// BenchmarkPublishConsume publishes 256-byte messages in batches of 100 to a
// three-broker in-process cluster and waits until one subscription has
// handled and acked them all; one op is one message.
func BenchmarkPublishConsume(b *testing.B) {
	c := newCluster(b)
	br := newBroker(b, c)
	ctx := context.Background()
	var handled atomic.Int64
	done := make(chan struct{}, 1)
	var want atomic.Int64
	want.Store(1 << 62)
	sub, err := br.Subscribe(ctx, broker.SubscribeConfig{Topic: "bench", Group: "bench", MaxBatch: 500},
		func(_ context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				d.Ack()
			}
			if n := handled.Add(int64(len(batch))); n >= want.Load() {
				select {
				case done <- struct{}{}:
				default:
				}
			}
		})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Stop(ctx)
	msgs := benchMessages(100)

	// Warm up: the group is joined and the topic fetched before timing.
	want.Store(1)
	if err := br.Publish(ctx, "bench", msgs[0]); err != nil {
		b.Fatal(err)
	}
	<-done
	handled.Store(0)

	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	want.Store(int64(b.N))
	for sent := 0; sent < b.N; sent += len(msgs) {
		if err := br.Publish(ctx, "bench", msgs[:min(len(msgs), b.N-sent)]...); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(time.Minute):
		b.Fatalf("handled %d of %d messages within a minute", handled.Load(), b.N)
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	b.ReportMetric(float64(runtime.GOMAXPROCS(0)), "GOMAXPROCS")
}
