package sqldb_test

import (
	"context"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

func TestExecLater_ACancelledFlushLeavesThePoolUsable(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db, err := sqldb.Open(testCtx(t), dc.newURL(t), &sqldb.Config{MaxConns: 1})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		mustExec(t, db, `CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)`)
		for range 3 {
			ctx, cancel := context.WithCancel(testCtx(t))
			_ = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				for i := range 3 {
					if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES ($1, 'x')`, i); err != nil {
						return err
					}
				}
				cancel()
				var n int
				return tx.QueryRow(ctx, `SELECT count(*) FROM notes`).Scan(&n)
			})
			cancel()
		}
		if n := count(t, db, "notes"); n != 0 {
			t.Errorf("%d notes committed by cancelled transactions", n)
		}
		if err := db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
			return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES ($1, 'after')`, 9)
		}); err != nil {
			t.Fatalf("a transaction after cancelled flushes: %v", err)
		}
	})
}
