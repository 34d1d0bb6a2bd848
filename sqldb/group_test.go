package sqldb_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

// On either dialect, concurrent InGroupTx calls keep InTx's outcome each:
// a nil fn commits, an error rolls back that call's writes only.
func TestInGroupTx_EachCallCommitsOrRollsBackItsOwnWrites(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		ctx := testCtx(t)
		mustExec(t, db, "CREATE TABLE g (k INTEGER PRIMARY KEY)")
		errOdd := errors.New("odd keys are refused")
		const calls = 40
		errs := make([]error, calls)
		var wg sync.WaitGroup
		for k := range calls {
			wg.Go(func() {
				errs[k] = db.InGroupTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					if _, err := tx.Exec(ctx, "INSERT INTO g (k) VALUES ($1)", k); err != nil {
						return err
					}
					if k%2 == 1 {
						return errOdd
					}
					return nil
				})
			})
		}
		wg.Wait()
		for k, err := range errs {
			if want := k%2 == 1; errors.Is(err, errOdd) != want || (!want && err != nil) {
				t.Errorf("call %d: %v", k, err)
			}
		}
		var n, odd int
		if err := db.QueryRow(ctx, "SELECT COUNT(*), COALESCE(SUM(k % 2), 0) FROM g WHERE k >= $1", 0).Scan(&n, &odd); err != nil {
			t.Fatal(err)
		}
		if n != calls/2 || odd != 0 {
			t.Fatalf("%d rows (%d odd), want the %d even keys only", n, odd, calls/2)
		}
	})
}
