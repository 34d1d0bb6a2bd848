package sqldb

import (
	"context"
	"database/sql"
	"sync"
)

// maxCachedStmts bounds a SQLite DB's prepared statements. Troupe's
// packages use a few dozen distinct statements; the bound keeps a caller
// that builds many distinct ones (a multi-row INSERT per batch size, say)
// from growing the cache without end: past it, statements are parsed each
// time, as without a cache.
const maxCachedStmts = 512

// stmtCache keeps a SQLite DB's statements prepared, so that each is parsed
// once per connection instead of once per execution: parsing was a quarter
// of the CPU of a saga benchmark on SQLite, spent while holding the write
// lock.
//
// A query without arguments that holds a semicolon is not cached: it may
// be several statements, which the driver parses at every execution
// anyway. Outside a
// transaction a statement is prepared at its first use. Inside one it is
// not: preparing on the DB takes a connection from the pool, which the
// transaction's own may have left empty, so it would wait for connections
// held by callers that may be waiting for this transaction. There the
// statement runs unprepared and is noted; DB.InTx prepares the noted ones
// once its transaction has ended and its connection is back in the pool.
// Then each transaction uses the prepared statement (Tx.StmtContext), which
// database/sql prepares on the transaction's own connection the first time.
type stmtCache struct {
	db *sql.DB

	mu      sync.Mutex
	stmts   map[string]*sql.Stmt // by the query as the caller wrote it
	noted   map[string]bool      // seen in a transaction, to prepare after it
	closed  bool
	refused map[string]bool // failed to prepare: not tried again
}

func newStmtCache(db *sql.DB) *stmtCache {
	return &stmtCache{db: db, stmts: map[string]*sql.Stmt{}, noted: map[string]bool{}, refused: map[string]bool{}}
}

// get returns the prepared statement of query, or nil. Inside a
// transaction (inTx) a miss is noted for prepareNoted; outside, the
// statement is prepared now with the SQL prepared (query rewritten).
func (c *stmtCache) get(ctx context.Context, query, prepared string, inTx bool) *sql.Stmt {
	c.mu.Lock()
	if s, ok := c.stmts[query]; ok || c.closed || c.refused[query] || len(c.stmts)+len(c.noted) >= maxCachedStmts {
		c.mu.Unlock()
		return s
	}
	if inTx {
		c.noted[query] = true
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	return c.prepare(ctx, query, prepared)
}

// prepare prepares query (as the SQL prepared) on the DB and keeps it,
// unless another goroutine did first.
func (c *stmtCache) prepare(ctx context.Context, query, prepared string) *sql.Stmt {
	s, err := c.db.PrepareContext(ctx, prepared)
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.noted, query)
	if err != nil {
		// A statement that does not parse, or a context that ended: run
		// unprepared, where the error, if any, is reported. A syntax error
		// is not worth trying again.
		if ctx.Err() == nil {
			c.refused[query] = true
		}
		return nil
	}
	if old, ok := c.stmts[query]; ok || c.closed {
		s.Close()
		return old
	}
	c.stmts[query] = s
	return s
}

// prepareNoted prepares the statements noted inside transactions. It must
// be called while holding no connection of the DB.
func (c *stmtCache) prepareNoted(ctx context.Context) {
	c.mu.Lock()
	if len(c.noted) == 0 {
		c.mu.Unlock()
		return
	}
	queries := make([]string, 0, len(c.noted))
	for q := range c.noted {
		queries = append(queries, q)
	}
	c.mu.Unlock()
	for _, q := range queries {
		c.prepare(ctx, q, positional(q))
	}
}

// close closes every prepared statement; later gets return nil.
func (c *stmtCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for q, s := range c.stmts {
		s.Close()
		delete(c.stmts, q)
	}
}
