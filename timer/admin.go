package timer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

// FailedTimer is a timer that gave up: its handler or HTTP call failed
// permanently or ran out of attempts. It is kept until an operator retries
// (RetryTx) or deletes (CancelTx) it.
type FailedTimer struct {
	// ID is the timer's id.
	ID string
	// Kind and Target say where it was going.
	Kind Kind
	// Target is the topic or handler name ("" for HTTP).
	Target string
	// Schedule names the recurring schedule that made it, or "".
	Schedule string
	// Attempts counts its tries.
	Attempts int
	// LastError is the reason of its last failure.
	LastError string
	// FailedAt is when it gave up.
	FailedAt time.Time
}

// Failed lists up to limit failed timers, most recent first.
func (s *Scheduler) Failed(ctx context.Context, limit int) ([]FailedTimer, error) {
	rs, err := s.db.Query(ctx, `SELECT id, kind, target, schedule, attempts, last_error, failed_at FROM troupe_timers
		WHERE failed_at IS NOT NULL ORDER BY failed_at DESC, id LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("timer: list failed timers: %w", err)
	}
	var out []FailedTimer
	for rs.Next() {
		var f FailedTimer
		var kind int
		if err := rs.Scan(&f.ID, &kind, &f.Target, &f.Schedule, &f.Attempts, &f.LastError, &f.FailedAt); err != nil {
			rs.Close()
			return nil, fmt.Errorf("timer: list failed timers: %w", err)
		}
		f.Kind, f.FailedAt = Kind(kind), f.FailedAt.UTC()
		out = append(out, f)
	}
	if err := rs.Close(); err != nil {
		return nil, fmt.Errorf("timer: list failed timers: %w", err)
	}
	return out, nil
}

// RetryTx puts a failed timer back to fire now, with its attempts counted
// from zero again, and reports whether there was such a failed timer.
func (s *Scheduler) RetryTx(ctx context.Context, tx sqldb.Tx, id string) (bool, error) {
	n, err := tx.Exec(ctx, `UPDATE troupe_timers SET failed_at = NULL, attempts = 0, due_at = $1 WHERE id = $2 AND failed_at IS NOT NULL`,
		s.cfg.Clock.Now().UTC(), id)
	if err != nil {
		return false, fmt.Errorf("timer: retry %q: %w", id, err)
	}
	return n == 1, nil
}

// Retry is RetryTx in a transaction of its own; it wakes the scheduler.
func (s *Scheduler) Retry(ctx context.Context, id string) (bool, error) {
	var ok bool
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		ok, err = s.RetryTx(ctx, tx, id)
		return err
	})
	if ok && err == nil {
		s.Notify()
	}
	return ok, err
}

// Stats counts the timers in the database.
type Stats struct {
	// Pending counts timers not yet fired (HTTP tasks under way included).
	Pending int64
	// Due counts pending timers whose due time has passed: fired soon, or
	// held up (no scheduler running, or none with their handler).
	Due int64
	// Failed counts failed timers kept for an operator.
	Failed int64
	// OldestDue is the due time of the oldest due timer (zero if none):
	// how far behind the schedulers are.
	OldestDue time.Time
}

// Stats reads the counts. Pending counts every row, which on PostgreSQL
// reads the whole pending index: call it for a dashboard, not in a loop.
func (s *Scheduler) Stats(ctx context.Context) (Stats, error) {
	now := s.cfg.Clock.Now().UTC()
	var st Stats
	err := s.db.QueryRow(ctx, `SELECT
		(SELECT count(*) FROM troupe_timers WHERE failed_at IS NULL),
		(SELECT count(*) FROM troupe_timers WHERE failed_at IS NULL AND due_at <= $1),
		(SELECT count(*) FROM troupe_timers WHERE failed_at IS NOT NULL)`, now).Scan(&st.Pending, &st.Due, &st.Failed)
	if err != nil {
		return Stats{}, fmt.Errorf("timer: stats: %w", err)
	}
	var oldest time.Time
	err = s.db.QueryRow(ctx, `SELECT due_at FROM troupe_timers WHERE failed_at IS NULL AND due_at <= $1 ORDER BY due_at LIMIT 1`, now).Scan(&oldest)
	switch {
	case errors.Is(err, sqldb.ErrNoRows):
	case err != nil:
		return Stats{}, fmt.Errorf("timer: stats: %w", err)
	default:
		st.OldestDue = oldest.UTC()
	}
	return st, nil
}
