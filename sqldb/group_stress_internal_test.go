package sqldb

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
)

// The leader's own failure, panic or runtime.Goexit rolls back its writes
// only: the calls that joined its group commit.
func TestInGroupTx_ALeaderThatFailsPanicsOrExitsLosesOnlyItsOwnWrites(t *testing.T) {
	for _, how := range []string{"error", "panic", "goexit"} {
		t.Run(how, func(t *testing.T) {
			db, ctx := groupTestDB(t)
			release := holdWriter(t, db)
			errLeader := errors.New("leader refuses")
			var wg sync.WaitGroup
			errs := make([]error, 3)
			var leaderPanic any
			for k := range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if k == 0 {
						defer func() { leaderPanic = recover() }()
					}
					errs[k] = db.InGroupTx(ctx, func(ctx context.Context, tx Tx) error {
						if _, err := tx.Exec(ctx, "INSERT INTO t (k) VALUES ($1)", k); err != nil {
							return err
						}
						if k != 0 {
							return nil
						}
						switch how {
						case "panic":
							panic("leader panics")
						case "goexit":
							runtime.Goexit()
						}
						return errLeader
					})
				}()
				waitForming(t, db, k+1)
			}
			release()
			wg.Wait()
			got := committedKeys(t, db, ctx, "t")
			if got[0] {
				t.Error("the leader's row was committed")
			}
			switch how {
			case "error":
				if !errors.Is(errs[0], errLeader) {
					t.Errorf("leader: %v", errs[0])
				}
			case "panic":
				if leaderPanic != "leader panics" {
					t.Errorf("leader panic: %v", leaderPanic)
				}
			}
			for _, k := range []int{1, 2} {
				if errs[k] != nil || !got[k] {
					t.Errorf("member %d: %v, row %v", k, errs[k], got[k])
				}
			}
		})
	}
}

// Many concurrent calls on a DB with one or two connections, a mix of
// InTx, InGroupTx, failures, panics and cancellations, end without
// deadlock, and exactly the calls that returned nil have their row.
func TestInGroupTx_StressWithFewConnections(t *testing.T) {
	for _, conns := range []int{1, 2} {
		t.Run(fmt.Sprint(conns), func(t *testing.T) {
			db := openSQLiteForCache(t, &Config{MaxConns: conns})
			ctx := context.Background()
			if _, err := db.Exec(ctx, "CREATE TABLE s (k INTEGER PRIMARY KEY, v TEXT)"); err != nil {
				t.Fatal(err)
			}
			const calls = 300
			results := make([]error, calls)
			var wg sync.WaitGroup
			for k := range calls {
				wg.Go(func() {
					r := rand.IntN(10)
					cctx, cancel := context.WithCancel(ctx)
					defer cancel()
					switch r {
					case 0:
						cancel()
					case 4:
						go cancel() // while it waits, or is taken, or runs
					}
					call := db.InGroupTx
					if k%7 == 0 {
						call = db.InTx
					}
					defer func() {
						if p := recover(); p != nil {
							results[k] = fmt.Errorf("panic %v", p)
						}
					}()
					results[k] = call(cctx, func(ctx context.Context, tx Tx) error {
						q := fmt.Sprintf("INSERT INTO s (k, v) VALUES ($1, $2) -- %d", k%20)
						if _, err := tx.Exec(ctx, q, k, "x"); err != nil {
							return err
						}
						var n int
						if err := tx.QueryRow(ctx, "SELECT COUNT(*) FROM s WHERE k <= $1", k).Scan(&n); err != nil {
							return err
						}
						switch r {
						case 1:
							return errors.New("refused")
						case 2:
							panic("boom")
						case 3:
							cancel()
						}
						return nil
					})
				})
			}
			wg.Wait()
			rows, err := db.Query(ctx, "SELECT k FROM s WHERE k >= $1", 0)
			if err != nil {
				t.Fatal(err)
			}
			got := map[int]bool{}
			for rows.Next() {
				var k int
				rows.Scan(&k)
				got[k] = true
			}
			rows.Close()
			for k, err := range results {
				if (err == nil) != got[k] {
					t.Errorf("call %d: err %v, row %v", k, err, got[k])
				}
			}
		})
	}
}
