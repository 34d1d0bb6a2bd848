package outbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// ErrRunning is returned by Run on a relay that is already running.
var ErrRunning = errors.New("outbox: relay already running")

// notifyChannel is the channel the outbox's trigger NOTIFYs.
const notifyChannel = "troupe_outbox"

// epoch is the expiry of a lease that nobody holds.
var epoch = time.Unix(0, 0).UTC()

// A Relay publishes committed outbox rows to a broker and marks them
// delivered. See the package documentation for its guarantees.
type Relay struct {
	db   *sqldb.DB
	pub  broker.Publisher
	cfg  RelayConfig
	log  *slog.Logger
	wake chan struct{}

	running sync.Mutex

	mu         sync.Mutex
	owned      []int     // partitions held, sorted
	leaseUntil time.Time // when the leases on owned expire

	marks *marker // marks published rows delivered, apart from the rounds

	// published is, per partition, the highest seq the relay published (on
	// SQLite; see read). Used by the loop's goroutine only.
	published map[int]int64

	// reader is the connection the relay reads pending rows through on
	// PostgreSQL (see read), nil until the first read or after it failed.
	// Used by the loop's goroutine only.
	reader *pgx.Conn
}

// NewRelay returns a relay that publishes db's outbox to pub. The outbox's
// tables must exist (Migrate). Start it with Run.
func NewRelay(db *sqldb.DB, pub broker.Publisher, cfg RelayConfig) (*Relay, error) {
	if db == nil || pub == nil {
		return nil, fmt.Errorf("%w: NewRelay needs a database and a publisher", ErrInvalidConfig)
	}
	cfg = cfg.withDefaults(db.Dialect() == sqldb.Postgres)
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Relay{db: db, pub: pub, cfg: cfg, log: cfg.Logger.With("relay", cfg.Owner), wake: make(chan struct{}, 1), published: map[int]int64{}}, nil
}

// Notify wakes the relay: it reads the outbox at once instead of waiting for
// its next poll. Call it after committing a transaction that added messages,
// in the process the relay runs in. It never blocks.
func (r *Relay) Notify() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Owner returns the relay's name in the lease table.
func (r *Relay) Owner() string { return r.cfg.Owner }

// OwnedPartitions returns the partitions the relay held at its last lease
// renewal, sorted. It asks nothing of the database.
func (r *Relay) OwnedPartitions() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.owned)
}

// Run relays until ctx ends, then releases its leases (so another relay
// takes its partitions at once) and returns nil once every goroutine it
// started has ended. It returns an error only if the relay cannot start.
// Failures while running (database or broker down) are retried with
// backoff and logged, never returned.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.TryLock() {
		return ErrRunning
	}
	defer r.running.Unlock()

	if err := r.ensureLeaseRows(ctx); err != nil {
		if ctx.Err() != nil {
			return nil // stopped before it started: not a failure
		}
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
		r.release()
	}()
	if r.cfg.Mode == Notify && r.db.Dialect() == sqldb.Postgres {
		wg.Go(func() { r.listen(ctx) })
	}
	wg.Go(func() { r.retain(ctx) })
	marks := newMarker(r)
	r.marks = marks
	markerDone := make(chan struct{})
	go func() { defer close(markerDone); marks.run(ctx) }()
	r.loop(ctx)
	r.closeReader()
	marks.stop()
	<-markerDone
	return nil
}

// loop is the relay's main loop: lease upkeep, then rounds of publishing,
// waiting between them for a wake, the poll interval, or a backoff.
func (r *Relay) loop(ctx context.Context) {
	clock := r.cfg.Clock
	var nextLease, retryAt time.Time
	failures := 0
	for ctx.Err() == nil {
		if !clock.Now().Before(nextLease) {
			r.manageLeases(ctx)
			nextLease = clock.Now().Add(r.cfg.LeaseTTL / 3)
		}
		if failures == 0 || !clock.Now().Before(retryAt) {
			full, err := r.round(ctx)
			switch {
			case err != nil && ctx.Err() == nil:
				failures++
				b := r.backoff(failures)
				retryAt = clock.Now().Add(b)
				r.log.Warn("outbox relay round failed; backing off", "err", err, "failures", failures, "backoff", b)
			case err == nil:
				failures = 0
				if full {
					continue
				}
			}
		}
		now := clock.Now()
		wait, wake := r.cfg.PollInterval, r.wake
		if failures > 0 {
			// A wake must not cut a backoff short; lease upkeep goes on.
			wait, wake = retryAt.Sub(now), nil
		}
		wait = max(min(wait, nextLease.Sub(now)), 0)
		select {
		case <-ctx.Done():
		case <-wake:
		case <-clock.After(wait):
		}
	}
}

// backoff returns the wait after the n-th failure in a row.
func (r *Relay) backoff(n int) time.Duration {
	d := r.cfg.MinBackoff
	for i := 1; i < n && d < r.cfg.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, r.cfg.MaxBackoff)
}

// held returns the partitions the relay may publish now and how long its
// leases on them last.
func (r *Relay) held() ([]int, time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	left := r.leaseUntil.Sub(r.cfg.Clock.Now())
	// Stop a tenth of the lease early, so a publish bounded by the lease
	// ends before another relay may take over.
	if left <= r.cfg.LeaseTTL/10 {
		return nil, 0
	}
	return r.owned, left - r.cfg.LeaseTTL/10
}

// pending is one row read for publishing.
type pending struct {
	Row
	msg *message.Message
	err error // publishing it failed
}

// round publishes one batch of every held partition's pending rows and
// marks the published ones delivered. full reports that some partition had
// more rows than the batch took.
func (r *Relay) round(ctx context.Context) (full bool, err error) {
	pg := r.db.Dialect() == sqldb.Postgres
	var skip []int64
	if pg {
		if skip, err = r.marks.pending(); err != nil {
			return false, err
		}
	} else if err := r.marks.check(); err != nil {
		return false, err
	}
	parts, left := r.held()
	if len(parts) == 0 {
		return false, nil
	}
	rows, full, err := r.read(ctx, parts, skip)
	if err != nil || len(rows) == 0 {
		return false, err
	}

	pctx, cancel := context.WithTimeout(ctx, left)
	defer cancel()
	// One Publish per topic, messages in seq order. A row that cannot be
	// decoded is not published, and neither are the rows behind it in its
	// partition: they would overtake it.
	var topics []string
	byTopic := map[string][]int{}
	undecodable := map[int]int64{} // partition -> seq of its first undecodable row
	for i := range rows {
		p := &rows[i]
		if s, ok := undecodable[p.Partition]; ok {
			p.err = fmt.Errorf("held back behind row seq %d of its partition: %w", s, broker.ErrNotSent)
			continue
		}
		if p.msg, p.err = DecodeEnvelope(p.Envelope); p.err != nil {
			undecodable[p.Partition] = p.Seq
			continue
		}
		if _, ok := byTopic[p.Topic]; !ok {
			topics = append(topics, p.Topic)
		}
		byTopic[p.Topic] = append(byTopic[p.Topic], i)
	}
	for _, topic := range topics {
		idx := byTopic[topic]
		msgs := make([]*message.Message, len(idx))
		for j, i := range idx {
			msgs[j] = rows[i].msg
		}
		perr := r.pub.Publish(pctx, topic, msgs...)
		if perr == nil {
			continue
		}
		var pe *broker.PublishError
		if errors.As(perr, &pe) {
			for j, e := range pe.Failed {
				if j >= 0 && j < len(idx) {
					rows[idx[j]].err = e
				}
			}
		} else {
			for _, i := range idx {
				rows[i].err = perr
			}
		}
	}

	// A partition's rows count as delivered up to its first failure only:
	// the rows behind it go again, after it, to keep their order.
	blockedFrom := map[int]int64{}
	var firstErr error
	failed := 0
	for _, p := range rows { // in seq order
		if p.err == nil {
			continue
		}
		failed++
		if firstErr == nil {
			firstErr = fmt.Errorf("publish row seq %d (id %s, topic %q): %w", p.Seq, p.ID, p.Topic, p.err)
		}
		if _, ok := blockedFrom[p.Partition]; !ok {
			blockedFrom[p.Partition] = p.Seq
			// The row that holds its partition back: an operator who sees
			// it fail round after round (a message the broker can never
			// take) deletes or fixes it by seq.
			r.log.Warn("outbox relay: row not published; the later rows of its partition wait for it",
				"seq", p.Seq, "id", p.ID, "topic", p.Topic, "subject", p.Subject, "partition", p.Partition, "err", p.err)
		}
	}
	done := make([]int64, 0, len(rows))
	for _, p := range rows {
		if s, blocked := blockedFrom[p.Partition]; p.err == nil && (!blocked || p.Seq < s) {
			done = append(done, p.Seq)
			if !pg {
				r.published[p.Partition] = max(r.published[p.Partition], p.Seq)
			}
		}
	}
	r.marks.add(done)
	if firstErr != nil {
		return false, fmt.Errorf("outbox: %d of %d messages not published: %w", failed, len(rows), firstErr)
	}
	return full, nil
}

// read returns up to BatchSize pending rows of each of parts, in seq order,
// leaving out the rows published and not yet marked delivered (skip).
//
// On PostgreSQL they are left out by seq. On SQLite, whose transactions
// commit one at a time, seqs commit in order, so the rows a relay published
// in a partition are exactly its pending rows up to the highest seq it
// published there (a row that failed, and the rows behind it, are not
// published), and a bound per partition leaves them out more cheaply.
func (r *Relay) read(ctx context.Context, parts []int, skip []int64) ([]pending, bool, error) {
	pg := r.db.Dialect() == sqldb.Postgres
	var args []any
	if pg {
		if skip == nil {
			skip = []int64{}
		}
		args = append(args, skip)
	}
	var q strings.Builder
	for i, p := range parts {
		if i > 0 {
			q.WriteString(" UNION ALL ")
		}
		ps := strconv.Itoa(p)
		q.WriteString("SELECT seq, id, topic, subject, partition, envelope FROM (SELECT seq, id, topic, subject, partition, envelope FROM troupe_outbox WHERE partition = ")
		q.WriteString(ps)
		q.WriteString(" AND delivered_at IS NULL")
		if pg {
			q.WriteString(" AND seq <> ALL($1::bigint[])")
		} else {
			args = append(args, r.published[p])
			q.WriteString(" AND seq > $" + strconv.Itoa(len(args)))
		}
		q.WriteString(" ORDER BY seq LIMIT ")
		q.WriteString(strconv.Itoa(r.cfg.BatchSize))
		q.WriteString(") AS p")
		q.WriteString(ps)
	}
	var out []pending
	perPart := map[int]int{}
	scan := func(rows rowScanner) error {
		for rows.Next() {
			var p pending
			if err := rows.Scan(&p.Seq, &p.ID, &p.Topic, &p.Subject, &p.Partition, &p.Envelope); err != nil {
				return err
			}
			perPart[p.Partition]++
			out = append(out, p)
		}
		return nil
	}
	var err error
	if pg {
		err = r.readPostgres(ctx, q.String(), args, scan)
	} else {
		// Not in a transaction: on SQLite it would take the write lock,
		// which the writers need. (A DB runs the Tx methods outside any.)
		var rows sqldb.Rows
		if rows, err = r.db.Query(ctx, q.String(), args...); err == nil {
			err = errors.Join(scan(rows), rows.Close())
		}
	}
	if err != nil {
		return nil, false, fmt.Errorf("outbox: read pending rows: %w", err)
	}
	slices.SortFunc(out, func(a, b pending) int { return cmp.Compare(a.Seq, b.Seq) })
	full := false
	for _, n := range perPart {
		if n >= r.cfg.BatchSize {
			full = true
		}
	}
	return out, full, nil
}

// readPostgres runs the pending rows' query q through the relay's reader
// connection, connecting it first if needed, and hands its rows to scan.
//
// The reader walks each partition's pending index in seq order and stops at
// the limit: its session has bitmap and sequential scans turned off.
// Without that, a planner working from stale statistics (a table that just
// grew a backlog) picks a bitmap scan that reads and sorts the partition's
// whole backlog every round. A connection of its own keeps those settings
// out of the pool, and lets a read be one statement, not a transaction of
// four. A reader whose read failed is closed; the next read connects anew.
func (r *Relay) readPostgres(ctx context.Context, q string, args []any, scan func(rowScanner) error) error {
	if r.reader == nil {
		cfg := r.db.Pool().Config().ConnConfig.Copy()
		if cfg.RuntimeParams == nil {
			cfg.RuntimeParams = map[string]string{}
		}
		cfg.RuntimeParams["enable_bitmapscan"] = "off"
		cfg.RuntimeParams["enable_seqscan"] = "off"
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return err
		}
		r.reader = conn
	}
	rows, err := r.reader.Query(ctx, q, args...)
	if err == nil {
		err = scan(rows)
		rows.Close()
		err = errors.Join(err, rows.Err())
	}
	if err != nil {
		r.closeReader()
	}
	return err
}

// rowScanner is what read needs of the rows of pgx and of sqldb.
type rowScanner interface {
	Next() bool
	Scan(...any) error
}

// closeReader closes the reader connection, if any.
func (r *Relay) closeReader() {
	if r.reader != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r.reader.Close(ctx)
		r.reader = nil
	}
}

// listen holds a connection LISTENing on the outbox channel and wakes the
// relay on each notification, reconnecting after failures.
func (r *Relay) listen(ctx context.Context) {
	failures := 0
	for ctx.Err() == nil {
		err := r.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		failures++
		wait := r.backoff(failures)
		r.log.Warn("outbox relay: LISTEN connection lost; polling until it is back", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
		case <-r.cfg.Clock.After(wait):
		}
	}
}

func (r *Relay) listenOnce(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, r.db.Pool().Config().ConnConfig.Copy())
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		return err
	}
	// Rows may have been committed while no one listened.
	r.Notify()
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return err
		}
		r.Notify()
	}
}

// retain deletes expired delivered rows every RetentionInterval.
func (r *Relay) retain(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.cfg.Clock.After(r.cfg.RetentionInterval):
		}
		before := r.cfg.Clock.Now().Add(-r.cfg.Retention)
		if _, err := DeleteDelivered(ctx, r.db, before, r.cfg.RetentionBatch); err != nil && ctx.Err() == nil {
			r.log.Warn("outbox relay: retention failed", "err", err)
		}
	}
}

// DeleteDelivered deletes the rows delivered before the given time, batch
// rows per statement (at least 1), and returns how many it deleted. Pending
// rows are never deleted.
func DeleteDelivered(ctx context.Context, db *sqldb.DB, before time.Time, batch int) (int64, error) {
	batch = max(batch, 1)
	q := "DELETE FROM troupe_outbox WHERE seq IN (SELECT seq FROM troupe_outbox WHERE delivered_at < $1 ORDER BY delivered_at LIMIT " + strconv.Itoa(batch) + ")"
	var total int64
	for {
		n, err := db.Exec(ctx, q, before.UTC())
		total += n
		if err != nil {
			return total, fmt.Errorf("outbox: delete delivered rows: %w", err)
		}
		if n < int64(batch) {
			return total, nil
		}
	}
}
