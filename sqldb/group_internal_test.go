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

// holdWriter holds db's write lock, as a long transaction would, until the
// returned function is called.
func holdWriter(t *testing.T, db *DB) (release func()) {
	t.Helper()
	held, done := make(chan struct{}), make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- db.InTx(context.Background(), func(context.Context, Tx) error {
			close(held)
			<-done
			return nil
		})
	}()
	<-held
	return func() {
		close(done)
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
}

// waitForming waits until the group forming on db has n calls.
func waitForming(t *testing.T, db *DB, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		db.groupMu.Lock()
		size := 0
		if db.forming != nil {
			size = db.forming.size
		}
		db.groupMu.Unlock()
		if size >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the forming group has %d calls, want %d", size, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func groupTestDB(t *testing.T) (*DB, context.Context) {
	t.Helper()
	db := openSQLiteForCache(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if _, err := db.Exec(ctx, `CREATE TABLE t (k INTEGER PRIMARY KEY);
		CREATE TABLE parent (id INTEGER PRIMARY KEY);
		CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)`); err != nil {
		t.Fatal(err)
	}
	return db, ctx
}

func committedKeys(t *testing.T, db *DB, ctx context.Context, table string) map[int]bool {
	t.Helper()
	rows, err := db.Query(ctx, "SELECT k FROM "+table+" WHERE k >= $1", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[int]bool{}
	for rows.Next() {
		var k int
		if err := rows.Scan(&k); err != nil {
			t.Fatal(err)
		}
		got[k] = true
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return got
}

// Calls that arrive while a transaction runs are served in the next one,
// together: each sees the earlier ones' rows, which no other connection
// sees before the one commit; a call whose fn fails or panics loses only
// its own rows.
func TestInGroupTx_CallsArrivingTogetherShareOneCommitAndKeepTheirOwnOutcome(t *testing.T) {
	db, ctx := groupTestDB(t)
	release := holdWriter(t, db)

	const calls = 24
	errFail := errors.New("refused")
	results := make([]error, calls)
	panics := make([]any, calls)
	var wg sync.WaitGroup
	var hidden atomic.Int32 // calls that saw an earlier call's row, not yet visible outside
	call := func(k int) {
		defer wg.Done()
		defer func() { panics[k] = recover() }()
		results[k] = db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
			if _, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k); err != nil {
				return err
			}
			if k > 0 {
				var inside, outside int
				if err := tx.QueryRow(ctx, "SELECT COUNT(*) FROM t WHERE k < $1", k).Scan(&inside); err != nil {
					return err
				}
				if err := db.QueryRow(ctx, "SELECT COUNT(*) FROM t WHERE k < $1", k).Scan(&outside); err != nil {
					return err
				}
				if inside > 0 && outside == 0 {
					hidden.Add(1)
				}
			}
			switch {
			case k%5 == 3:
				return fmt.Errorf("call %d: %w", k, errFail)
			case k == 10:
				panic("call 10 panics")
			}
			return nil
		})
	}
	wg.Add(1)
	go call(0) // the leader, waiting for the write lock
	waitForming(t, db, 1)
	for k := 1; k < calls; k++ {
		wg.Add(1)
		go call(k)
		waitForming(t, db, k+1) // in order, so that each sees the ones before
	}
	release()
	wg.Wait()

	got := committedKeys(t, db, ctx, "t")
	for k := range calls {
		switch {
		case k%5 == 3:
			if !errors.Is(results[k], errFail) || got[k] {
				t.Errorf("call %d: err %v, row kept %v; want its error and no row", k, results[k], got[k])
			}
		case k == 10:
			if panics[k] != "call 10 panics" || got[k] {
				t.Errorf("call 10: panic %v, row kept %v; want its panic and no row", panics[k], got[k])
			}
		default:
			if results[k] != nil || panics[k] != nil || !got[k] {
				t.Errorf("call %d: err %v, panic %v, row kept %v; want its row", k, results[k], panics[k], got[k])
			}
		}
	}
	if h := hidden.Load(); h != calls-1 {
		t.Errorf("%d of %d calls saw earlier calls' rows that other connections did not: want all (one shared transaction)", h, calls-1)
	}
}

// A shared commit that fails (here a deferred foreign key that one call
// broke) writes nothing; every call whose fn succeeded runs it again alone,
// so only the guilty call fails.
func TestInGroupTx_AFailedSharedCommitRunsEachCallAgainAlone(t *testing.T) {
	db, ctx := groupTestDB(t)
	if _, err := db.Exec(ctx, "INSERT INTO parent (id) VALUES ($1)", 1); err != nil {
		t.Fatal(err)
	}
	release := holdWriter(t, db)

	const calls = 6
	const guilty = 4
	runs := make([]atomic.Int32, calls)
	results := make([]error, calls)
	var wg sync.WaitGroup
	for k := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[k] = db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
				runs[k].Add(1)
				parent := 1
				if k == guilty {
					parent = 99 // no such parent: fails at commit
				}
				_, err := tx.Exec(ctx, "INSERT INTO child (id, parent) VALUES ($1, $2)", k, parent)
				return err
			})
		}()
		waitForming(t, db, k+1)
	}
	release()
	wg.Wait()

	rows := map[int]bool{}
	r, err := db.Query(ctx, "SELECT id FROM child WHERE id >= $1", 0)
	if err != nil {
		t.Fatal(err)
	}
	for r.Next() {
		var id int
		if err := r.Scan(&id); err != nil {
			t.Fatal(err)
		}
		rows[id] = true
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	for k := range calls {
		if k == guilty {
			if results[k] == nil || !strings.Contains(results[k].Error(), "FOREIGN KEY") || rows[k] {
				t.Errorf("guilty call: err %v, row %v; want the foreign key error and no row", results[k], rows[k])
			}
		} else if results[k] != nil || !rows[k] {
			t.Errorf("call %d: err %v, row %v; want its row", k, results[k], rows[k])
		}
		if n := runs[k].Load(); n != 2 {
			t.Errorf("call %d ran %d times, want 2 (shared, then alone)", k, n)
		}
	}
}

// A call whose ctx ends while it waits for its turn returns without running
// fn; the others are served.
func TestInGroupTx_ACallCancelledBeforeItsTurnDoesNotRun(t *testing.T) {
	db, ctx := groupTestDB(t)
	release := holdWriter(t, db)

	var wg sync.WaitGroup
	results := make([]error, 3)
	ran := make([]atomic.Bool, 3)
	cctx, cancel := context.WithCancel(ctx)
	for k := range 3 {
		c := ctx
		if k == 1 {
			c = cctx
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[k] = db.InGroupTx(c, func(ctx context.Context, tx Tx) error {
				ran[k].Store(true)
				_, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k)
				return err
			})
		}()
		waitForming(t, db, k+1)
	}
	cancel()
	for { // the cancelled call withdraws
		db.groupMu.Lock()
		n := len(db.forming.waiting)
		db.groupMu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	release()
	wg.Wait()
	got := committedKeys(t, db, ctx, "t")
	if !errors.Is(results[1], context.Canceled) || ran[1].Load() || got[1] {
		t.Errorf("cancelled call: err %v, ran %v, row %v", results[1], ran[1].Load(), got[1])
	}
	for _, k := range []int{0, 2} {
		if results[k] != nil || !got[k] {
			t.Errorf("call %d: err %v, row %v", k, results[k], got[k])
		}
	}
}

func TestInGroupTx_NestedInATransactionOfTheSameDBIsRefused(t *testing.T) {
	db, ctx := groupTestDB(t)
	for name, outer := range map[string]func(context.Context, func(context.Context, Tx) error) error{
		"InTx": db.InTx, "InGroupTx": db.InGroupTx,
	} {
		err := outer(ctx, func(ctx context.Context, tx Tx) error {
			return db.InGroupTx(ctx, func(context.Context, Tx) error { return nil })
		})
		if err == nil || !strings.Contains(err.Error(), "inside a transaction") {
			t.Errorf("InGroupTx inside %s: %v, want it refused", name, err)
		}
	}
}
