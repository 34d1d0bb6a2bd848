package sqldb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
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
// (TO SAVEPOINT) drops the statements still queued instead of sending them:
// they were queued after the last statement sent, so after every savepoint,
// and rolling back would undo them anyway.
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

// pipeTx is a transaction begun by DB.InTx on PostgreSQL: it runs the
// statements ExecLater queued before any other, and before the commit.
type pipeTx struct {
	tx      pgx.Tx
	pending []queued
}

// flush sends the queued statements, in one round trip, and reads their
// results.
func (t *pipeTx) flush(ctx context.Context) error {
	pending := t.pending
	t.pending = nil
	switch len(pending) {
	case 0:
		return nil
	case 1:
		if _, err := t.tx.Exec(ctx, pending[0].sql, pending[0].args...); err != nil {
			return &LaterError{Query: pending[0].sql, Err: err}
		}
		return nil
	}
	if slices.ContainsFunc(pending, func(q queued) bool { return len(q.args) == 0 }) {
		// A statement without arguments may hold several, which a
		// pipeline cannot send as one: one round trip each.
		for _, q := range pending {
			if _, err := t.tx.Exec(ctx, q.sql, q.args...); err != nil {
				return &LaterError{Query: q.sql, Err: err}
			}
		}
		return nil
	}
	var b pgx.Batch
	for _, q := range pending {
		b.Queue(q.sql, q.args...)
	}
	br := t.tx.SendBatch(ctx, &b)
	for _, q := range pending {
		if _, err := br.Exec(); err != nil {
			br.Close()
			// A statement that cannot be prepared, or whose arguments
			// cannot be encoded, fails the whole batch before it runs:
			// pgx names it.
			var pe pgx.ErrPreprocessingBatch
			if errors.As(err, &pe) {
				return &LaterError{Query: pe.SQL(), Err: err}
			}
			return &LaterError{Query: q.sql, Err: err}
		}
	}
	return br.Close()
}

func isRollback(query string) bool {
	q := strings.TrimSpace(query)
	return len(q) >= 8 && strings.EqualFold(q[:8], "ROLLBACK")
}

func (t *pipeTx) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	if isRollback(query) {
		t.pending = nil
	} else if err := t.flush(ctx); err != nil {
		return 0, err
	}
	return pgxTx{q: t.tx}.Exec(ctx, query, args...)
}

func (t *pipeTx) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	if err := t.flush(ctx); err != nil {
		return nil, err
	}
	return pgxTx{q: t.tx}.Query(ctx, query, args...)
}

func (t *pipeTx) QueryRow(ctx context.Context, query string, args ...any) Row {
	if err := t.flush(ctx); err != nil {
		return errRow{err}
	}
	return t.tx.QueryRow(ctx, query, args...)
}

func (t *pipeTx) Dialect() Dialect { return Postgres }

func (t *pipeTx) commit(ctx context.Context) error {
	if err := t.flush(ctx); err != nil {
		return err
	}
	return t.tx.Commit(ctx)
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }
