package sqldb

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// runGroup runs fns as InGroupTx calls that all join one group, in order
// (fns[0] leads), and returns their errors.
func runGroup(t *testing.T, db *DB, ctxs []context.Context, fns []func(context.Context, Tx) error) []error {
	t.Helper()
	release := holdWriter(t, db)
	errs := make([]error, len(fns))
	var wg sync.WaitGroup
	for k, fn := range fns {
		wg.Go(func() { errs[k] = db.InGroupTx(ctxs[k], fn) })
		waitForming(t, db, k+1)
	}
	release()
	wg.Wait()
	return errs
}

func insertK(k int) func(context.Context, Tx) error {
	return func(ctx context.Context, tx Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k)
		return err
	}
}

// A member that loses the shared transaction (a statement that rolled it
// all back, whose error it returns or swallows) makes the calls served
// before it run again alone, and the calls after it run alone: each commits
// once.
func TestInGroupTx_AMemberThatLosesTheSharedTransactionSendsTheOthersToRunAlone(t *testing.T) {
	for _, swallow := range []bool{false, true} {
		t.Run(map[bool]string{false: "returned", true: "swallowed"}[swallow], func(t *testing.T) {
			db, ctx := groupTestDB(t)
			if _, err := db.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", 1000); err != nil {
				t.Fatal(err)
			}
			breaker := func(ctx context.Context, tx Tx) error {
				_, err := tx.Exec(ctx, "INSERT OR ROLLBACK INTO t (k) VALUES ($1)", 1000)
				if swallow && err != nil && strings.Contains(err.Error(), "UNIQUE") {
					return nil
				}
				return err
			}
			ctxs := []context.Context{ctx, ctx, ctx, ctx}
			errs := runGroup(t, db, ctxs, []func(context.Context, Tx) error{insertK(0), insertK(1), breaker, insertK(3)})
			got := committedKeys(t, db, ctx, "t")
			for _, k := range []int{0, 1, 3} {
				if errs[k] != nil || !got[k] {
					t.Errorf("call %d: %v, row %v; want its row, committed once", k, errs[k], got[k])
				}
			}
		})
	}
}

// A leader whose ctx ends while it waits, alone, leaves no group behind:
// the next call is served.
func TestInGroupTx_ALeaderCancelledAloneLeavesNoGroupBehind(t *testing.T) {
	db, ctx := groupTestDB(t)
	release := holdWriter(t, db)
	lctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { errc <- db.InGroupTx(lctx, insertK(0)) }()
	waitForming(t, db, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled leader: %v", err)
	}
	release()
	nctx, ncancel := context.WithTimeout(ctx, 5*time.Second) // fails rather than hangs
	defer ncancel()
	if err := db.InGroupTx(nctx, insertK(1)); err != nil {
		t.Fatalf("the next call: %v", err)
	}
}

// Once fn runs, the end of its ctx, or of the leader's, neither interrupts
// its statements nor undoes the shared transaction.
func TestInGroupTx_ACtxEndingOnceFnRunsDoesNotUndoTheSharedTransaction(t *testing.T) {
	db, ctx := groupTestDB(t)
	lctx, lcancel := context.WithCancel(ctx)
	mctx, mcancel := context.WithCancel(ctx)
	defer lcancel()
	errs := runGroup(t, db, []context.Context{lctx, mctx}, []func(context.Context, Tx) error{
		insertK(0),
		func(ctx context.Context, tx Tx) error {
			lcancel() // the leader's fn has run: it waits for this one
			mcancel()
			return insertK(1)(ctx, tx)
		},
	})
	got := committedKeys(t, db, ctx, "t")
	for k := range 2 {
		if errs[k] != nil || !got[k] {
			t.Errorf("call %d: %v, row %v; want its row", k, errs[k], got[k])
		}
	}
}

// A member's fn gets a ctx that refuses a nested call on the same DB, as
// the leader's does.
func TestInGroupTx_AMemberNestingACallIsRefused(t *testing.T) {
	db, ctx := groupTestDB(t)
	var nested error
	errs := runGroup(t, db, []context.Context{ctx, ctx}, []func(context.Context, Tx) error{
		insertK(0),
		func(ctx context.Context, tx Tx) error {
			nctx, cancel := context.WithTimeout(ctx, 5*time.Second) // fails rather than hangs
			defer cancel()
			nested = db.InGroupTx(nctx, insertK(1))
			return nil
		},
	})
	if errs[0] != nil || errs[1] != nil || nested == nil || !strings.Contains(nested.Error(), "inside a transaction") {
		t.Errorf("errs %v, nested call: %v; want it refused", errs, nested)
	}
}

// A statement first met in a shared transaction is prepared once it ends.
func TestInGroupTx_StatementsFirstMetInItArePreparedAfterIt(t *testing.T) {
	db, ctx := groupTestDB(t)
	const q = "INSERT INTO t (k) VALUES ($1) -- group"
	if err := db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
		_, err := tx.Exec(ctx, q, 1)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if !db.stmts.has(q) {
		t.Error("the statement is not prepared after the call")
	}
}

// A statement whose preparing met an ended ctx is prepared at its next use.
func TestStmtCache_APrepareCutShortByCtxIsTriedAgain(t *testing.T) {
	db, ctx := groupTestDB(t)
	const q = "SELECT COUNT(*) FROM t WHERE k > $1"
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	var n int
	if err := db.QueryRow(cctx, q, 0).Scan(&n); err == nil {
		t.Fatal("a query with an ended ctx succeeded")
	}
	if err := db.QueryRow(ctx, q, 0).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if !db.stmts.has(q) {
		t.Error("the statement is not prepared")
	}
}
