package natsjs

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// benchMessages returns n messages of about 200 bytes of JSON over 16
// subjects.
func benchMessages(n int) []*message.Message {
	msgs := make([]*message.Message, n)
	for i := range msgs {
		m := message.New("/bench/order", "bench.order.created",
			fmt.Appendf(nil, `{"order":"order-%08d","customer":"customer-%04d","total":{"amount":%d,"currency":"EUR"},"lines":[{"sku":"sku-1","qty":2}]}`, i, i%1000, i))
		m.Subject = fmt.Sprintf("order-%d", i%16)
		m.DataContentType = "application/json"
		msgs[i] = m
	}
	return msgs
}

// BenchmarkPublish measures Publish to the embedded server with file
// storage, one message per op, in batches of 1 and 100, with the default
// sync interval and with SyncAlways (an fsync per write).
func BenchmarkPublish(b *testing.B) {
	for _, sync := range []struct {
		name   string
		always bool
	}{{"interval", false}, {"always", true}} {
		for _, batch := range []int{1, 100} {
			b.Run(fmt.Sprintf("sync=%s/batch=%d", sync.name, batch), func(b *testing.B) {
				br := newBroker(b, Config{DataDir: b.TempDir(), SyncAlways: sync.always})
				ctx := context.Background()
				msgs := benchMessages(b.N)
				if err := br.Publish(ctx, "bench.orders", benchMessages(1)...); err != nil {
					b.Fatal(err) // creates the stream outside the timing
				}
				b.ReportAllocs()
				b.ResetTimer()
				start := time.Now()
				for i := 0; i < len(msgs); i += batch {
					if err := br.Publish(ctx, "bench.orders", msgs[i:min(i+batch, len(msgs))]...); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			})
		}
	}
}

// BenchmarkPublishConsume measures the way from Publish (batches of 100) to
// an acked delivery (handler batches of up to 100), end to end.
func BenchmarkPublishConsume(b *testing.B) {
	br := newBroker(b, Config{DataDir: b.TempDir()})
	ctx := context.Background()
	msgs := benchMessages(b.N)
	var n atomic.Int64
	var finished atomic.Bool
	done := make(chan struct{})
	want := int64(b.N)
	sub, err := br.Subscribe(ctx, broker.SubscribeConfig{Topic: "bench.orders", Group: "bench", MaxBatch: 100},
		func(_ context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				d.Ack()
			}
			if n.Add(int64(len(batch))) >= want && finished.CompareAndSwap(false, true) {
				close(done)
			}
		})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Stop(ctx)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < len(msgs); i += 100 {
		if err := br.Publish(ctx, "bench.orders", msgs[i:min(i+100, len(msgs))]...); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(time.Minute):
		b.Fatalf("consumed %d of %d", n.Load(), b.N)
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	b.StopTimer() // not the deferred Stop, which waits for the idle pull to expire
}
