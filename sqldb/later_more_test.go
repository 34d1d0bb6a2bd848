package sqldb_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

// A statement without arguments may hold several statements (Tx.Exec), and
// does with ExecLater too, whatever else is queued with it.
func TestExecLater_SeveralStatementsWithoutArgumentsRunQueuedWithOthers(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES ($1, $2)`, 1, "one"); err != nil {
				return err
			}
			return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (2, 'two'); INSERT INTO notes (id, body) VALUES (3, 'three')`)
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, "notes"); n != 3 {
			t.Errorf("%d notes, want 3", n)
		}
	})
}

// The *LaterError of a queued statement that cannot even be prepared (a
// typo in a column name) names that statement, not the first one queued.
func TestExecLater_AStatementThatCannotBePreparedIsTheOneNamed(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES ($1, 'fine')`, 1); err != nil {
				return err
			}
			return sqldb.ExecLater(ctx, tx, `UPDATE notes SET bodyy = 'typo' WHERE id = $1`, 1)
		})
		if dc.dialect == sqldb.SQLite {
			// ExecLater ran it at once: its own error names the column.
			if err == nil || !strings.Contains(err.Error(), "bodyy") {
				t.Errorf("error %v: want the UPDATE's error naming the column", err)
			}
			return
		}
		var le *sqldb.LaterError
		if !errors.As(err, &le) || !strings.Contains(le.Query, "bodyy") {
			t.Errorf("error %v: want a *LaterError naming the UPDATE with the typo", err)
		}
	})
}
