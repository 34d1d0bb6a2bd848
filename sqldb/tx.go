package sqldb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrNoRows is what Row.Scan returns, wrapped or not, when the query found
// no row, on either dialect: test it with errors.Is. It is sql.ErrNoRows,
// which pgx's own ErrNoRows also matches.
var ErrNoRows = sql.ErrNoRows

// Tx runs statements inside one database transaction. Troupe's packages
// write through it, so their rows commit or roll back with the caller's own
// writes: the caller begins the transaction with the data layer it already
// uses and hands it over with FromSQL or FromPgx, or lets DB.InTx begin one.
//
// Placeholders are written $1, $2, ... on both dialects. A Tx is not safe for
// concurrent use, like the transaction it wraps.
type Tx interface {
	// Exec runs a statement and returns the number of rows it affected.
	// Without arguments the query may hold several statements separated by
	// semicolons.
	Exec(ctx context.Context, query string, args ...any) (int64, error)
	// Query runs a query. Close the rows before running another statement
	// on the same transaction.
	Query(ctx context.Context, query string, args ...any) (Rows, error)
	// QueryRow runs a query that returns at most one row. Errors are
	// returned by the row's Scan; no row gives an error matching ErrNoRows.
	QueryRow(ctx context.Context, query string, args ...any) Row
	// Dialect tells which SQL the transaction's database speaks.
	Dialect() Dialect
}

// Rows is the result of Query, read row by row:
//
//	for rows.Next() { rows.Scan(...) }
//	if err := rows.Close(); err != nil { ... }
//
// Close returns the first error met while reading (as Err does), so one
// check after the loop suffices.
type Rows interface {
	// Next advances to the next row, returning false at the end or on error.
	Next() bool
	// Scan copies the current row's columns into dest.
	Scan(dest ...any) error
	// Err returns the error, if any, that ended the iteration.
	Err() error
	// Close releases the rows and returns Err. It may be called more than
	// once.
	Close() error
}

// Row is the result of QueryRow.
type Row interface {
	// Scan copies the row's columns into dest. It returns an error
	// matching ErrNoRows when the query found no row.
	Scan(dest ...any) error
}

// FromSQL makes a Tx of a database/sql transaction: a SQLite one (driver
// modernc.org/sqlite) or a PostgreSQL one (pgx's stdlib driver). d names
// its dialect, which database/sql does not tell. Statements run through the
// Tx are part of tx: they commit or roll back with it, and the caller stays
// in charge of both.
//
// FromSQL panics if tx is nil or d is not a known Dialect.
func FromSQL(tx *sql.Tx, d Dialect) Tx {
	if tx == nil {
		panic("sqldb.FromSQL: nil *sql.Tx")
	}
	if !d.valid() {
		panic(fmt.Sprintf("sqldb.FromSQL: unknown dialect %v", d))
	}
	return sqlTx{q: tx, d: d}
}

// FromPgx makes a Tx of a pgx transaction on PostgreSQL. Statements run
// through the Tx are part of tx: they commit or roll back with it, and the
// caller stays in charge of both.
//
// FromPgx panics if tx is nil.
func FromPgx(tx pgx.Tx) Tx {
	if tx == nil {
		panic("sqldb.FromPgx: nil pgx.Tx")
	}
	return pgxTx{q: tx}
}

// InTx runs fn in a new transaction and commits it if fn returns nil. If fn
// returns an error, the transaction is rolled back and that error is
// returned as is (joined with the rollback's error, should that fail too). If fn panics (or calls runtime.Goexit, as t.FailNow
// does), the transaction is rolled back and the panic goes on.
//
// On SQLite the transaction holds the database's write lock from its start
// (BEGIN IMMEDIATE), so a read followed by a write in fn sees no concurrent
// change. Transactions of one DB queue for the lock in order; a writer in
// another process waits for it up to Config.BusyTimeout. On PostgreSQL the
// transaction runs at READ COMMITTED: lock the rows you read to update them
// (SELECT ... FOR UPDATE). Its BEGIN is sent with its first statement, and
// its COMMIT with the writes ExecLater queued last, so that a transaction
// costs one round trip per statement whose result it reads, plus one for
// the commit when writes are queued after the last of them; a transaction
// that ran no statement sends nothing.
//
// Inside fn, use tx, not db: on SQLite a statement on db would wait for the
// lock fn's own transaction holds, and a nested InTx on the same DB fails.
func (db *DB) InTx(ctx context.Context, fn func(ctx context.Context, tx Tx) error) error {
	if db.pool != nil {
		// READ COMMITTED whatever the server's default_transaction_isolation:
		// Migrate relies on reading, after taking its lock, what the holder
		// before it committed.
		pt, err := beginPipeTx(ctx, db.pool)
		if err != nil {
			return fmt.Errorf("sqldb: begin transaction: %w", err)
		}
		defer pt.release()
		return runTx(ctx, pt, fn, pt.commit, pt.rollback)
	}
	if ctx.Value(inTxKey{db}) != nil {
		// It would wait forever for the lock its caller holds.
		return errors.New("sqldb: InTx called inside an InTx of the same SQLite DB: use the Tx you were given")
	}
	ctx = context.WithValue(ctx, inTxKey{db}, true)
	// Deferred first, so run last: once the transaction's connection and
	// the write lock are free (see stmtCache).
	defer db.stmts.prepareNoted(ctx)
	select {
	case db.writer <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("sqldb: begin transaction: waiting for this DB's other write transactions: %w", ctx.Err())
	}
	defer func() { <-db.writer }()
	stx, err := db.sqlDB.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("sqldb: begin transaction: %w", err)
	}
	return runTx(ctx, sqlTx{q: stx, d: db.dialect, c: db.stmts, tx: stx, open: map[string]int{}}, fn,
		func(context.Context) error { return stx.Commit() },
		func(context.Context) error { return stx.Rollback() })
}

// inTxKey marks the context of a SQLite transaction of a DB, to refuse a
// nested one.
type inTxKey struct{ db *DB }

// runTx runs fn on tx and ends tx with commit or rollback. The rollback on
// panic is done by a deferred call that does not recover, so the panic keeps
// its original stack trace.
func runTx(ctx context.Context, tx Tx, fn func(context.Context, Tx) error,
	commit, rollback func(context.Context) error) error {
	// The rollback must happen even when ctx has ended (that may be why fn
	// failed), but must not hang.
	rollbackQuietly := func() error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		err := rollback(rctx)
		if errors.Is(err, sql.ErrTxDone) || errors.Is(err, pgx.ErrTxClosed) {
			err = nil // already rolled back, by database/sql when ctx ended
		}
		return err
	}

	returned := false
	defer func() {
		if !returned {
			_ = rollbackQuietly() // fn panicked or called runtime.Goexit
		}
	}()
	err := fn(ctx, tx)
	returned = true

	if err != nil {
		if rbErr := rollbackQuietly(); rbErr != nil {
			return errors.Join(err, fmt.Errorf("sqldb: roll back after the error above: %w", rbErr))
		}
		return err
	}
	if err := commit(ctx); err != nil {
		_ = rollbackQuietly()
		return fmt.Errorf("sqldb: commit: %w", err)
	}
	return nil
}

// sqlQueryer is what *sql.Tx and *sql.DB have in common.
type sqlQueryer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

type sqlTx struct {
	q sqlQueryer
	d Dialect

	// c, if not nil, keeps the DB's statements prepared; tx is the
	// transaction q is, if it is one.
	c  *stmtCache
	tx *sql.Tx
	// open counts, by query, the rows of tx's prepared statements not yet
	// closed: a SQLite statement runs one query at a time, so the same
	// query met again meanwhile (a nested loop) runs unprepared.
	open map[string]int
}

// queryer returns what runs query: a prepared statement when the cache
// has one (or, outside a transaction, can make one), else t.q; and the
// SQL to give it.
func (t sqlTx) queryer(ctx context.Context, query string, args []any) (sqlQueryer, string, bool) {
	q := t.rewrite(query)
	if t.c == nil || (len(args) == 0 && strings.ContainsRune(query, ';')) || t.open[query] > 0 {
		// Without arguments a query may be several statements, parsed at
		// every execution anyway (see stmtCache).
		return t.q, q, false
	}
	s := t.c.get(ctx, query, q, t.tx != nil)
	if s == nil {
		return t.q, q, false
	}
	if t.tx != nil {
		s = t.tx.StmtContext(ctx, s)
	}
	return stmtQueryer{s}, q, t.tx != nil
}

// use marks query's prepared statement as running in tx until the returned
// func is called (once or more).
func (t sqlTx) use(query string) func() {
	t.open[query]++
	done := false
	return func() {
		if !done {
			done = true
			t.open[query]--
		}
	}
}

func (t sqlTx) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	q, sql, _ := t.queryer(ctx, query, args)
	res, err := q.ExecContext(ctx, sql, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (t sqlTx) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	q, sql, prepared := t.queryer(ctx, query, args)
	rows, err := q.QueryContext(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	r := sqlRows{Rows: rows}
	if prepared {
		r.done = t.use(query)
	}
	return r, nil
}

func (t sqlTx) QueryRow(ctx context.Context, query string, args ...any) Row {
	q, sql, prepared := t.queryer(ctx, query, args)
	row := q.QueryRowContext(ctx, sql, args...)
	if prepared {
		return openRow{row, t.use(query)}
	}
	return row
}

// openRow is a row of a prepared statement of a transaction, running until
// it is scanned.
type openRow struct {
	*sql.Row
	done func()
}

func (r openRow) Scan(dest ...any) error {
	defer r.done()
	return r.Row.Scan(dest...)
}

// stmtQueryer runs a prepared statement, ignoring the query it is given
// (the statement's own).
type stmtQueryer struct{ s *sql.Stmt }

func (q stmtQueryer) ExecContext(ctx context.Context, _ string, args ...any) (sql.Result, error) {
	return q.s.ExecContext(ctx, args...)
}

func (q stmtQueryer) QueryContext(ctx context.Context, _ string, args ...any) (*sql.Rows, error) {
	return q.s.QueryContext(ctx, args...)
}

func (q stmtQueryer) QueryRowContext(ctx context.Context, _ string, args ...any) *sql.Row {
	return q.s.QueryRowContext(ctx, args...)
}

// rewrite makes a SQLite query's many $N placeholders cheap to bind (see
// positional).
func (t sqlTx) rewrite(query string) string {
	if t.d == SQLite {
		return positional(query)
	}
	return query
}

func (t sqlTx) Dialect() Dialect { return t.d }

// sqlRows makes Close report the iteration's error, as Rows promises.
type sqlRows struct {
	*sql.Rows
	done func() // if not nil, called once closed
}

func (r sqlRows) Close() error {
	closeErr := r.Rows.Close()
	if r.done != nil {
		r.done()
	}
	if err := r.Rows.Err(); err != nil {
		return err
	}
	return closeErr
}

// pgxQueryer is what pgx.Tx and *pgxpool.Pool have in common.
type pgxQueryer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

type pgxTx struct{ q pgxQueryer }

func (t pgxTx) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	tag, err := t.q.Exec(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

func (t pgxTx) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	rows, err := t.q.Query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return pgxRows{rows}, nil
}

func (t pgxTx) QueryRow(ctx context.Context, query string, args ...any) Row {
	return t.q.QueryRow(ctx, query, args...)
}

func (t pgxTx) Dialect() Dialect { return Postgres }

type pgxRows struct{ rows pgx.Rows }

func (r pgxRows) Next() bool             { return r.rows.Next() }
func (r pgxRows) Scan(dest ...any) error { return r.rows.Scan(dest...) }
func (r pgxRows) Err() error             { return r.rows.Err() }
func (r pgxRows) Close() error {
	r.rows.Close()
	return r.rows.Err()
}
