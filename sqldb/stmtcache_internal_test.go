package sqldb

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func openSQLiteForCache(t *testing.T, cfg *Config) *DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := Open(ctx, "sqlite://"+filepath.Join(t.TempDir(), "cache.db"), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func (c *stmtCache) has(query string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stmts[query] != nil
}

// A statement first met in a transaction is prepared after it, on the
// connection the transaction gave back: with one connection in the pool,
// preparing it inside would wait forever for that very connection.
func TestStmtCache_PreparesAfterTheTransactionEvenWithOneConnection(t *testing.T) {
	db := openSQLiteForCache(t, &Config{MaxConns: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := db.Exec(ctx, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"); err != nil {
		t.Fatal(err)
	}
	const ins = "INSERT INTO t (k, v) VALUES ($1, $2)"
	for i := range 3 {
		err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
			_, err := tx.Exec(ctx, ins, i, "x")
			return err
		})
		if err != nil {
			t.Fatalf("transaction %d: %v", i, err)
		}
		if !db.stmts.has(ins) {
			t.Fatalf("after transaction %d the INSERT is not prepared", i)
		}
	}
	var n int
	if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM t WHERE v = $1", "x").Scan(&n); err != nil || n != 3 {
		t.Fatalf("rows = %d, %v; want 3 rows", n, err)
	}
}

// Prepared statements follow schema changes, report their errors as
// unprepared ones do, and roll back with their transaction.
func TestStmtCache_PreparedStatementsBehaveAsUnpreparedOnes(t *testing.T) {
	db := openSQLiteForCache(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := db.Exec(ctx, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	const sel = "SELECT * FROM t WHERE k >= $1 ORDER BY k"
	cols := func() int {
		t.Helper()
		var n int
		err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
			rows, err := tx.Query(ctx, sel, 0)
			if err != nil {
				return err
			}
			defer rows.Close()
			c, err := rows.(sqlRows).Rows.Columns()
			n = len(c)
			if err != nil {
				return err
			}
			return rows.Close()
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if got := cols(); got != 2 {
		t.Fatalf("columns = %d, want 2", got)
	}
	cols() // now prepared
	if !db.stmts.has(sel) {
		t.Fatal("SELECT not prepared after two transactions")
	}
	if _, err := db.Exec(ctx, "ALTER TABLE t ADD COLUMN w TEXT"); err != nil {
		t.Fatal(err)
	}
	if got := cols(); got != 3 {
		t.Fatalf("after ALTER TABLE the prepared SELECT * gives %d columns, want 3", got)
	}

	const ins = "INSERT INTO t (k, v) VALUES ($1, $2)"
	for range 2 { // the second time prepared
		err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
			_, err := tx.Exec(ctx, ins, 1, nil)
			return err
		})
		if err == nil || !strings.Contains(err.Error(), "NOT NULL") {
			t.Fatalf("NULL into a NOT NULL column: %v, want the constraint error", err)
		}
	}
	err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
		if _, err := tx.Exec(ctx, ins, 7, "rolled back"); err != nil {
			return err
		}
		return context.Canceled
	})
	if err != context.Canceled {
		t.Fatal(err)
	}
	var n int
	if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM t WHERE k = $1", 7).Scan(&n); err != nil || n != 0 {
		t.Fatalf("rolled back row: count %d, %v", n, err)
	}

	// A statement that does not parse is reported, every time, and not kept.
	const bad = "INSERT INTO nowhere (k) VALUES ($1)"
	for range 2 {
		if _, err := db.Exec(ctx, bad, 1); err == nil || !strings.Contains(err.Error(), "nowhere") {
			t.Fatalf("insert into a missing table: %v", err)
		}
	}
	if db.stmts.has(bad) {
		t.Fatal("a statement that failed to prepare was kept")
	}
}

// The cache stops growing at maxCachedStmts; statements past it still run.
func TestStmtCache_IsBounded(t *testing.T) {
	db := openSQLiteForCache(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range maxCachedStmts + 10 {
		var got int
		q := "SELECT $1 + " + strings.Repeat("0+", i) + "0"
		if err := db.QueryRow(ctx, q, i).Scan(&got); err != nil || got != i {
			t.Fatalf("query %d: %d, %v", i, got, err)
		}
	}
	db.stmts.mu.Lock()
	n := len(db.stmts.stmts)
	db.stmts.mu.Unlock()
	if n != maxCachedStmts {
		t.Fatalf("%d statements kept, want the bound %d", n, maxCachedStmts)
	}
}
