package sqldb_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

func laterDB(t *testing.T, dc dialectCase) *sqldb.DB {
	t.Helper()
	db := dc.openFresh(t)
	mustExec(t, db, `CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)`)
	return db
}

func TestExecLater_QueuedWritesRunBeforeTheNextStatementInOrderAndCommit(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			args := []any{1, "first"}
			if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES ($1, $2)`, args...); err != nil {
				return err
			}
			args[1] = "changed after queueing" // the queued statement keeps its own
			if err := sqldb.ExecLater(ctx, tx, `UPDATE notes SET body = body || ' then second' WHERE id = $1`, 1); err != nil {
				return err
			}
			var body string
			if err := tx.QueryRow(ctx, `SELECT body FROM notes WHERE id = 1`).Scan(&body); err != nil {
				return err
			}
			if body != "first then second" {
				t.Errorf("the next query saw %q, want both queued writes applied in order", body)
			}
			return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (2, 'sent with the commit')`)
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, "notes"); n != 2 {
			t.Errorf("%d notes committed, want 2 (the last queued one sent with the commit)", n)
		}
	})
}

func TestExecLater_AFailingQueuedStatementFailsTheTransactionNamingIt(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		mustExec(t, db, `INSERT INTO notes (id, body) VALUES (1, 'taken')`)
		ctx := testCtx(t)
		for _, then := range []string{"a query", "the commit"} {
			t.Run(then, func(t *testing.T) {
				err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (2, 'fine')`); err != nil {
						return err
					}
					if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (1, 'duplicate')`); err != nil {
						return err // SQLite runs it at once
					}
					if then == "a query" {
						_, err := tx.Exec(ctx, `INSERT INTO notes (id, body) VALUES (3, 'after')`)
						return err
					}
					return nil
				})
				if err == nil {
					t.Fatal("the transaction committed a duplicate key")
				}
				var le *sqldb.LaterError
				if dc.dialect == sqldb.Postgres && (!errors.As(err, &le) || !strings.Contains(le.Query, "'duplicate'")) {
					t.Errorf("error %v: want a *LaterError naming the duplicate INSERT", err)
				}
				if n := count(t, db, "notes"); n != 1 {
					t.Errorf("%d notes after the failed transaction, want only the first", n)
				}
			})
		}
	})
}

func TestExecLater_RollbackToSavepointDropsWhatWasQueuedAfterIt(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (1, 'kept')`); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `SAVEPOINT s`); err != nil {
				return err
			}
			// Would fail if it were sent: the rollback drops it.
			if err := sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (1, 'undone')`); err != nil && dc.dialect == sqldb.Postgres {
				return err
			}
			if _, err := tx.Exec(ctx, `ROLLBACK TO SAVEPOINT s`); err != nil {
				return err
			}
			return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (2, 'after the rollback')`)
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, "notes"); n != 2 {
			t.Errorf("%d notes, want the one before the savepoint and the one after the rollback", n)
		}
	})
}

func TestExecLater_InACallersTransactionRunsAtOnce(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		mustExec(t, db, `INSERT INTO notes (id, body) VALUES (1, 'taken')`)
		for _, c := range dc.callers {
			t.Run(c.name, func(t *testing.T) {
				ct := c.begin(t, db)
				defer ct.rollback(context.Background())
				// The caller commits its transaction itself, unseen: a
				// queued statement would be lost, so it runs at once.
				if err := sqldb.ExecLater(testCtx(t), ct.adapter, `INSERT INTO notes (id, body) VALUES (1, 'duplicate')`); err == nil {
					t.Error("ExecLater in a caller's transaction returned no error for a duplicate key: it did not run at once")
				}
			})
		}
	})
}

func TestExecLater_RollbackToAQueuedSavepointKeepsWhatWasQueuedBeforeIt(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			for _, q := range []string{
				`INSERT INTO notes (id, body) VALUES (1, 'before the savepoint')`,
				`SAVEPOINT s`,
				`INSERT INTO notes (id, body) VALUES (2, 'after the savepoint')`,
			} {
				if err := sqldb.ExecLater(ctx, tx, q); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `ROLLBACK TO SAVEPOINT s`)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		var body string
		if err := db.QueryRow(ctx, `SELECT string_agg(body, ',') FROM notes`).Scan(&body); err != nil {
			t.Fatal(err)
		}
		if body != "before the savepoint" {
			t.Errorf("committed %q, want only the note queued before the savepoint", body)
		}
	})
}

// A handler that ignores its statement's failure: on PostgreSQL the
// transaction is aborted and its COMMIT rolls it back, which InTx reports;
// on SQLite the failed statement alone is undone and the rest commits.
func TestInTx_AnIgnoredFailedStatementFailsTheCommitOnPostgreSQLOnly(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		for _, queuedAfter := range []bool{false, true} {
			mustExec(t, db, `DELETE FROM notes`)
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if _, err := tx.Exec(ctx, `INSERT INTO notes (id, body) VALUES (1, 'first')`); err != nil {
					return err
				}
				_, _ = tx.Exec(ctx, `INSERT INTO notes (id, body) VALUES (1, 'duplicate')`)
				if queuedAfter {
					return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (3, 'queued')`)
				}
				return nil
			})
			n := count(t, db, "notes")
			switch {
			case dc.dialect == sqldb.Postgres && (err == nil || n != 0):
				t.Errorf("queued after: %v: InTx = %v with %d notes committed; want an error and none", queuedAfter, err, n)
			case dc.dialect != sqldb.Postgres && (err != nil || n == 0):
				t.Errorf("queued after: %v: InTx = %v with %d notes committed; want the others committed", queuedAfter, err, n)
			}
		}
	})
}

func TestInTx_ATransactionThatRanNothingCommits(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := laterDB(t, dc)
		ctx := testCtx(t)
		for range 3 {
			if err := db.InTx(ctx, func(context.Context, sqldb.Tx) error { return nil }); err != nil {
				t.Fatal(err)
			}
		}
		// The connections went back to the pool usable.
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			return sqldb.ExecLater(ctx, tx, `INSERT INTO notes (id, body) VALUES (1, 'after')`)
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := count(t, db, "notes"); n != 1 {
			t.Errorf("%d notes, want 1", n)
		}
	})
}
