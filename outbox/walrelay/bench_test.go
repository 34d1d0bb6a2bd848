package walrelay_test

import (
	"context"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox/walrelay"
	"github.com/troupedev/troupe/sqldb"
)

// BenchmarkWALRelay measures relay throughput (messages/s from the first
// commit to the last broker ack) and commit-to-publish latency (the server's
// commit timestamp to the broker's ack of the batch), relaying to embedded
// NATS JetStream. "max": 4 writers commit 100 messages per transaction as
// fast as they can. "rate1000": one writer commits 10 messages every 10 ms,
// an offered load of 1,000 messages/s.
func BenchmarkWALRelay(b *testing.B) {
	b.Run("max", func(b *testing.B) { benchWALRelay(b, 4, 100, 0) })
	b.Run("rate1000", func(b *testing.B) { benchWALRelay(b, 1, 10, 10*time.Millisecond) })
}

func benchWALRelay(b *testing.B, writers, perTx int, every time.Duration) {
	d := newTestDB(b)
	// The test cluster runs with synchronous_commit off, which leaves WAL
	// unflushed for up to 3 x wal_writer_delay, and the server streams only
	// flushed WAL. Writers here commit as production does (fsync stays off).
	d.db = openSyncCommit(b, d.url)
	nb := startNATS(b, b.TempDir(), "")
	var (
		mu   sync.Mutex
		lats []time.Duration
		done = make(chan struct{})
		n    int
	)
	total := b.N
	startRelay(b, walrelay.Config{URL: d.url, Publisher: nb, SlotName: d.slot, BatchSize: 1000,
		OnPublished: func(p walrelay.Published) {
			mu.Lock()
			defer mu.Unlock()
			for _, ct := range p.CommitTimes {
				if !ct.IsZero() {
					lats = append(lats, p.Acked.Sub(ct))
				}
			}
			n += len(p.Messages)
			if n >= total {
				select {
				case <-done:
				default:
					close(done)
				}
			}
		}})
	// Warm up: the slot exists and the stream is running.
	d.write(b, newMsg("warm", 0))
	waitCond(b, 20*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return n >= 1 })
	mu.Lock()
	n, lats, total = 0, nil, b.N
	mu.Unlock()

	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			var tick <-chan time.Time
			if every > 0 {
				t := time.NewTicker(every)
				defer t.Stop()
				tick = t.C
			}
			for i := w * perTx; i < b.N; i += writers * perTx {
				if tick != nil {
					<-tick
				}
				msgs := make([]*message.Message, 0, perTx)
				for j := i; j < min(i+perTx, b.N); j++ {
					msgs = append(msgs, newMsg("s", j))
				}
				d.write(b, msgs...)
			}
		})
	}
	wg.Wait()
	wrote := time.Since(start)
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatal("relay did not publish every message within 5 minutes")
	}
	elapsed := time.Since(start)
	b.StopTimer()
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lats)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(b.N)/wrote.Seconds(), "committed-msgs/s")
	if len(lats) > 0 {
		b.ReportMetric(float64(lats[len(lats)/2].Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds())/1000, "p99-ms")
	}
}

func openSyncCommit(b *testing.B, u string) *sqldb.DB {
	b.Helper()
	pu, err := url.Parse(u)
	if err != nil {
		b.Fatal(err)
	}
	q := pu.Query()
	q.Set("synchronous_commit", "on")
	pu.RawQuery = q.Encode()
	db, err := sqldb.Open(context.Background(), pu.String(), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	return db
}

// BenchmarkWALRelayBacklog measures how fast a relay drains b.N messages
// committed (100 per transaction) while it was stopped: the relay's own
// capacity, without writers competing for the 2 cores.
func BenchmarkWALRelayBacklog(b *testing.B) {
	d := newTestDB(b)
	nb := startNATS(b, b.TempDir(), "")
	var (
		mu   sync.Mutex
		n    int
		done = make(chan struct{})
	)
	cfg := walrelay.Config{URL: d.url, Publisher: nb, SlotName: d.slot, BatchSize: 1000,
		OnPublished: func(p walrelay.Published) {
			mu.Lock()
			defer mu.Unlock()
			n += len(p.Messages)
			if n == b.N+1 {
				close(done)
			}
		}}
	first := startRelay(b, cfg)
	d.write(b, newMsg("warm", 0))
	waitCond(b, 20*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return n >= 1 })
	first.stop(b)
	for i := 0; i < b.N; i += 100 {
		msgs := make([]*message.Message, 0, 100)
		for j := i; j < min(i+100, b.N); j++ {
			msgs = append(msgs, newMsg("s", j))
		}
		d.write(b, msgs...)
	}
	b.ResetTimer()
	start := time.Now()
	startRelay(b, cfg)
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatal("relay did not drain the backlog within 5 minutes")
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}
