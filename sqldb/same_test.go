package sqldb_test

import (
	"context"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

// A Tx of a type of the caller's, not comparable with ==.
type mapTx struct {
	sqldb.Tx
	notes map[string]int
}

func TestSameTx_TellsTransactionsApartOnEveryKindOfTx(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		ctx := testCtx(t)
		db := dc.openFresh(t)
		var first sqldb.Tx
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			first = tx
			if !sqldb.SameTx(tx, tx) {
				t.Error("a transaction's Tx is not the same as itself")
			}
			wrapped := mapTx{Tx: tx, notes: map[string]int{}}
			if sqldb.SameTx(wrapped, wrapped) || sqldb.SameTx(tx, wrapped) || sqldb.SameTx(wrapped, tx) {
				t.Error("a non-pointer Tx of the caller's compared the same (or panicked)")
			}
			if sqldb.SameTx(tx, nil) || sqldb.SameTx(nil, tx) {
				t.Error("a Tx is the same as nil")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		err = db.InGroupTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if !sqldb.SameTx(tx, tx) {
				t.Errorf("an InGroupTx's Tx (%T) is not the same as itself", tx)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if sqldb.SameTx(first, tx) {
				t.Error("the Txs of two InTx calls are the same")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}
