package outbox

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"
)

// markTimeout bounds one mark. The last mark goes on when the relay is
// stopped: its rows were published, and marking them spares the next relay
// publishing them again.
const markTimeout = 10 * time.Second

// marker marks a relay's published rows delivered on its own goroutine, so
// that a round need not wait for it: on SQLite a mark waits for the write
// lock, often behind the very transactions adding the next messages, and
// the next round's read and publish have no reason to wait with it. Rows
// published and not yet marked are left out of the relay's reads, so they
// are not published again; a mark that fails is retried with backoff, and
// once maxUnmarked rows wait, the relay stops publishing until the
// database takes the marks.
type marker struct {
	r    *Relay
	wake chan struct{}
	quit chan struct{}

	mu       sync.Mutex
	queued   []int64 // published, not yet being marked
	marking  []int64 // being marked
	failures int     // marks failed in a row
	lastErr  error   // of the last failed mark
}

func newMarker(r *Relay) *marker {
	return &marker{r: r, wake: make(chan struct{}, 1), quit: make(chan struct{})}
}

// maxUnmarked is how many published rows may wait for their mark before
// the relay stops publishing.
func (m *marker) maxUnmarked() int { return 4 * m.r.cfg.BatchSize }

// add queues seqs, just published, for marking.
func (m *marker) add(seqs []int64) {
	if len(seqs) == 0 {
		return
	}
	m.mu.Lock()
	m.queued = append(m.queued, seqs...)
	m.mu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// pending returns the rows published and not yet marked, for the next read
// to leave out, or check's error.
func (m *marker) pending() ([]int64, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return append(slices.Clone(m.marking), m.queued...), nil
}

// check returns an error when the relay should publish no more: too many
// published rows wait for their mark because marks fail.
func (m *marker) check() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := len(m.queued) + len(m.marking)
	if m.failures > 0 && n >= m.maxUnmarked() {
		return fmt.Errorf("outbox: %d published rows wait to be marked delivered: %w", n, m.lastErr)
	}
	return nil
}

// stop ends run after a last mark of what is queued.
func (m *marker) stop() { close(m.quit) }

// run marks queued rows, all those queued at a time in one transaction, until
// stop; then it tries once more to mark what is left.
func (m *marker) run(ctx context.Context) {
	var retry <-chan time.Time
	for {
		select {
		case <-m.wake:
		case <-retry:
		case <-m.quit:
			if err := m.markQueued(context.WithoutCancel(ctx)); err != nil {
				m.r.log.Warn("outbox relay: published rows not marked delivered at stop; the next relay publishes them again",
					"rows", m.unmarked(), "err", err)
			}
			return
		}
		retry = nil
		if err := m.markQueued(ctx); err != nil {
			m.mu.Lock()
			m.failures++
			b := m.r.backoff(m.failures)
			m.mu.Unlock()
			if ctx.Err() == nil {
				m.r.log.Warn("outbox relay: marking published rows delivered failed; retrying", "rows", m.unmarked(), "err", err, "backoff", b)
			}
			retry = m.r.cfg.Clock.After(b)
		}
	}
}

// markQueued marks every queued row delivered in one transaction. On failure
// the rows stay queued.
func (m *marker) markQueued(ctx context.Context) error {
	m.mu.Lock()
	m.marking, m.queued = m.queued, nil
	seqs := m.marking
	m.mu.Unlock()
	if len(seqs) == 0 {
		return nil
	}
	mctx, cancel := context.WithTimeout(ctx, markTimeout)
	defer cancel()
	err := MarkDelivered(mctx, m.r.db, m.r.cfg.Clock.Now(), seqs...)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.marking = nil
	if err != nil {
		m.queued = append(seqs, m.queued...)
		m.lastErr = err
		return err
	}
	m.failures, m.lastErr = 0, nil
	return nil
}

func (m *marker) unmarked() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.queued) + len(m.marking)
}
