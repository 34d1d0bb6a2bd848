package sqldb

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Two uses of one query inside a transaction, the second while the first's
// rows are still open (a tree walk, a nested loop), each see their own rows:
// a prepared statement shared by both would be reset under the first.
func TestStmtCache_NestedUsesOfOneQueryInATransactionKeepTheirOwnRows(t *testing.T) {
	db, ctx := groupTestDB(t)
	const children = "SELECT k FROM t WHERE k > $1 AND k < $2 ORDER BY k"
	if err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
		for k := range 4 {
			if _, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k*10); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k*10+1); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	walk := func() (string, error) {
		var out []string
		err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
			rows, err := tx.Query(ctx, children, -1, 100)
			if err != nil {
				return err
			}
			defer rows.Close()
			for rows.Next() {
				var k int
				if err := rows.Scan(&k); err != nil {
					return err
				}
				if k%10 != 0 {
					continue
				}
				var child int
				if err := tx.QueryRow(ctx, children, k, k+10).Scan(&child); err != nil {
					return fmt.Errorf("child of %d: %w", k, err)
				}
				out = append(out, fmt.Sprintf("%d>%d", k, child))
			}
			return rows.Close()
		})
		return strings.Join(out, " "), err
	}
	want := "0>1 10>11 20>21 30>31"
	for i := range 3 { // the first time unprepared, then prepared
		got, err := walk()
		if err != nil || got != want {
			t.Fatalf("walk %d: %q, %v; want %q", i, got, err, want)
		}
	}
	// Two rows of one query scanned after both ran.
	for i := range 2 {
		var a, b int
		err := db.InTx(ctx, func(ctx context.Context, tx Tx) error {
			ra := tx.QueryRow(ctx, children, 0, 10)
			rb := tx.QueryRow(ctx, children, 10, 20)
			if err := ra.Scan(&a); err != nil {
				return err
			}
			return rb.Scan(&b)
		})
		if err != nil || a != 1 || b != 11 {
			t.Fatalf("rows scanned late, try %d: %d %d, %v; want 1 11", i, a, b, err)
		}
	}
}

// A leader whose ctx ends while it waits for the write lock returns at once
// with ctx's error, even when other calls joined its group.
func TestInGroupTx_ALeaderCancelledWhileWaitingReturnsWithoutWaitingForTheLock(t *testing.T) {
	db, ctx := groupTestDB(t)
	release := holdWriter(t, db)
	released := false
	defer func() {
		if !released {
			release()
		}
	}()

	lctx, cancel := context.WithCancel(ctx)
	leaderErr := make(chan error, 1)
	var leaderRan atomic.Bool
	go func() {
		leaderErr <- db.InGroupTx(lctx, func(ctx context.Context, tx Tx) error {
			leaderRan.Store(true)
			return nil
		})
	}()
	waitForming(t, db, 1)
	memberErr := make(chan error, 1)
	go func() {
		memberErr <- db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", 1)
			return err
		})
	}()
	waitForming(t, db, 2)
	cancel()
	leaderDone := false
	select {
	case err := <-leaderErr:
		leaderDone = true
		if !errors.Is(err, context.Canceled) || leaderRan.Load() {
			t.Errorf("cancelled leader: %v, ran %v; want context.Canceled, not run", err, leaderRan.Load())
		}
	case <-time.After(5 * time.Second): // a bound, not an ordering: the lock is held until release
		t.Error("a cancelled leader still waits for the write lock because a call joined its group")
	}
	release()
	released = true
	if err := <-memberErr; err != nil {
		t.Errorf("member: %v", err)
	}
	if !committedKeys(t, db, ctx, "t")[1] {
		t.Error("the member's row was not committed")
	}
	if !leaderDone {
		<-leaderErr
	}
}

// A leader fn that swallows an error which rolled back the whole
// transaction (INSERT OR ROLLBACK) must not make the members' writes
// commit twice: SQLite runs later statements in autocommit mode.
func TestInGroupTx_ALeaderThatLostTheTransactionDoesNotMakeMembersCommitTwice(t *testing.T) {
	db, ctx := groupTestDB(t)
	if _, err := db.Exec(ctx, "CREATE TABLE log (n INTEGER); INSERT INTO t (k) VALUES (1000)"); err != nil {
		t.Fatal(err)
	}
	release := holdWriter(t, db)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for k := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
				if k == 0 {
					// An "insert if absent" that treats a conflict as done.
					if _, err := tx.Exec(ctx, "INSERT OR ROLLBACK INTO t (k) VALUES ($1)", 1000); err != nil && !strings.Contains(err.Error(), "UNIQUE") {
						return err
					}
					return nil
				}
				_, err := tx.Exec(ctx, "INSERT INTO log (n) VALUES ($1)", k)
				return err
			})
		}()
		waitForming(t, db, k+1)
	}
	release()
	wg.Wait()
	for _, k := range []int{1, 2} {
		if errs[k] != nil {
			t.Errorf("call %d: %v", k, errs[k])
		}
		var n int
		if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM log WHERE n = $1", k).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Errorf("call %d's row written %d times, want once", k, n)
		}
	}
}
