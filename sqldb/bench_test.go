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

// BenchmarkExecLater measures a transaction shaped like a saga transition
// on PostgreSQL (fsync off, to show round trips rather than the disk): a
// locking read, then seven writes whose results are not needed, sent one
// by one (Exec) or with the commit (ExecLater).
func BenchmarkExecLater(b *testing.B) {
	db := open(b, pgtest.URL(b), nil)
	ctx := context.Background()
	for _, q := range []string{
		"CREATE TABLE state (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
		"INSERT INTO state SELECT g, 0 FROM generate_series(0, 99) g",
		"CREATE TABLE log (id INTEGER NOT NULL, payload TEXT NOT NULL)",
	} {
		if _, err := db.Exec(ctx, q); err != nil {
			b.Fatal(err)
		}
	}
	for _, later := range []bool{false, true} {
		name := "Exec"
		if later {
			name = "ExecLater"
		}
		b.Run(name, func(b *testing.B) {
			i := 0
			for b.Loop() {
				i++
				err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					var n int
					if err := tx.QueryRow(ctx, "SELECT n FROM state WHERE id = $1 FOR UPDATE", i%100).Scan(&n); err != nil {
						return err
					}
					write := func(q string, args ...any) error {
						if later {
							return sqldb.ExecLater(ctx, tx, q, args...)
						}
						_, err := tx.Exec(ctx, q, args...)
						return err
					}
					for range 6 {
						if err := write("INSERT INTO log (id, payload) VALUES ($1, $2)", i, "a small payload"); err != nil {
							return err
						}
					}
					return write("UPDATE state SET n = $1 WHERE id = $2", n+1, i%100)
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
