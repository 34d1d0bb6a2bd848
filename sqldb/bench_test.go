package sqldb_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/pgcluster"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

// BenchmarkInTx measures one transaction holding one small insert: the cost
// of a commit, which is what the outbox and the inbox pay per batch.
func BenchmarkInTx(b *testing.B) {
	b.Run("sqlite/synchronous=NORMAL", func(b *testing.B) {
		benchInTx(b, open(b, "sqlite://"+filepath.Join(b.TempDir(), "bench.db"), nil))
	})
	b.Run("sqlite/synchronous=FULL", func(b *testing.B) {
		benchInTx(b, open(b, "sqlite://"+filepath.Join(b.TempDir(), "bench.db"), &sqldb.Config{SQLiteFullSync: true}))
	})
	b.Run("postgres/fsync=on", func(b *testing.B) {
		// A cluster of its own: the tests' shared cluster runs with fsync
		// off, which would hide the cost being measured.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := pgcluster.Start(ctx, pgcluster.Config{})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			if err := c.Stop(context.Background()); err != nil {
				b.Error(err)
			}
		})
		benchInTx(b, open(b, c.URL("postgres"), nil))
	})
	b.Run("postgres/fsync=off", func(b *testing.B) {
		benchInTx(b, open(b, pgtest.URL(b), nil))
	})
}

func benchInTx(b *testing.B, db *sqldb.DB) {
	ctx := context.Background()
	if _, err := db.Exec(ctx, "CREATE TABLE bench (id INTEGER NOT NULL, payload TEXT NOT NULL)"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO bench (id, payload) VALUES ($1, $2)", i, "a small payload")
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tx/s")
}
