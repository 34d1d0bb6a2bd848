package sqldb_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"
	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// dialectCase is one dialect the conformance tests run against.
type dialectCase struct {
	dialect sqldb.Dialect
	// newURL returns the URL of a fresh, empty database that lives as long
	// as t.
	newURL func(t testing.TB) string
	// callers are the ways an application begins its own transaction on
	// this dialect, for Troupe's writes to join.
	callers []callerKind
}

var dialects = []dialectCase{
	{
		dialect: sqldb.SQLite,
		newURL: func(t testing.TB) string {
			return "sqlite://" + filepath.Join(t.TempDir(), "test.db")
		},
		callers: []callerKind{{name: "database/sql", begin: beginSQL}},
	},
	{
		dialect: sqldb.Postgres,
		newURL:  pgtest.URL,
		callers: []callerKind{
			{name: "database/sql", begin: beginSQL},
			{name: "pgx", begin: beginPgx},
		},
	},
}

// forEachDialect runs test once per dialect, in parallel subtests.
func forEachDialect(t *testing.T, test func(t *testing.T, dc dialectCase)) {
	t.Helper()
	for _, dc := range dialects {
		t.Run(dc.dialect.String(), func(t *testing.T) {
			t.Parallel()
			test(t, dc)
		})
	}
}

// openFresh opens a fresh, empty database of the dialect.
func (dc dialectCase) openFresh(t testing.TB) *sqldb.DB {
	t.Helper()
	return open(t, dc.newURL(t), nil)
}

func open(t testing.TB, url string, cfg *sqldb.Config) *sqldb.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := sqldb.Open(ctx, url, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Error(err)
		}
	})
	return db
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustExec(t testing.TB, db *sqldb.DB, query string, args ...any) {
	t.Helper()
	if _, err := db.Exec(testCtx(t), query, args...); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
}

func count(t testing.TB, q interface {
	QueryRow(context.Context, string, ...any) sqldb.Row
}, table string) int {
	t.Helper()
	var n int
	if err := q.QueryRow(testCtx(t), "SELECT COUNT(*) FROM "+table).Scan(&n); err != nil {
		t.Fatalf("count %s: %v", table, err)
	}
	return n
}

// callerTx is a transaction the application began with its own data
// layer, handed to Troupe as adapter.
type callerTx struct {
	adapter  sqldb.Tx
	exec     func(ctx context.Context, query string, args ...any) error // the application's own write
	commit   func(ctx context.Context) error
	rollback func(ctx context.Context) error
}

type callerKind struct {
	name  string
	begin func(t *testing.T, db *sqldb.DB) callerTx
}

// beginSQL begins a database/sql transaction: on SQLite's *sql.DB, or on
// PostgreSQL through pgx's stdlib driver.
func beginSQL(t *testing.T, db *sqldb.DB) callerTx {
	sqlDB := db.SQL()
	if db.Dialect() == sqldb.Postgres {
		sqlDB = stdlib.OpenDBFromPool(db.Pool())
		t.Cleanup(func() { sqlDB.Close() })
	}
	tx, err := sqlDB.BeginTx(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	return callerTx{
		adapter: sqldb.FromSQL(tx, db.Dialect()),
		exec: func(ctx context.Context, q string, args ...any) error {
			_, err := tx.ExecContext(ctx, q, args...)
			return err
		},
		commit:   func(context.Context) error { return tx.Commit() },
		rollback: func(context.Context) error { return tx.Rollback() },
	}
}

func beginPgx(t *testing.T, db *sqldb.DB) callerTx {
	tx, err := db.Pool().Begin(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return callerTx{
		adapter: sqldb.FromPgx(tx),
		exec: func(ctx context.Context, q string, args ...any) error {
			_, err := tx.Exec(ctx, q, args...)
			return err
		},
		commit:   tx.Commit,
		rollback: tx.Rollback,
	}
}

const createItems = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"

func TestInTx_CommitsWhenFnReturnsNil(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		err := db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
			if tx.Dialect() != dc.dialect {
				t.Errorf("tx.Dialect() = %v, want %v", tx.Dialect(), dc.dialect)
			}
			n, err := tx.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2), ($3, $4)", 1, "a", 2, "b")
			if n != 2 {
				t.Errorf("Exec reported %d rows affected, want 2", n)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := count(t, db, "items"); got != 2 {
			t.Errorf("%d rows after commit, want 2", got)
		}
	})
}

func TestInTx_RollsBackAndReturnsFnErrorUnchanged(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		errRefused := errors.New("refused")
		err := db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
			if _, err := tx.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2)", 1, "a"); err != nil {
				return err
			}
			return fmt.Errorf("step two: %w", errRefused)
		})
		if !errors.Is(err, errRefused) || err.Error() != "step two: refused" {
			t.Fatalf("InTx returned %v, want fn's error unchanged", err)
		}
		if got := count(t, db, "items"); got != 0 {
			t.Errorf("%d rows after rollback, want 0", got)
		}
	})
}

func TestInTx_RollsBackOnPanicAndPanicsOn(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		type boom struct{ n int }
		got := func() (p any) {
			defer func() { p = recover() }()
			db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
				if _, err := tx.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2)", 1, "a"); err != nil {
					t.Fatal(err)
				}
				panic(boom{42})
			})
			return nil
		}()
		if got != (boom{42}) {
			t.Fatalf("recovered %v, want the panic of fn", got)
		}
		if n := count(t, db, "items"); n != 0 {
			t.Errorf("%d rows after panic, want 0", n)
		}
		// The transaction's locks and connection were released: a new
		// write transaction gets through at once (on SQLite, a lock left
		// behind would make this wait for the busy timeout and fail).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2)", 1, "a")
			return err
		}); err != nil {
			t.Fatalf("write after the panic: %v", err)
		}
	})
}

func TestInTx_ConcurrentReadModifyWriteLosesNoUpdate(t *testing.T) {
	// The read that the update depends on must lock: SQLite's transactions
	// hold the write lock from BEGIN; PostgreSQL needs FOR UPDATE.
	readForUpdate := map[sqldb.Dialect]string{
		sqldb.SQLite:   "SELECT n FROM counter WHERE id = 1",
		sqldb.Postgres: "SELECT n FROM counter WHERE id = 1 FOR UPDATE",
	}
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		const (
			handles    = 2 // like two processes
			perHandle  = 4 // goroutines sharing each handle's pool
			increments = 200
		)
		url := dc.newURL(t)
		dbs := make([]*sqldb.DB, handles)
		for i := range dbs {
			dbs[i] = open(t, url, nil)
		}
		mustExec(t, dbs[0], "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
		mustExec(t, dbs[0], "INSERT INTO counter (id, n) VALUES (1, 0)")

		ctx := testCtx(t)
		errs := make(chan error, handles*perHandle)
		for g := range handles * perHandle {
			db := dbs[g%handles]
			go func() {
				for range increments {
					err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						var n int
						if err := tx.QueryRow(ctx, readForUpdate[dc.dialect]).Scan(&n); err != nil {
							return err
						}
						_, err := tx.Exec(ctx, "UPDATE counter SET n = $1 WHERE id = 1", n+1)
						return err
					})
					if err != nil {
						errs <- err
						return
					}
				}
				errs <- nil
			}()
		}
		for range handles * perHandle {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
		var n int
		if err := dbs[0].QueryRow(ctx, "SELECT n FROM counter WHERE id = 1").Scan(&n); err != nil {
			t.Fatal(err)
		}
		if want := handles * perHandle * increments; n != want {
			t.Errorf("counter = %d, want %d: updates were lost", n, want)
		}
	})
}

func TestTx_JoinsCallersTransaction(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		for _, kind := range dc.callers {
			for _, commit := range []bool{true, false} {
				name := kind.name + "/rollback"
				if commit {
					name = kind.name + "/commit"
				}
				t.Run(name, func(t *testing.T) {
					db := dc.openFresh(t)
					mustExec(t, db, createItems)
					ctx := testCtx(t)

					c := kind.begin(t, db)
					if c.adapter.Dialect() != dc.dialect {
						t.Errorf("adapter dialect %v, want %v", c.adapter.Dialect(), dc.dialect)
					}
					if err := c.exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2)", 1, "the application's row"); err != nil {
						t.Fatal(err)
					}
					if _, err := c.adapter.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2)", 2, "troupe's row"); err != nil {
						t.Fatal(err)
					}
					// Same transaction: the adapter sees the application's
					// uncommitted row; nobody else sees either yet.
					if n := count(t, c.adapter, "items"); n != 2 {
						t.Errorf("inside the transaction the adapter sees %d rows, want 2", n)
					}
					if n := count(t, db, "items"); n != 0 {
						t.Errorf("before commit another connection sees %d rows, want 0", n)
					}

					want := 0
					end := c.rollback
					if commit {
						want, end = 2, c.commit
					}
					if err := end(ctx); err != nil {
						t.Fatal(err)
					}
					if n := count(t, db, "items"); n != want {
						t.Errorf("after the caller's %s: %d rows, want %d", name, n, want)
					}
				})
			}
		}
	})
}

func TestQuery_ReadsRowsInOrderOnBothDialects(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		mustExec(t, db, "INSERT INTO items (id, name) VALUES (3, 'c'), (1, 'a'), (2, 'b')")
		rows, err := db.Query(testCtx(t), "SELECT id, name FROM items WHERE id >= $1 ORDER BY id", 2)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for rows.Next() {
			var id int
			var name string
			if err := rows.Scan(&id, &name); err != nil {
				t.Fatal(err)
			}
			got = append(got, fmt.Sprintf("%d=%s", id, name))
		}
		if err := rows.Close(); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(got) != "[2=b 3=c]" {
			t.Errorf("rows = %v, want [2=b 3=c]", got)
		}
	})
}

func TestQueryRow_NoRowMatchesErrNoRows(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		var name string
		err := db.QueryRow(testCtx(t), "SELECT name FROM items WHERE id = $1", 1).Scan(&name)
		if !errors.Is(err, sqldb.ErrNoRows) {
			t.Errorf("outside a transaction: err = %v, want ErrNoRows", err)
		}
		err = db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
			return tx.QueryRow(ctx, "SELECT name FROM items WHERE id = $1", 1).Scan(&name)
		})
		if !errors.Is(err, sqldb.ErrNoRows) || !errors.Is(err, sql.ErrNoRows) {
			t.Errorf("in a transaction: err = %v, want ErrNoRows", err)
		}
	})
}

// One placeholder style serves both dialects: SQLite reads $N as parameter
// N, in any order and repeated, as PostgreSQL does.
func TestPlaceholders_DollarNumbersMeanTheSameOnBothDialects(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, "CREATE TABLE p (a TEXT NOT NULL, b TEXT NOT NULL, c TEXT NOT NULL)")
		mustExec(t, db, "INSERT INTO p (c, b, a) VALUES ($3, $2, $1)", "one", "two", "three")
		var a, b, c string
		var same bool
		err := db.QueryRow(testCtx(t), "SELECT a, b, c, a = $1 AND c = $2 AND b <> $1 FROM p WHERE a = $1", "one", "three").
			Scan(&a, &b, &c, &same)
		if err != nil {
			t.Fatal(err)
		}
		if a != "one" || b != "two" || c != "three" || !same {
			t.Errorf("got a=%q b=%q c=%q same=%v, want one two three true", a, b, c, same)
		}
	})
}

func TestTimes_RoundTripAndSortInTimeOrder(t *testing.T) {
	columnType := map[sqldb.Dialect]string{sqldb.SQLite: "TIMESTAMP", sqldb.Postgres: "TIMESTAMPTZ"}
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, "CREATE TABLE ev (id INTEGER PRIMARY KEY, at "+columnType[dc.dialect]+" NOT NULL)")
		base := time.Date(2026, 3, 29, 1, 30, 0, 0, time.UTC)
		east := time.FixedZone("east", 5*3600)
		west := time.FixedZone("west", -8*3600)
		// Inserted out of order, in three zones, with and without
		// fractions of a second (micro-seconds: PostgreSQL's precision).
		times := map[int]time.Time{
			3: base.Add(time.Hour).In(east),
			1: base.Add(-30 * time.Minute).In(west),
			2: base.Add(250 * time.Millisecond),
			4: base.Add(time.Hour + 123456*time.Microsecond).In(west),
			0: base.Add(-30*time.Minute - time.Microsecond),
		}
		for id, at := range times {
			mustExec(t, db, "INSERT INTO ev (id, at) VALUES ($1, $2)", id, at)
		}
		rows, err := db.Query(testCtx(t), "SELECT id, at FROM ev WHERE at >= $1 ORDER BY at", base.Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		var order []int
		for rows.Next() {
			var id int
			var at time.Time
			if err := rows.Scan(&id, &at); err != nil {
				t.Fatal(err)
			}
			if !at.Equal(times[id]) {
				t.Errorf("event %d: read %v, wrote %v", id, at, times[id])
			}
			order = append(order, id)
		}
		if err := rows.Close(); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(order) != "[0 1 2 3 4]" {
			t.Errorf("ORDER BY at gave %v, want [0 1 2 3 4]", order)
		}
	})
}

// The statements Troupe's packages lean on to stay idempotent read the same
// on both dialects.
func TestSQL_OnConflictDoNothingAndReturningMeanTheSameOnBothDialects(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		mustExec(t, db, createItems)
		err := db.InTx(testCtx(t), func(ctx context.Context, tx sqldb.Tx) error {
			for i, want := range []int64{1, 0} {
				n, err := tx.Exec(ctx, "INSERT INTO items (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", 7, "seven")
				if err != nil {
					return err
				}
				if n != want {
					t.Errorf("insert %d affected %d rows, want %d", i+1, n, want)
				}
			}
			var name string
			if err := tx.QueryRow(ctx, "UPDATE items SET name = name || $1 WHERE id = $2 RETURNING name", "!", 7).Scan(&name); err != nil {
				return err
			}
			if name != "seven!" {
				t.Errorf("RETURNING gave %q, want seven!", name)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

func TestInTx_NestedOnSQLiteFailsInsteadOfWaitingForItself(t *testing.T) {
	db := open(t, "sqlite://"+filepath.Join(t.TempDir(), "x.db"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var inner error
	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		inner = db.InTx(ctx, func(context.Context, sqldb.Tx) error { return nil })
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if inner == nil || !strings.Contains(inner.Error(), "use the Tx you were given") {
		t.Errorf("nested InTx returned %v, want an error saying to use the Tx", inner)
	}
	if ctx.Err() != nil {
		t.Error("the nested InTx waited for its context to end")
	}
}

func TestExec_OnSQLiteInsideAnInTxOfTheSameDBFailsInsteadOfWaitingForItself(t *testing.T) {
	db := open(t, "sqlite://"+filepath.Join(t.TempDir(), "x.db"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mustExec(t, db, `CREATE TABLE t (n INTEGER)`)
	var inner error
	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		_, inner = db.Exec(ctx, `INSERT INTO t VALUES (1)`)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if inner == nil || !strings.Contains(inner.Error(), "use the Tx you were given") {
		t.Errorf("DB.Exec inside InTx returned %v, want an error saying to use the Tx", inner)
	}
	if ctx.Err() != nil {
		t.Error("DB.Exec waited for its context to end")
	}
}

// A statement run by DB.Exec while a transaction holds SQLite's write lock
// waits its turn and runs once the transaction commits, however long the
// transaction takes: it is not left to SQLite's busy handler, whose timeout
// (here far shorter than the transaction) would fail it.
func TestExec_OnSQLiteWaitsItsTurnBehindATransaction(t *testing.T) {
	db := open(t, "sqlite://"+filepath.Join(t.TempDir(), "x.db"), &sqldb.Config{BusyTimeout: time.Millisecond})
	ctx := testCtx(t)
	mustExec(t, db, `CREATE TABLE t (n INTEGER)`)
	inTx, release := make(chan struct{}), make(chan struct{})
	txDone := make(chan error, 1)
	go func() {
		txDone <- db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (1)`); err != nil {
				return err
			}
			close(inTx)
			<-release
			return nil
		})
	}()
	<-inTx
	execDone := make(chan error, 1)
	go func() {
		_, err := db.Exec(ctx, `UPDATE t SET n = n + 10`)
		execDone <- err
	}()
	// The statement cannot run while the transaction holds the lock: it
	// must still be waiting when the transaction is let go. (The wait
	// gives a statement left to the busy handler the time to fail.)
	select {
	case err := <-execDone:
		t.Fatalf("DB.Exec returned %v while a transaction held the write lock", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-txDone; err != nil {
		t.Fatal(err)
	}
	if err := <-execDone; err != nil {
		t.Fatalf("DB.Exec after the transaction: %v", err)
	}
	var n int
	if err := db.QueryRow(ctx, `SELECT n FROM t`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 11 {
		t.Errorf("n = %d, want 11: the statement ran after the transaction's insert", n)
	}
}
