package timer

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// Run fires due timers until ctx ends, then returns nil once every goroutine
// it started has ended. It returns an error only if the scheduler is
// already running. Failures while running (the database down, a handler
// failing) are retried and logged, never returned.
//
// Timers into the outbox and local handlers fire in batches of up to
// Config.BatchSize, each batch one transaction that applies the timers'
// effects and deletes them; due timers go first, in due order, so after
// downtime the overdue ones fire at once, oldest first. HTTP tasks run
// alongside, up to Config.HTTPConcurrency calls at a time.
func (s *Scheduler) Run(ctx context.Context) error {
	if !s.running.TryLock() {
		return ErrRunning
	}
	defer s.running.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() { s.httpLoop(ctx) })
	for range s.cfg.FireConcurrency - 1 {
		wg.Go(func() { s.fireLoop(ctx) })
	}
	s.fireLoop(ctx)
	cancel()
	wg.Wait()
	s.cfg.HTTPClient.CloseIdleConnections()
	return nil
}

// idleWait is how long a loop waits when due timers exist but another
// scheduler holds them all: a short pause, not a spin, not a poll interval.
const idleWait = 20 * time.Millisecond

// fireLoop runs rounds of firing, waiting between them for the next due
// timer, a wake, the poll interval, or a backoff after a failure.
func (s *Scheduler) fireLoop(ctx context.Context) {
	clock := s.cfg.Clock
	failures := 0
	for ctx.Err() == nil {
		now := clock.Now()
		fired, full, err := s.fireDue(ctx, now)
		if err != nil {
			failures++
			s.backOff(ctx, "firing round", err, failures)
			continue
		}
		failures = 0
		if len(fired) > 0 && s.cfg.OnFired != nil {
			s.cfg.OnFired(fired)
		}
		if full {
			continue
		}
		tick, idle, again := s.planWait(ctx, false, now, len(fired) > 0)
		if again {
			continue
		}
		select {
		case <-ctx.Done():
		case <-s.wake:
		case <-tick:
		case <-idle:
		}
	}
}

// loopBackoff is the wait after n failed rounds in a row: 100 ms doubling to
// 10 s.
func loopBackoff(n int) time.Duration {
	d := 100 * time.Millisecond
	for i := 1; i < n && d < 10*time.Second; i++ {
		d *= 2
	}
	return min(d, 10*time.Second)
}

// backOff logs a loop's failed round (the n-th in a row) and waits
// loopBackoff(n) in real time: the database recovers on its own schedule,
// not the injected clock's.
func (s *Scheduler) backOff(ctx context.Context, what string, err error, n int) {
	if ctx.Err() != nil {
		return
	}
	d := loopBackoff(n)
	s.log.Warn("timer: "+what+" failed; backing off", "err", err, "failures", n, "backoff", d)
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// planWait decides how a loop waits after a round that looked at the
// timers due at now (HTTP tasks, or the in-transaction kinds): until the
// next due time or PollInterval on the injected clock (tick), or briefly in
// real time when due timers are held by another scheduler's transaction
// (idle), whose work, not the passing of time, frees them. again means go
// round at once: something fell due meanwhile, or the round made progress
// with more due, or a clock that moved between the reading and After (a
// test's fake clock) has already passed the wait.
func (s *Scheduler) planWait(ctx context.Context, http bool, now time.Time, progressed bool) (tick, idle <-chan time.Time, again bool) {
	clock := s.cfg.Clock
	wait := s.cfg.PollInterval
	next, ok, err := s.nextDue(ctx, http)
	from := clock.Now()
	switch {
	case err != nil:
		if ctx.Err() == nil {
			s.log.Warn("timer: reading the next due time failed", "err", err, "http", http)
		}
	case ok && !next.After(now):
		// Due when the round began, yet not taken by it: scheduled
		// meanwhile (progressed rounds go again), or held elsewhere.
		if progressed {
			return nil, nil, true
		}
		return nil, time.After(idleWait), false
	case ok:
		wait = min(wait, next.Sub(from))
	}
	if wait <= 0 {
		return nil, nil, true // it fell due after the round looked
	}
	tick = clock.After(wait)
	if clock.Now().Sub(from) >= wait {
		return nil, nil, true
	}
	return tick, nil, false
}

// nextDue returns the due time of the earliest pending timer this scheduler
// can fire: of the in-transaction kinds (http false) or of HTTP tasks.
func (s *Scheduler) nextDue(ctx context.Context, http bool) (time.Time, bool, error) {
	var (
		q    string
		args []any
	)
	if http {
		q = `SELECT due_at FROM troupe_timers WHERE failed_at IS NULL AND kind = 3 ORDER BY due_at, id LIMIT 1`
	} else {
		var filter string
		filter, args = s.kindFilter(1)
		q = `SELECT due_at FROM troupe_timers WHERE failed_at IS NULL AND kind < 3 AND ` + filter + ` ORDER BY due_at, id LIMIT 1`
	}
	var due time.Time
	err := s.db.QueryRow(ctx, q, args...).Scan(&due)
	if errors.Is(err, sqldb.ErrNoRows) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, fmt.Errorf("timer: next due time: %w", err)
	}
	return due, true, nil
}

// kindFilter returns the condition that picks the timers this scheduler can
// fire in a transaction: every topic timer, and handler timers whose handler
// it has. Its placeholders start at $first.
func (s *Scheduler) kindFilter(first int) (string, []any) {
	names := s.handlerNames()
	if len(names) == 0 {
		return "kind = 1", nil
	}
	if s.db.Dialect() == sqldb.Postgres {
		return "(kind = 1 OR target = ANY($" + strconv.Itoa(first) + "))", []any{names}
	}
	args := make([]any, len(names))
	for i, n := range names {
		args[i] = n
	}
	return "(kind = 1 OR target IN (" + sqldb.List(first, len(names)) + "))", args
}

// dueRow is a timer read for firing.
type dueRow struct {
	id       string
	kind     Kind
	target   string
	due      time.Time
	payload  []byte
	schedule string
	attempts int
}

// fireDue fires one batch of the timers due at now in one transaction. full
// reports a batch of BatchSize rows: more may be due.
func (s *Scheduler) fireDue(ctx context.Context, now time.Time) (fired []Fired, full bool, err error) {
	fired, full, err = s.fireBatch(ctx, now, nil, s.cfg.BatchSize)
	if hf := (*handlerFailure)(nil); errors.As(err, &hf) {
		// The batch rolled back whole. Fire it again with a savepoint
		// around each handler, recording hf's failure without calling its
		// handler a second time for the same attempt — unless the failure
		// was a write an earlier handler queued (sqldb.ExecLater), which
		// hf's statement only sent: then every handler runs again, and the
		// savepoints tell whose it was.
		var later *sqldb.LaterError
		if errors.As(hf.err, &later) {
			hf = &handlerFailure{}
		}
		fired, full, err = s.fireBatch(ctx, now, hf, s.cfg.BatchSize)
	}
	if cf := (*commitFailure)(nil); errors.As(err, &cf) && ctx.Err() == nil {
		// Applied, yet not committed: fire the oldest timer alone, and
		// charge it an attempt if it cannot commit either.
		if _, _, err1 := s.fireBatch(ctx, now, nil, 1); errors.As(err1, &cf) {
			return nil, false, s.chargeAttempt(ctx, now, cf.first, cf.err)
		}
		return nil, true, nil
	}
	return fired, full, err
}

// handlerFailure ends a batch fired without savepoints: the handler of
// timer id failed with err.
type handlerFailure struct {
	id  string
	err error
}

func (e *handlerFailure) Error() string {
	return fmt.Sprintf("handler of timer %q failed: %v", e.id, e.err)
}

// fireBatch fires one batch in one transaction. With failed nil, handlers
// run without savepoints (the common case costs no subtransaction), and the
// first failure ends the transaction with a *handlerFailure. With failed
// set, each handler runs under a savepoint, and failed's timer is recorded
// as failed without being run.
func (s *Scheduler) fireBatch(ctx context.Context, now time.Time, failed *handlerFailure, limit int) (fired []Fired, full bool, err error) {
	now = now.UTC()
	var applied []dueRow
	err = s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		fired, full = nil, false
		pg := tx.Dialect() == sqldb.Postgres
		if pg {
			// The transaction holds the batch's row locks: it is the lease.
			// If it sits idle for LeaseTTL (its process hung or cut off), the
			// server ends it and the timers are free for another scheduler.
			ms := strconv.FormatInt(s.cfg.LeaseTTL.Milliseconds(), 10)
			if _, err := tx.Exec(ctx, "SET LOCAL idle_in_transaction_session_timeout = "+ms); err != nil {
				return fmt.Errorf("set the lease: %w", err)
			}
		}
		rows, err := s.claimDue(ctx, tx, now, limit)
		if err != nil {
			return err
		}
		full = len(rows) == limit
		if len(rows) == 0 {
			return nil
		}
		fired, err = s.apply(ctx, tx, now, rows, failed)
		if err == nil {
			applied = rows
		}
		return err
	})
	if err != nil && len(applied) > 0 {
		return nil, false, &commitFailure{first: applied[0], err: err}
	}
	if err != nil {
		return nil, false, err
	}
	at := s.cfg.Clock.Now()
	for i := range fired {
		fired[i].At = at
	}
	return fired, full, nil
}

// claimDue reads and locks the batch: due timers of the in-transaction
// kinds, oldest first, skipping those another scheduler holds.
func (s *Scheduler) claimDue(ctx context.Context, tx sqldb.Tx, now time.Time, limit int) ([]dueRow, error) {
	filter, fargs := s.kindFilter(3)
	q := `SELECT id, kind, target, due_at, payload, schedule, attempts FROM troupe_timers
		WHERE failed_at IS NULL AND kind < 3 AND due_at <= $1 AND ` + filter + `
		ORDER BY due_at, id LIMIT $2`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE SKIP LOCKED`
	}
	return readDue(ctx, tx, q, append([]any{now, limit}, fargs...)...)
}

// readDue runs q, which selects due timers' columns in dueRow's order.
func readDue(ctx context.Context, tx sqldb.Tx, q string, args ...any) ([]dueRow, error) {
	rs, err := tx.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("read due timers: %w", err)
	}
	var rows []dueRow
	for rs.Next() {
		var r dueRow
		var kind int
		if err := rs.Scan(&r.id, &kind, &r.target, &r.due, &r.payload, &r.schedule, &r.attempts); err != nil {
			rs.Close()
			return nil, fmt.Errorf("read due timers: %w", err)
		}
		r.kind = Kind(kind)
		rows = append(rows, r)
	}
	if err := rs.Close(); err != nil {
		return nil, fmt.Errorf("read due timers: %w", err)
	}
	return rows, nil
}

// apply fires rows in tx: topic timers into the outbox, handler timers
// through their handlers, then deletes what fired,
// records what failed, and inserts the next occurrence of recurring
// schedules.
func (s *Scheduler) apply(ctx context.Context, tx sqldb.Tx, now time.Time, rows []dueRow, known *handlerFailure) ([]Fired, error) {
	var (
		fired   []Fired
		done    []string // ids to delete
		topics  []string // topics in first-seen order
		byTopic = map[string][]*message.Message{}
		failed  []failure // handler failures and undecodable rows
	)
	occurrences := make([]dueRow, 0)
	for _, r := range rows {
		if r.schedule != "" {
			occurrences = append(occurrences, r)
		}
	}
	// A recurring schedule may skip its occurrence (MissedSkip); the rest
	// fire. The next occurrences are planned before firing so that a
	// schedule deleted meanwhile fires nothing more.
	skip, err := s.planNext(ctx, tx, now, occurrences)
	if err != nil {
		return nil, err
	}
	for _, r := range rows {
		if skip[r.id] {
			done = append(done, r.id)
			continue
		}
		m, err := message.DecodeJSON(r.payload)
		if err != nil {
			failed = append(failed, failure{row: r, err: Permanent(fmt.Errorf("stored message cannot be decoded: %w", err))})
			continue
		}
		f := Fired{ID: r.id, Kind: r.kind, Target: r.target, Due: r.due, Attempt: r.attempts + 1, Schedule: r.schedule, Msg: m}
		switch r.kind {
		case KindTopic:
			if _, ok := byTopic[r.target]; !ok {
				topics = append(topics, r.target)
			}
			byTopic[r.target] = append(byTopic[r.target], m)
			fired = append(fired, f)
			done = append(done, r.id)
		case KindHandler:
			h := s.handler(r.target)
			if h == nil { // unregistered since the batch was read
				continue
			}
			if known == nil {
				if err := s.call(message.WithCause(ctx, m), tx, h, &f); err != nil {
					return nil, &handlerFailure{id: r.id, err: err}
				}
				fired = append(fired, f)
				done = append(done, r.id)
				continue
			}
			if r.id == known.id {
				failed = append(failed, failure{row: r, err: known.err})
				continue
			}
			if _, err := tx.Exec(ctx, "SAVEPOINT troupe_timer"); err != nil {
				return nil, fmt.Errorf("savepoint: %w", err)
			}
			herr := s.call(message.WithCause(ctx, m), tx, h, &f)
			if herr != nil {
				if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_timer"); err != nil {
					return nil, fmt.Errorf("roll back handler %q of timer %q: %w", r.target, r.id, err)
				}
				failed = append(failed, failure{row: r, err: herr})
				continue
			}
			if _, err := tx.Exec(ctx, "RELEASE SAVEPOINT troupe_timer"); err != nil {
				var later *sqldb.LaterError
				if !errors.As(err, &later) {
					return nil, fmt.Errorf("release savepoint: %w", err)
				}
				// A write the handler queued failed when the release sent
				// it: the handler failed.
				if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_timer"); err != nil {
					return nil, fmt.Errorf("roll back handler %q of timer %q: %w", r.target, r.id, err)
				}
				failed = append(failed, failure{row: r, err: err})
				continue
			}
			fired = append(fired, f)
			done = append(done, r.id)
		}
	}
	for _, topic := range topics {
		if err := outbox.Add(ctx, tx, topic, byTopic[topic]...); err != nil {
			return nil, fmt.Errorf("fire into the outbox: %w", err)
		}
	}
	if err := deleteIDs(ctx, tx, done); err != nil {
		return nil, err
	}
	for _, f := range failed {
		if err := s.recordFailure(ctx, tx, now, f.row, f.err, s.cfg.MaxAttempts); err != nil {
			return nil, err
		}
	}
	return fired, nil
}

// failure is a timer whose firing failed in this round.
type failure struct {
	row dueRow
	err error
}

// recordFailure counts the failed attempt of r and either sets it to retry
// after the backoff or, when err is permanent or the attempts are spent,
// marks it failed for an operator.
func (s *Scheduler) recordFailure(ctx context.Context, tx sqldb.Tx, now time.Time, r dueRow, ferr error, maxAttempts int) error {
	attempt := r.attempts + 1
	reason := ferr.Error()
	if errors.Is(ferr, ErrPermanent) || attempt >= maxAttempts {
		s.log.Error("timer: failed; kept for an operator", "id", r.id, "kind", r.kind, "target", r.target, "attempts", attempt, "err", ferr)
		_, err := tx.Exec(ctx, `UPDATE troupe_timers SET attempts = $1, last_error = $2, failed_at = $3 WHERE id = $4`, attempt, reason, now, r.id)
		if err != nil {
			return fmt.Errorf("mark timer %q failed: %w", r.id, err)
		}
		return nil
	}
	retryAt := now.Add(s.cfg.Backoff(attempt))
	s.log.Warn("timer: attempt failed; will retry", "id", r.id, "kind", r.kind, "target", r.target, "attempt", attempt, "retry_at", retryAt, "err", ferr)
	_, err := tx.Exec(ctx, `UPDATE troupe_timers SET attempts = $1, last_error = $2, due_at = $3 WHERE id = $4`, attempt, reason, retryAt, r.id)
	if err != nil {
		return fmt.Errorf("reschedule failed timer %q: %w", r.id, err)
	}
	return nil
}

// deleteIDs deletes the timers with these ids.
func deleteIDs(ctx context.Context, tx sqldb.Tx, ids []string) error {
	if tx.Dialect() == sqldb.Postgres {
		if _, err := tx.Exec(ctx, `DELETE FROM troupe_timers WHERE id = ANY($1)`, ids); err != nil {
			return fmt.Errorf("delete %d fired timers: %w", len(ids), err)
		}
		return nil
	}
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(ids), 500) {
		args := make([]any, 0, hi-lo)
		for _, id := range ids[lo:hi] {
			args = append(args, id)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM troupe_timers WHERE id IN (`+sqldb.List(1, hi-lo)+`)`, args...); err != nil {
			return fmt.Errorf("delete %d fired timers: %w", hi-lo, err)
		}
	}
	return nil
}

// commitFailure ends a batch whose effects were applied but did not commit.
type commitFailure struct {
	first dueRow
	err   error
}

func (e *commitFailure) Error() string { return "commit fired timers: " + e.err.Error() }
func (e *commitFailure) Unwrap() error { return e.err }

// chargeAttempt records a failed attempt of r, which could not commit.
func (s *Scheduler) chargeAttempt(ctx context.Context, now time.Time, r dueRow, cause error) error {
	return s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var attempts int
		err := tx.QueryRow(ctx, `SELECT attempts FROM troupe_timers WHERE id = $1 AND failed_at IS NULL`, r.id).Scan(&attempts)
		if errors.Is(err, sqldb.ErrNoRows) || (err == nil && attempts != r.attempts) {
			return nil // fired or charged meanwhile
		}
		if err != nil {
			return err
		}
		return s.recordFailure(ctx, tx, now.UTC(), r, cause, s.cfg.MaxAttempts)
	})
}
