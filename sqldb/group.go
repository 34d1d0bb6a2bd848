package sqldb

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// maxGroup bounds the calls one shared transaction serves, so that a steady
// stream of callers still sees commits.
const maxGroup = 128

// InGroupTx runs fn in a transaction, as InTx does, that it may share with
// concurrent calls of InGroupTx on the same DB: group commit. On SQLite,
// where write transactions run one at a time, the calls that arrive while
// one runs are served together in the next, each fn in turn on its own
// goroutine, and committed at once: one commit, and one write of each
// changed page, for the lot. On PostgreSQL, whose transactions run side by
// side, it is InTx.
//
// Each call keeps InTx's outcome:
//
//   - fn's writes commit if it returns nil, and the call returns the commit's
//     result;
//   - if fn returns an error (or panics), its own writes are rolled back (to
//     a savepoint) and the call returns that error (or panics); the other
//     calls' writes are not affected;
//   - if the shared commit fails (say, a deferred constraint that one call
//     broke), or the shared transaction is lost, nothing of it is written,
//     and every call whose fn had returned nil runs fn again alone, in a
//     transaction of its own: fn may run twice, the first time rolled back,
//     as when a caller retries.
//
// fn sees the writes of the calls served before it in the same transaction.
// A call whose ctx ends before its turn returns ctx's error without running
// fn; once fn runs, its statements are not interrupted when ctx ends (on
// SQLite an interrupted write rolls back the whole transaction, the others'
// writes with it), so fn should check ctx itself if it runs long.
//
// Use it where many callers each commit a little at the same time: an
// application's requests that each start a saga, for instance.
func (db *DB) InGroupTx(ctx context.Context, fn func(ctx context.Context, tx Tx) error) error {
	if db.pool != nil {
		return db.InTx(ctx, fn)
	}
	if ctx.Value(inTxKey{db}) != nil {
		return errors.New("sqldb: InGroupTx called inside a transaction of the same SQLite DB: use the Tx you were given")
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sqldb: begin transaction: %w", err)
	}
	db.groupMu.Lock()
	if g := db.forming; g != nil && g.size < maxGroup {
		m := &member{fn: fn, turn: make(chan bool, 1), ran: make(chan memberResult, 1), out: make(chan error, 1)}
		g.waiting = append(g.waiting, m)
		g.size++
		db.groupMu.Unlock()
		return db.joinGroup(ctx, g, m)
	}
	g := &group{size: 1}
	db.forming = g
	db.groupMu.Unlock()
	return db.leadGroup(ctx, g, fn)
}

// group is one shared transaction of InGroupTx calls: the first call leads
// it; the others join while it forms or runs.
type group struct {
	// Guarded by DB.groupMu:
	waiting []*member // joined and not yet served, in arrival order
	size    int       // calls that joined, the leader included

	tx Tx // the shared transaction, set before a member's turn
}

// member is a call of InGroupTx served by another call, the group's leader.
type member struct {
	fn   func(context.Context, Tx) error
	lead bool              // set before a turn: lead the group, whose leader's ctx ended
	turn chan bool         // leader → member: true to run in the group, false to run alone
	ran  chan memberResult // member → leader: fn has run in the group
	out  chan error        // leader → member: the group's outcome, errRunAlone to run again alone
}

// memberResult is what a member tells its leader once its fn ran.
type memberResult struct {
	ok     bool  // fn returned nil: its writes commit or it runs again alone
	broken error // the shared transaction is lost: serve nobody else in it
}

// errRunAlone tells a member to run its fn again in a transaction of its
// own: the group's was rolled back.
var errRunAlone = errors.New("sqldb: the shared transaction was rolled back")

const groupSavepoint = "troupe_group_call"

// joinGroup waits for the member's turn in g and runs its fn there.
func (db *DB) joinGroup(ctx context.Context, g *group, m *member) error {
	var shared bool
	select {
	case shared = <-m.turn:
	case <-ctx.Done():
		db.groupMu.Lock()
		for i, w := range g.waiting {
			if w == m {
				g.waiting = append(g.waiting[:i:i], g.waiting[i+1:]...)
				db.groupMu.Unlock()
				return fmt.Errorf("sqldb: begin transaction: waiting for the shared transaction: %w", ctx.Err())
			}
		}
		db.groupMu.Unlock()
		// The leader has taken this member: answer it without running fn.
		if <-m.turn {
			if m.lead {
				db.handOn(g)
			} else {
				m.ran <- memberResult{}
			}
		}
		return fmt.Errorf("sqldb: begin transaction: waiting for the shared transaction: %w", ctx.Err())
	}
	if m.lead {
		return db.leadGroup(ctx, g, m.fn)
	}
	if !shared {
		return db.InTx(ctx, m.fn)
	}
	res := memberResult{}
	reported := false
	defer func() {
		if !reported { // fn panicked or called runtime.Goexit
			m.ran <- res
		}
	}()
	err := runSavepointed(context.WithValue(ctx, inTxKey{db}, true), g.tx, m.fn, &res)
	m.ran <- res
	reported = true
	if err != nil {
		return err
	}
	if err := <-m.out; err != errRunAlone {
		return err
	}
	return db.InTx(ctx, m.fn)
}

// runSavepointed runs fn in tx under a savepoint, rolled back to if fn
// fails or panics, and records the outcome in res before returning or
// letting a panic go on.
func runSavepointed(ctx context.Context, tx Tx, fn func(context.Context, Tx) error, res *memberResult) error {
	if _, err := tx.Exec(ctx, "SAVEPOINT "+groupSavepoint); err != nil {
		res.broken = err
		return fmt.Errorf("sqldb: begin transaction: %w", err)
	}
	rollback := func() {
		if _, err := tx.Exec(ctx, "ROLLBACK TO "+groupSavepoint+"; RELEASE "+groupSavepoint); err != nil {
			res.broken = err
		}
	}
	returned := false
	defer func() {
		if !returned {
			rollback()
		}
	}()
	err := fn(ctx, tx)
	returned = true
	if err != nil {
		rollback()
		return err
	}
	res.ok = true
	if _, err := tx.Exec(ctx, "RELEASE "+groupSavepoint); err != nil {
		// The transaction is gone (an error fn did not pass on rolled it
		// back), and with it what fn wrote: fn will run again alone.
		res.broken = err
	}
	return nil
}

// leadGroup runs the leader's fn and then the members' in one transaction,
// commits it, and tells the members the outcome.
func (db *DB) leadGroup(callerCtx context.Context, g *group, fn func(context.Context, Tx) error) error {
	ctx := context.WithValue(callerCtx, inTxKey{db}, true)
	defer db.stmts.prepareNoted(ctx) // once the connection and the write lock are free
	select {
	case db.writer <- struct{}{}:
	case <-ctx.Done():
		db.handOn(g)
		return fmt.Errorf("sqldb: begin transaction: waiting for this DB's other write transactions: %w", ctx.Err())
	}
	released := false
	release := func() {
		if !released {
			released = true
			<-db.writer
		}
	}
	defer release()

	var own error // fn's outcome
	var ok []*member
	var broken error
	var stx *stxHolder
	finish := func() error {
		ok, broken = db.serveGroup(g, broken)
		var commitErr error
		if broken == nil {
			if err := stx.tx.Commit(); err != nil {
				commitErr = err
			}
		} else {
			_ = stx.tx.Rollback()
		}
		release()
		outcome := error(nil)
		if broken != nil || commitErr != nil {
			outcome = errRunAlone
		}
		for _, m := range ok {
			m.out <- outcome
		}
		return outcome
	}

	var err error
	stx, err = db.beginGroupTx(ctx)
	if err != nil {
		db.abandonGroup(g)
		return err
	}
	g.tx = stx.view

	// The leader's fn runs first, under a savepoint as the members' do: an
	// error that fn swallowed but that rolled the whole transaction back
	// (INSERT OR ROLLBACK) fails its RELEASE, instead of letting the members
	// write outside any transaction.
	finished := false
	var res memberResult
	defer func() {
		if !finished { // fn panicked or called runtime.Goexit
			broken = res.broken
			finish()
		}
	}()
	own = runSavepointed(ctx, stx.view, fn, &res)
	broken = res.broken
	finished = true
	outcome := finish()
	if own != nil {
		return own
	}
	if outcome == errRunAlone {
		return db.InTx(callerCtx, fn) // the first try was rolled back
	}
	return nil
}

// stxHolder is the shared transaction and the Tx its calls use.
type stxHolder struct {
	tx interface {
		Commit() error
		Rollback() error
	}
	view Tx
}

// beginGroupTx begins a shared transaction. It lives on even if the
// leader's ctx ends, since other calls share it, and so do its statements
// (see InGroupTx).
func (db *DB) beginGroupTx(ctx context.Context) (*stxHolder, error) {
	stx, err := db.sqlDB.BeginTx(context.WithoutCancel(ctx), nil)
	if err != nil {
		return nil, fmt.Errorf("sqldb: begin transaction: %w", err)
	}
	return &stxHolder{tx: stx, view: uncancelled{sqlTx{q: stx, d: db.dialect, c: db.stmts, tx: stx, open: map[string]int{}}}}, nil
}

// handOn passes the lead of g, whose leader's ctx ended before it got the
// write lock, to the first call waiting in g, or closes g if none is.
func (db *DB) handOn(g *group) {
	db.groupMu.Lock()
	if len(g.waiting) == 0 {
		db.closeLocked(g)
		db.groupMu.Unlock()
		return
	}
	m := g.waiting[0]
	g.waiting = g.waiting[1:]
	db.groupMu.Unlock()
	m.lead = true
	m.turn <- true
}

// serveGroup gives each waiting member its turn in the transaction and
// closes the group to newcomers when none is left waiting. It returns the
// members whose writes are in the transaction, and why the transaction is
// lost, if it is. Once it is lost, the members still waiting run alone.
func (db *DB) serveGroup(g *group, broken error) ([]*member, error) {
	var ok []*member
	for {
		db.groupMu.Lock()
		if broken != nil || len(g.waiting) == 0 {
			rest := db.closeLocked(g)
			db.groupMu.Unlock()
			runAlone(rest)
			return ok, broken
		}
		m := g.waiting[0]
		g.waiting = g.waiting[1:]
		db.groupMu.Unlock()

		m.turn <- true
		res := <-m.ran
		if res.ok {
			ok = append(ok, m)
		}
		if res.broken != nil {
			broken = res.broken
		}
	}
}

// abandonGroup closes g, which could not begin its transaction, and sends
// its members to run alone.
func (db *DB) abandonGroup(g *group) {
	db.groupMu.Lock()
	rest := db.closeLocked(g)
	db.groupMu.Unlock()
	runAlone(rest)
}

// closeLocked closes g to newcomers and returns the calls still waiting in
// it. The caller holds db.groupMu.
func (db *DB) closeLocked(g *group) []*member {
	if db.forming == g {
		db.forming = nil
	}
	rest := g.waiting
	g.waiting = nil
	return rest
}

// runAlone sends members to run their fn in a transaction of their own.
func runAlone(members []*member) {
	for _, m := range members {
		m.turn <- false
	}
}

// uncancelled runs a shared transaction's statements to their end whatever
// the caller's ctx: on SQLite an interrupted write would roll back the
// whole transaction, with the other calls' writes.
type uncancelled struct{ t sqlTx }

func (u uncancelled) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	return u.t.Exec(context.WithoutCancel(ctx), query, args...)
}

func (u uncancelled) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	return u.t.Query(context.WithoutCancel(ctx), query, args...)
}

func (u uncancelled) QueryRow(ctx context.Context, query string, args ...any) Row {
	return u.t.QueryRow(context.WithoutCancel(ctx), query, args...)
}

func (u uncancelled) Dialect() Dialect { return u.t.d }

// groupState is the DB's group commit state (SQLite).
type groupState struct {
	groupMu sync.Mutex
	forming *group // the group new calls join, if any
}
