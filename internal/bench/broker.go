package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
)

// Broker returns the broker publish/consume benchmark: Concurrency
// publishers send batches of Batch messages for Duration while one consumer
// group takes them in batches and acknowledges them. Throughput counts
// messages consumed; latency is from the start of the publish call to the
// handler seeing the message.
func Broker() Benchmark {
	return Benchmark{
		Name:    "broker",
		Summary: "publish and consume through the broker (--broker nats|kafka|URL)",
		Run:     runBroker,
	}
}

func runBroker(ctx context.Context, cfg Config) (*Result, error) {
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	log := slog.New(slog.DiscardHandler)
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, log)
	if err != nil {
		return nil, err
	}
	defer ob.Close()
	b := ob.Broker

	topic := fmt.Sprintf("bench.broker.%d", time.Now().UnixNano())
	var (
		rec       Recorder
		consumed  atomic.Int64
		published atomic.Int64
		sent      sync.Map // message id -> publish start
	)
	drained := make(chan struct{}, 1)
	var stopPublishing atomic.Bool
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "bench", MaxBatch: max(cfg.Batch, 100)},
		func(ctx context.Context, batch []*broker.Delivery) {
			now := time.Now()
			for _, d := range batch {
				if t, ok := sent.LoadAndDelete(d.Msg.ID); ok {
					rec.Observe(now.Sub(t.(time.Time)))
					consumed.Add(1)
				}
				d.Ack()
			}
			if stopPublishing.Load() && consumed.Load() >= published.Load() {
				select {
				case drained <- struct{}{}:
				default:
				}
			}
		})
	if err != nil {
		return nil, err
	}
	defer sub.Stop(context.WithoutCancel(ctx))

	fmt.Fprintf(cfg.Progress, "bench broker: %s, %d publishers, batches of %d, for %s\n", ob.Description, cfg.Concurrency, cfg.Batch, cfg.Duration)
	start := time.Now()
	pubErr := publishPaced(ctx, cfg, b, topic, "troupe.bench.ping", start, &rec, &sent, &published)
	pubElapsed := time.Since(start)
	stopPublishing.Store(true)

	// Wait for the consumer to take everything that was published.
	wait := time.NewTimer(30 * time.Second)
	defer wait.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for consumed.Load() < published.Load() {
		select {
		case <-drained:
		case <-tick.C:
		case <-wait.C:
			return nil, fmt.Errorf("consumer took %d of %d published messages within 30s of the end", consumed.Load(), published.Load())
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	elapsed := time.Since(start)
	res := &Result{Unit: "message", Latency: "publish call start to handler (end to end)"}
	if cfg.Rate > 0 {
		res.Latency = "from when the batch was due (paced by --rate) to the handler (end to end)"
	} else {
		res.Notes = append(res.Notes, "no --rate: publishers run flat out, so latency includes the queue that builds when they outpace the consumer; use --rate for latency at a given load")
	}
	rec.Fill(res, elapsed)
	res.Notes = append(res.Notes,
		"broker: "+ob.Description,
		fmt.Sprintf("publish phase: %d messages in %.2fs (%.0f/s)", published.Load(), pubElapsed.Seconds(), float64(published.Load())/pubElapsed.Seconds()),
		"db: not used by this benchmark")
	if pubErr != nil {
		res.Notes = append(res.Notes, "last publish error: "+pubErr.Error())
	}
	if res.Ops == 0 {
		return nil, errors.New("no message was consumed")
	}
	return res, nil
}

// publishPaced runs cfg.Concurrency publishers that send batches of
// cfg.Batch messages of type typ to topic (see runPaced), storing each
// message's due time in sent before the publish and counting what the broker
// accepted in published. It returns the last publish error, if any.
func publishPaced(ctx context.Context, cfg Config, b broker.Publisher, topic, typ string, start time.Time,
	rec *Recorder, sent *sync.Map, published *atomic.Int64) error {
	var pubErr atomic.Value
	runPaced(ctx, cfg, start, rec, func(w int) func(time.Time) {
		return func(due time.Time) {
			msgs := make([]*message.Message, cfg.Batch)
			for i := range msgs {
				m := message.New("/bench", typ, []byte(`{"n":1}`))
				m.Subject = fmt.Sprintf("w%d-%d", w, i%8)
				m.DataContentType = "application/json"
				msgs[i] = m
				sent.Store(m.ID, due)
			}
			if err := b.Publish(ctx, topic, msgs...); err != nil {
				pubErr.Store(err)
				for _, m := range msgs {
					sent.Delete(m.ID)
					rec.Error()
				}
				return
			}
			published.Add(int64(len(msgs)))
		}
	})
	err, _ := pubErr.Load().(error)
	return err
}
