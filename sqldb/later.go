package sqldb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ExecLater runs a statement whose result the caller does not need (an
// INSERT or UPDATE whose row count it ignores) as part of tx, possibly
// later: in a transaction begun by DB.InTx on PostgreSQL, the statement is
// queued and sent together with the transaction's next statement, or with
// its commit, in one round trip (a pipeline). A transaction of writes that
// would cost a round trip each then costs one. Elsewhere (SQLite, whose
// statements cost no round trip; a transaction of the caller's, handed
// over with FromSQL or FromPgx, whose commit Troupe does not see) it runs at
// once.
//
// The statement's error, if any, is returned by the statement that sends
// it, or by the commit, wrapped in a *LaterError that names it; the
// transaction is then aborted, as it would have been at once. A ROLLBACK
// (TO SAVEPOINT) drops the statements queued after the last SAVEPOINT
// queued (all of them when none is) instead of sending them: rolling back
// would undo them anyway. A queued SAVEPOINT, and what was queued before
// it, is sent with the ROLLBACK TO SAVEPOINT.
//
// Without arguments the query may hold several statements separated by
// semicolons, as with Tx.Exec.
//
// args are copied (byte slices included) when the statement is queued.
func ExecLater(ctx context.Context, tx Tx, query string, args ...any) error {
	if p, ok := tx.(*pipeTx); ok {
		p.pending = append(p.pending, queued{sql: query, args: cloneArgs(args)})
		return nil
	}
	_, err := tx.Exec(ctx, query, args...)
	return err
}

// cloneArgs copies args, and the byte slices among them, so that a caller
// reusing its buffers cannot change what a queued statement writes.
func cloneArgs(args []any) []any {
	out := slices.Clone(args)
	for i, a := range out {
		if b, ok := a.([]byte); ok {
			out[i] = slices.Clone(b)
		}
	}
	return out
}

// LaterError is the error of a statement run by ExecLater, reported by the
// statement or commit that sent it.
type LaterError struct {
	// Query is the statement that failed.
	Query string
	// Err is its error.
	Err error
}

func (e *LaterError) Error() string {
	q := strings.Join(strings.Fields(e.Query), " ")
	if len(q) > 80 {
		q = q[:80] + "..."
	}
	return fmt.Sprintf("sqldb: a statement queued by ExecLater failed (%s): %v", q, e.Err)
}

func (e *LaterError) Unwrap() error { return e.Err }

type queued struct {
	sql  string
	args []any
}

// single reports whether q can go in a pipeline: a statement with
// arguments is one statement; one without may hold several separated by
// semicolons, which a pipeline cannot send, unless it has none.
func (q queued) single() bool {
	return len(q.args) > 0 || !strings.Contains(strings.TrimRight(strings.TrimSpace(q.sql), ";"), ";")
}

// beginSQL opens a pipeTx's transaction. It is queued, not sent: it goes
// with the transaction's first statement.
const beginSQL = "BEGIN ISOLATION LEVEL READ COMMITTED"

// pipeTx is a transaction begun by DB.InTx on PostgreSQL. It sends what
// ExecLater queued together with the transaction's next statement, in one
// round trip (a pipeline), and its BEGIN with its first statement and its
// COMMIT with its last queued ones: a transaction of n statements whose
// results are needed costs n round trips, or n+1 when writes are queued
// after the last of them.
type pipeTx struct {
	conn    *pgxpool.Conn
	pending []queued
	begun   bool // BEGIN has been sent
}

// beginPipeTx acquires a connection for a transaction whose BEGIN waits for
// its first statement.
func beginPipeTx(ctx context.Context, pool *pgxpool.Pool) (*pipeTx, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return &pipeTx{conn: conn, pending: []queued{{sql: beginSQL}}}, nil
}

// take removes and returns the queued statements, noting that BEGIN is
// among them.
func (t *pipeTx) take() []queued {
	pending := t.pending
	t.pending = nil
	if len(pending) > 0 && !t.begun {
		t.begun = true
	}
	return pending
}

// pipelined reports whether the queued statements and last, if any, can be
// sent as one pipeline.
func (t *pipeTx) pipelined(last *queued) bool {
	if last != nil && !last.single() {
		return false
	}
	return !slices.ContainsFunc(t.pending, func(q queued) bool { return !q.single() })
}

// flush sends the queued statements, in one round trip when they can go in
// a pipeline, and reads their results.
func (t *pipeTx) flush(ctx context.Context) error {
	if len(t.pending) == 0 {
		return nil
	}
	if !t.pipelined(nil) {
		// A statement without arguments may hold several, which a
		// pipeline cannot send as one: one round trip each.
		for _, q := range t.take() {
			if _, err := t.conn.Exec(ctx, q.sql, q.args...); err != nil {
				return laterError(q, err)
			}
		}
		return nil
	}
	br, err := t.send(ctx, nil)
	if err != nil {
		return err
	}
	return br.Close()
}

// send sends the queued statements, and last if not nil, as one pipeline,
// and reads the queued ones' results: the caller reads last's from the
// returned results, then closes them. The queued statements must be
// pipelined (see pipelined).
func (t *pipeTx) send(ctx context.Context, last *queued) (pgx.BatchResults, error) {
	pending := t.take()
	var b pgx.Batch
	for _, q := range pending {
		b.Queue(q.sql, q.args...)
	}
	if last != nil {
		b.Queue(last.sql, last.args...)
	}
	br := t.conn.SendBatch(ctx, &b)
	for _, q := range pending {
		if _, err := br.Exec(); err != nil {
			br.Close()
			// A statement that cannot be prepared, or whose arguments
			// cannot be encoded, fails the whole batch before it runs:
			// pgx names it.
			var pe pgx.ErrPreprocessingBatch
			if errors.As(err, &pe) {
				return nil, &LaterError{Query: pe.SQL(), Err: err}
			}
			return nil, laterError(q, err)
		}
	}
	return br, nil
}

// laterError reports the failure of the queued statement q: BEGIN's own
// failure is the transaction's, not a queued write's.
func laterError(q queued, err error) error {
	if q.sql == beginSQL {
		return fmt.Errorf("sqldb: begin transaction: %w", err)
	}
	return &LaterError{Query: q.sql, Err: err}
}

func isRollback(query string) bool {
	q := strings.TrimSpace(query)
	return len(q) >= 8 && strings.EqualFold(q[:8], "ROLLBACK")
}

func isSavepoint(query string) bool {
	q := strings.TrimSpace(query)
	return len(q) >= 9 && strings.EqualFold(q[:9], "SAVEPOINT")
}

// dropRolledBack drops the queued statements that a ROLLBACK TO SAVEPOINT
// would undo anyway: those queued after the last queued SAVEPOINT (or
// BEGIN), or all of them when none is queued (they were queued after the
// last statement sent, so after every savepoint sent).
func (t *pipeTx) dropRolledBack() {
	keep := 0
	for i, q := range t.pending {
		if q.sql == beginSQL || isSavepoint(q.sql) {
			keep = i + 1
		}
	}
	t.pending = t.pending[:keep]
}

func (t *pipeTx) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	if isRollback(query) {
		t.dropRolledBack()
	}
	q := queued{sql: query, args: args}
	if len(t.pending) == 0 || !t.pipelined(&q) {
		if err := t.flush(ctx); err != nil {
			return 0, err
		}
		return pgxTx{q: t.conn}.Exec(ctx, query, args...)
	}
	br, err := t.send(ctx, &q)
	if err != nil {
		return 0, err
	}
	tag, err := br.Exec()
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, err
	}
	return tag.RowsAffected(), nil
}

func (t *pipeTx) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	q := queued{sql: query, args: args}
	if len(t.pending) == 0 || !t.pipelined(&q) {
		if err := t.flush(ctx); err != nil {
			return nil, err
		}
		return pgxTx{q: t.conn}.Query(ctx, query, args...)
	}
	br, err := t.send(ctx, &q)
	if err != nil {
		return nil, err
	}
	rows, err := br.Query()
	if err != nil {
		br.Close()
		return nil, err
	}
	return batchRows{pgxRows{rows}, br}, nil
}

func (t *pipeTx) QueryRow(ctx context.Context, query string, args ...any) Row {
	q := queued{sql: query, args: args}
	if len(t.pending) == 0 || !t.pipelined(&q) {
		if err := t.flush(ctx); err != nil {
			return errRow{err}
		}
		return t.conn.QueryRow(ctx, query, args...)
	}
	br, err := t.send(ctx, &q)
	if err != nil {
		return errRow{err}
	}
	return batchRow{br.QueryRow(), br}
}

func (t *pipeTx) Dialect() Dialect { return Postgres }

// commit sends the queued statements and COMMIT in one round trip. A
// transaction that sent nothing, not even its BEGIN, has nothing to commit.
func (t *pipeTx) commit(ctx context.Context) error {
	if !t.begun && len(t.pending) <= 1 {
		t.pending = nil
		return nil
	}
	var tag pgconn.CommandTag
	var err error
	if !t.pipelined(nil) {
		if err = t.flush(ctx); err == nil {
			tag, err = t.conn.Exec(ctx, "COMMIT")
		}
	} else {
		var br pgx.BatchResults
		if br, err = t.send(ctx, &queued{sql: "COMMIT"}); err == nil {
			tag, err = br.Exec()
			if cerr := br.Close(); err == nil {
				err = cerr
			}
		}
	}
	if err != nil {
		return err
	}
	// The COMMIT of a transaction an error aborted rolls it back, and says
	// so only in its tag.
	if tag.String() == "ROLLBACK" {
		return pgx.ErrTxCommitRollback
	}
	return nil
}

// rollback rolls the transaction back, if it began.
func (t *pipeTx) rollback(ctx context.Context) error {
	t.pending = nil
	if !t.begun {
		return nil
	}
	_, err := t.conn.Exec(ctx, "ROLLBACK")
	return err
}

// release hands the connection back to the pool, which closes it rather
// than reuse it if it is still in a transaction (a rollback that failed).
func (t *pipeTx) release() { t.conn.Release() }

// batchRows are the rows of a pipeline's last statement: closing them
// closes the pipeline's results.
type batchRows struct {
	pgxRows
	br pgx.BatchResults
}

func (r batchRows) Close() error {
	err := r.pgxRows.Close()
	if cerr := r.br.Close(); err == nil {
		err = cerr
	}
	return err
}

// batchRow is the row of a pipeline's last statement: scanning it closes
// the pipeline's results.
type batchRow struct {
	row pgx.Row
	br  pgx.BatchResults
}

func (r batchRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	if cerr := r.br.Close(); err == nil {
		err = cerr
	}
	return err
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }
