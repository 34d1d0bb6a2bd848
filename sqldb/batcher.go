package sqldb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// ErrBatchResultCount reports a Batcher's function that returned a number
// of results other than the number of items it was given. The batch is
// rolled back.
var ErrBatchResultCount = errors.New("sqldb: batch function returned the wrong number of results")

// BatcherConfig tunes a Batcher. The zero value gives the defaults.
type BatcherConfig struct {
	// MaxItems is the most items one batch takes: one call of the
	// Batcher's function, in one transaction. Default 64. A function that
	// writes a batch with one statement must keep MaxItems times its
	// parameters per item within the database's limit (65535 parameters a
	// statement on PostgreSQL, 32766 on SQLite).
	MaxItems int

	// Parallel is the most batches running at once. Default 1: on SQLite
	// one write transaction runs at a time anyway, and on PostgreSQL a
	// batch's commit costs a flush of the WAL to disk, which one batch at a
	// time spreads over the most items (the calls that arrive while a batch
	// commits are the next batch). Raise it where statements, not commits,
	// are what a batch waits for.
	Parallel int
}

// Batcher serves concurrent calls of Do together: the items that arrive
// while batches run are handed, as one slice, to one call of a set-wise
// function, in one transaction. Where InGroupTx shares a commit between
// callers that still run their own statements, a Batcher's function
// writes many items with one statement (a multi-row INSERT ... RETURNING)
// and one commit: an order service whose concurrent requests each place an
// order and start a saga, for instance.
//
// A Batcher never waits for a batch to fill. A call of Do that finds fewer
// than Parallel batches running runs its own item at once, alone: at low
// load a batch is one item and adds no latency. The calls that arrive while
// Parallel batches run queue, and the next batch takes them all, up to
// MaxItems, in arrival order. A batch's caller (its leader) does not go on
// serving others once its batch is done: it hands the lead to the first
// queued call, which runs the next batch, and returns.
//
// # Failures
//
// If the function fails (returns an error or panics), returns the wrong
// number of results, or the commit fails, for a batch of more than one
// item, nothing of the batch is written and each item runs again alone:
// fn(ctx, tx, []T{item}) in a transaction of its own, on its caller's
// goroutine and with its caller's ctx, and that outcome (result, error or
// panic) is its caller's. One bad item thus fails only its own call, and the
// function may run twice for an item, the first time rolled back, as when
// a caller retries. A batch of one item returns its function's error, or
// panics with its panic, as InTx does, without a second try.
//
// # Context
//
// A call whose ctx ends while its item is queued returns ctx's error, and
// its item is not run. Once a batch runs, it runs with its leader's ctx
// without its cancellation (context.WithoutCancel: fn sees the leader's
// values), so that one caller leaving does not undo the others' work, and
// its callers wait for its outcome even when their own ctx ends meanwhile.
// An item may thus commit after its caller's ctx ended: make items
// idempotent (keyed by a request ID, written with ON CONFLICT DO NOTHING)
// if callers retry. The run alone after a failed batch uses the caller's
// own ctx, and is skipped if it has ended.
//
// A Batcher is safe for concurrent use and starts no goroutine: each batch
// runs on one of its callers' goroutines.
type Batcher[T, R any] struct {
	db       *DB
	fn       func(ctx context.Context, tx Tx, items []T) ([]R, error)
	maxItems int
	parallel int

	mu      sync.Mutex
	queue   []*batchCall[T, R] // waiting for a batch, in arrival order
	running int                // batches running or about to, the handed-on lead included
}

// batchCall is one call of Batcher.Do.
type batchCall[T, R any] struct {
	item T
	// reply receives, once, the lead or, from the leader of the batch
	// that took the item, the item's outcome.
	reply chan batchReply[R]
	// queued is guarded by Batcher.mu: the call is in Batcher.queue.
	queued bool
}

// batchReply is what a queued call receives: the lead of the next batch, or
// its item's result in a batch that committed, or word that the batch
// failed and the item must run alone.
type batchReply[R any] struct {
	lead   bool
	result R
	alone  bool
}

// batcherKey marks the context a Batcher's function runs with, to refuse a
// call of the same Batcher's Do, which would wait for itself.
type batcherKey struct{ b any }

// NewBatcher returns a Batcher that serves items with fn on db. fn must
// return one result per item, in the items' order (the i-th result is the
// i-th item's caller's), and should run the same whether it is given one
// item or many: it runs again with a single item when a batch fails.
//
// NewBatcher panics if db or fn is nil or a field of cfg is negative, as
// these are mistakes in the program, not conditions to handle.
func NewBatcher[T, R any](db *DB, cfg BatcherConfig, fn func(ctx context.Context, tx Tx, items []T) ([]R, error)) *Batcher[T, R] {
	switch {
	case db == nil:
		panic("sqldb: NewBatcher with a nil DB")
	case fn == nil:
		panic("sqldb: NewBatcher with a nil function")
	case cfg.MaxItems < 0:
		panic(fmt.Sprintf("sqldb: NewBatcher with MaxItems %d, negative", cfg.MaxItems))
	case cfg.Parallel < 0:
		panic(fmt.Sprintf("sqldb: NewBatcher with Parallel %d, negative", cfg.Parallel))
	}
	if cfg.MaxItems == 0 {
		cfg.MaxItems = 64
	}
	if cfg.Parallel == 0 {
		cfg.Parallel = 1
	}
	return &Batcher[T, R]{db: db, fn: fn, maxItems: cfg.MaxItems, parallel: cfg.Parallel}
}

// Do serves item, alone or in a batch with other calls' items (see
// Batcher), and returns its result once its transaction has committed.
//
// Do commits in a transaction of its own: it does not join one its caller
// holds, and on SQLite it returns an error, instead of waiting forever for
// the write lock, if ctx is that of a transaction of the same DB. Nor may
// the Batcher's function call Do of the same Batcher.
func (b *Batcher[T, R]) Do(ctx context.Context, item T) (R, error) {
	var zero R
	if ctx.Value(batcherKey{b}) != nil {
		return zero, errors.New("sqldb: Batcher.Do called by the same Batcher's function: it would wait for itself")
	}
	if b.db.pool == nil && ctx.Value(inTxKey{b.db}) != nil {
		return zero, errors.New("sqldb: Batcher.Do called inside a transaction of the same SQLite DB: it would wait for that transaction's lock")
	}
	if err := ctx.Err(); err != nil {
		return zero, queuedErr(err)
	}
	c := &batchCall[T, R]{item: item, reply: make(chan batchReply[R], 1)}
	b.mu.Lock()
	if b.running < b.parallel {
		b.running++
		b.mu.Unlock()
		return b.lead(ctx, c)
	}
	c.queued = true
	b.queue = append(b.queue, c)
	b.mu.Unlock()

	var rep batchReply[R]
	select {
	case rep = <-c.reply:
	case <-ctx.Done():
		b.mu.Lock()
		if c.queued {
			b.queue = slices.DeleteFunc(b.queue, func(o *batchCall[T, R]) bool { return o == c })
			c.queued = false
			b.mu.Unlock()
			return zero, queuedErr(ctx.Err())
		}
		b.mu.Unlock()
		// A batch has taken the item, or the call was handed the lead:
		// the reply is on its way.
		rep = <-c.reply
	}
	switch {
	case rep.lead:
		if err := ctx.Err(); err != nil {
			b.handOn() // the item is not run; the next call leads
			return zero, queuedErr(err)
		}
		return b.lead(ctx, c)
	case rep.alone:
		return b.runAlone(ctx, item)
	}
	return rep.result, nil
}

// queuedErr reports that a call's ctx ended before its item ran.
func queuedErr(err error) error {
	return fmt.Errorf("sqldb: batch: waiting for a batch: %w", err)
}

// lead runs a batch of c's item and the queued ones, tells each caller its
// outcome, and hands the lead on.
func (b *Batcher[T, R]) lead(ctx context.Context, c *batchCall[T, R]) (R, error) {
	calls := b.take(c)
	others := calls[1:]
	finished := false
	defer func() {
		if !finished { // fn panicked in a batch of one, or called runtime.Goexit
			b.handOn()
			for _, o := range others {
				o.reply <- batchReply[R]{alone: true}
			}
		}
	}()
	results, err := b.run(ctx, calls)
	finished = true
	b.handOn()
	for i, o := range others {
		if err != nil {
			o.reply <- batchReply[R]{alone: true}
		} else {
			o.reply <- batchReply[R]{result: results[i+1]}
		}
	}
	switch {
	case err == nil:
		return results[0], nil
	case len(calls) == 1:
		var zero R
		return zero, err
	}
	return b.runAlone(ctx, c.item)
}

// take removes from the queue the items of the batch that c leads: c's
// own, then those queued, in arrival order, up to MaxItems.
func (b *Batcher[T, R]) take(c *batchCall[T, R]) []*batchCall[T, R] {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := min(len(b.queue), b.maxItems-1)
	calls := make([]*batchCall[T, R], 0, n+1)
	calls = append(calls, c)
	for _, o := range b.queue[:n] {
		o.queued = false
		calls = append(calls, o)
	}
	clear(b.queue[:n])
	b.queue = b.queue[n:]
	if len(b.queue) == 0 {
		b.queue = nil
	}
	return calls
}

// handOn passes the lead of a batch that ended to the first queued call, or
// frees its place if none is queued.
func (b *Batcher[T, R]) handOn() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.queue) == 0 {
		b.running--
		return
	}
	next := b.queue[0]
	b.queue[0] = nil
	b.queue = b.queue[1:]
	next.queued = false
	next.reply <- batchReply[R]{lead: true}
}

// run runs fn on the calls' items in one transaction, with ctx's values
// but not its cancellation. A panic in a batch of one goes on, as in InTx;
// in a batch of more it is an error: each item then runs again alone, where
// its panic, if it is the item's, goes to its caller.
func (b *Batcher[T, R]) run(ctx context.Context, calls []*batchCall[T, R]) (results []R, err error) {
	items := make([]T, len(calls))
	for i, c := range calls {
		items[i] = c.item
	}
	if len(calls) > 1 {
		defer func() {
			if p := recover(); p != nil {
				results, err = nil, fmt.Errorf("sqldb: batch function panicked: %v", p)
			}
		}()
	}
	return b.inTx(context.WithoutCancel(ctx), items)
}

// runAlone runs item alone, after its batch failed, unless ctx has ended.
func (b *Batcher[T, R]) runAlone(ctx context.Context, item T) (R, error) {
	if err := ctx.Err(); err != nil {
		var zero R
		return zero, fmt.Errorf("sqldb: batch: the batch failed, and ctx ended before the item could run alone: %w", err)
	}
	results, err := b.inTx(ctx, []T{item})
	if err != nil {
		var zero R
		return zero, err
	}
	return results[0], nil
}

// inTx calls fn on items in a transaction, and checks that it returned a
// result per item.
func (b *Batcher[T, R]) inTx(ctx context.Context, items []T) ([]R, error) {
	var results []R
	err := b.db.InTx(context.WithValue(ctx, batcherKey{b}, true), func(ctx context.Context, tx Tx) error {
		rs, err := b.fn(ctx, tx, items)
		if err != nil {
			return err
		}
		if len(rs) != len(items) {
			return fmt.Errorf("%w: %d results for %d items", ErrBatchResultCount, len(rs), len(items))
		}
		results = rs
		return nil
	})
	if err != nil {
		return nil, err
	}
	return results, nil
}
