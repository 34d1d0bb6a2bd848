package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// Commit returns the commit benchmark: Concurrency workers each run write
// transactions of Batch small inserts for Duration. It shows what a durable
// commit costs on the chosen database, the floor under every pattern that
// writes a local transaction per step.
func Commit() Benchmark {
	return Benchmark{
		Name:    "commit",
		Summary: "write transactions on the database (--db sqlite|postgres); rows per commit = --batch",
		Run:     runCommit,
	}
}

func runCommit(ctx context.Context, cfg Config) (*Result, error) {
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

	table := fmt.Sprintf("bench_commit_%d", time.Now().UnixNano())
	if _, err := db.Exec(ctx, "CREATE TABLE "+table+" (id TEXT PRIMARY KEY, worker INTEGER NOT NULL, payload TEXT NOT NULL)"); err != nil {
		return nil, fmt.Errorf("create table: %w", err)
	}
	defer db.Exec(context.WithoutCancel(ctx), "DROP TABLE "+table)
	insert := "INSERT INTO " + table + " (id, worker, payload) VALUES " + sqldb.ValuesList(1, cfg.Batch, 3)

	fmt.Fprintf(cfg.Progress, "bench commit: %s, %d workers, %d rows per transaction, for %s\n", bdb.description, cfg.Concurrency, cfg.Batch, cfg.Duration)
	var rec Recorder
	start := time.Now()
	runPaced(ctx, cfg, start, &rec, func(w int) func(time.Time) {
		args := make([]any, 0, 3*cfg.Batch)
		return func(due time.Time) {
			args = args[:0]
			for range cfg.Batch {
				args = append(args, message.NewID(), w, `{"amount":1}`)
			}
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				_, err := tx.Exec(ctx, insert, args...)
				return err
			})
			if err != nil {
				rec.Error()
				return
			}
			rec.ObserveN(time.Since(due), cfg.Batch)
		}
	})
	res := &Result{Unit: "row", Latency: fmt.Sprintf("one transaction of %d rows, begin to commit", cfg.Batch)}
	if cfg.Rate > 0 {
		res.Latency = fmt.Sprintf("one transaction of %d rows, from when it was due (paced by --rate) to commit", cfg.Batch)
	}
	rec.Fill(res, time.Since(start))
	res.Notes = append(res.Notes, "db: "+bdb.description, "broker: not used by this benchmark",
		fmt.Sprintf("commits/s: %.0f", res.ThroughputPerSFrom(cfg.Batch)))
	return res, nil
}

// ThroughputPerSFrom returns the rate of groups of n operations: commits per
// second when each commit holds n rows.
func (r *Result) ThroughputPerSFrom(n int) float64 {
	if r.Seconds == 0 || n == 0 {
		return 0
	}
	return float64(r.Ops) / float64(n) / r.Seconds
}
