package outbox_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// ackingPublisher forwards to a broker and signals each acknowledged batch.
type ackingPublisher struct {
	next  broker.Publisher
	mu    sync.Mutex
	acked int
	at    map[string]time.Time
	ch    chan struct{}
}

func (p *ackingPublisher) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	err := p.next.Publish(ctx, topic, msgs...)
	if err == nil {
		now := time.Now()
		p.mu.Lock()
		p.acked += len(msgs)
		if p.at != nil {
			for _, m := range msgs {
				p.at[m.ID] = now
			}
		}
		p.mu.Unlock()
		select {
		case p.ch <- struct{}{}:
		default:
		}
	}
	return err
}

func (p *ackingPublisher) waitAcked(tb testing.TB, n int) {
	deadline := time.After(2 * time.Minute)
	for {
		p.mu.Lock()
		got := p.acked
		p.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-p.ch:
		case <-deadline:
			tb.Fatalf("%d of %d acked", got, n)
		}
	}
}

// BenchmarkRelay_Throughput measures how fast a relay drains a backlog of
// b.N committed messages (100 subjects) to embedded NATS JetStream, for each
// database and batch size. The test PostgreSQL runs with fsync off.
func BenchmarkRelay_Throughput(b *testing.B) {
	for _, kind := range dialects {
		for _, batch := range []int{100, 500} {
			b.Run(fmt.Sprintf("%s/batch=%d", kind, batch), func(b *testing.B) {
				db, _ := openDB(b, kind)
				nb := startNATS(b, b.TempDir(), "")
				ctx := context.Background()
				subs := subjects(100)
				msgs := make([]*message.Message, 0, 500)
				for i := 0; i < b.N; {
					msgs = msgs[:0]
					for ; i < b.N && len(msgs) < 500; i++ {
						msgs = append(msgs, newMsg(subs[i%len(subs)], i))
					}
					if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						return outbox.Add(ctx, tx, "bench.orders", msgs...)
					}); err != nil {
						b.Fatal(err)
					}
				}
				pub := &ackingPublisher{next: nb, ch: make(chan struct{}, 1)}
				r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: outbox.Poll, BatchSize: batch})
				if err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				start := time.Now()
				stop := runRelay(b, r)
				pub.waitAcked(b, b.N)
				elapsed := time.Since(start)
				b.StopTimer()
				stop()
				b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
			})
		}
	}
}

// BenchmarkRelay_CommitToPublish measures, for single-message transactions
// committed one after the other, the time from commit to the broker's
// acknowledgement of the message: the relay's reaction (a NOTIFY on
// PostgreSQL, Relay.Notify on SQLite), its read, the publish and the ack.
func BenchmarkRelay_CommitToPublish(b *testing.B) {
	for _, kind := range dialects {
		b.Run(kind, func(b *testing.B) {
			db, _ := openDB(b, kind)
			nb := startNATS(b, b.TempDir(), "")
			ctx := context.Background()
			pub := &ackingPublisher{next: nb, ch: make(chan struct{}, 1), at: map[string]time.Time{}}
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Mode: outbox.Notify, PollInterval: time.Second})
			if err != nil {
				b.Fatal(err)
			}
			runRelay(b, r)
			lat := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				m := newMsg("order-1", i)
				if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					return outbox.Add(ctx, tx, "bench.orders", m)
				}); err != nil {
					b.Fatal(err)
				}
				committed := time.Now()
				if kind == "sqlite" {
					r.Notify()
				}
				pub.waitAcked(b, i+1)
				pub.mu.Lock()
				lat = append(lat, max(0, pub.at[m.ID].Sub(committed)))
				pub.mu.Unlock()
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
		})
	}
}
