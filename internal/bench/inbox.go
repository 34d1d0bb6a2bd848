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
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// Inbox returns the idempotent-consumer benchmark: Concurrency publishers
// send batches of Batch messages for Duration to a topic that Concurrency
// members of one consumer group take through inbox.Handler, in broker
// batches of up to Batch messages, each message's handler inserting one
// row. Throughput counts messages committed; latency runs from the start of
// the publish call to the commit of the consumer's transaction.
func Inbox() Benchmark {
	return Benchmark{
		Name:    "inbox",
		Summary: "consume through the inbox: one transaction per broker batch, one effect per message (--db, --broker, --batch)",
		Run:     runInbox,
	}
}

func runInbox(ctx context.Context, cfg Config) (*Result, error) {
	dir, cleanup, err := workDir(cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	bdb, err := openDB(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	defer bdb.close()
	db := bdb.db
	if err := inbox.Migrate(ctx, db); err != nil {
		return nil, err
	}
	table := fmt.Sprintf("bench_inbox_%d", time.Now().UnixNano())
	if _, err := db.Exec(ctx, "CREATE TABLE "+table+" (message_id TEXT NOT NULL, payload TEXT NOT NULL)"); err != nil {
		return nil, fmt.Errorf("create table: %w", err)
	}
	defer db.Exec(context.WithoutCancel(ctx), "DROP TABLE "+table)
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		return nil, err
	}

	log := slog.New(slog.DiscardHandler)
	ob, err := brokeropen.Open(ctx, cfg.Broker, dir, log)
	if err != nil {
		return nil, err
	}
	defer ob.Close()
	b := ob.Broker

	var (
		rec       Recorder
		committed atomic.Int64
		published atomic.Int64
		failed    atomic.Int64
		sent      sync.Map // message id -> publish start
	)
	insert := "INSERT INTO " + table + " (message_id, payload) VALUES ($1, $2)"
	h := ib.Handler("bench", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		_, err := tx.Exec(ctx, insert, m.ID, string(m.Data))
		return err
	})
	measured := func(ctx context.Context, batch []*broker.Delivery) {
		h(ctx, batch)
		now := time.Now()
		for _, d := range batch {
			if s, _, _ := d.Settlement(); s != broker.Acked {
				failed.Add(1)
				continue
			}
			if t, ok := sent.LoadAndDelete(d.Msg.ID); ok {
				rec.Observe(now.Sub(t.(time.Time)))
				committed.Add(1)
			}
		}
	}
	topic := fmt.Sprintf("bench.inbox.%d", time.Now().UnixNano())
	scfg := broker.SubscribeConfig{Topic: topic, Group: "bench", MaxBatch: cfg.Batch}
	for range cfg.Concurrency {
		sub, err := b.Subscribe(ctx, scfg, measured)
		if err != nil {
			return nil, err
		}
		defer sub.Stop(context.WithoutCancel(ctx))
	}

	fmt.Fprintf(cfg.Progress, "bench inbox: %s, %s, %d publishers and %d group members, batches of %d, for %s\n",
		bdb.description, ob.Description, cfg.Concurrency, cfg.Concurrency, cfg.Batch, cfg.Duration)
	start := time.Now()
	pubErr := publishPaced(ctx, cfg, b, topic, "troupe.bench.order", start, &rec, &sent, &published)

	// Wait for the consumers to commit everything that was published, as
	// long as they make progress.
	const stallLimit = 30 * time.Second
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	last, lastProgress := committed.Load(), time.Now()
	for committed.Load() < published.Load() {
		select {
		case <-tick.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if n := committed.Load(); n > last {
			last, lastProgress = n, time.Now()
		} else if time.Since(lastProgress) > stallLimit {
			return nil, fmt.Errorf("consumers committed %d of %d published messages and none for %s", n, published.Load(), stallLimit)
		}
	}
	elapsed := time.Since(start)
	res := &Result{Unit: "message", Latency: "publish call start to the commit of the consumer's transaction (end to end)"}
	if cfg.Rate > 0 {
		res.Latency = "from when the batch was due (paced by --rate) to the commit of the consumer's transaction"
	} else {
		res.Notes = append(res.Notes, "no --rate: publishers run flat out, so latency includes the queue that builds when they outpace the consumers; use --rate for latency at a given load")
	}
	rec.Fill(res, elapsed)
	var effects int64
	if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM "+table).Scan(&effects); err != nil {
		return nil, err
	}
	res.Notes = append(res.Notes,
		"db: "+bdb.description,
		"broker: "+ob.Description,
		fmt.Sprintf("effects: %d rows for %d messages published; %d deliveries not acked on their first try", effects, published.Load(), failed.Load()))
	if pubErr != nil {
		res.Notes = append(res.Notes, "last publish error: "+pubErr.Error())
	}
	if res.Ops == 0 {
		return nil, errors.New("no message was committed")
	}
	return res, nil
}
