package walrelay

import (
	"context"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/troupedev/troupe/outbox"
)

// chunk is a run of rows of one transaction, queued from the WAL stream to the
// publisher. A transaction larger than a batch arrives in several chunks;
// only its last one carries endLSN.
type chunk struct {
	rows []row
	// endLSN, when set, is the end of the transaction this chunk completes:
	// once the chunk is published, the server may forget the WAL before it.
	endLSN pglogrepl.LSN
}

// pipe connects the goroutine that reads the replication connection (and
// alone uses it) with the one that publishes. The reader queues chunks and
// reports positions; the publisher takes batches and records acknowledged
// positions, interrupting the reader's wait so that the new position reaches
// the server at once.
type pipe struct {
	mu     sync.Mutex
	queue  []chunk
	queued int           // rows in queue
	acked  pglogrepl.LSN // end of the last transaction published
	// recvCancel interrupts the reader's ReceiveMessage; nil when the reader
	// is not receiving.
	recvCancel context.CancelFunc

	work chan struct{} // cap 1: the queue has chunks
	wake chan struct{} // cap 1: acked moved or the queue has room
}

func newPipe(start pglogrepl.LSN) *pipe {
	return &pipe{acked: start, work: make(chan struct{}, 1), wake: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// push queues c for the publisher.
func (p *pipe) push(c chunk) {
	p.mu.Lock()
	p.queue = append(p.queue, c)
	p.queued += len(c.rows)
	p.mu.Unlock()
	signal(p.work)
}

// state returns the rows queued and the acknowledged position.
func (p *pipe) state() (queued int, acked pglogrepl.LSN) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.queued, p.acked
}

// ack records that everything up to lsn is published and wakes the reader.
func (p *pipe) ack(lsn pglogrepl.LSN) {
	p.mu.Lock()
	if lsn > p.acked {
		p.acked = lsn
	}
	p.interruptLocked()
	p.mu.Unlock()
}

func (p *pipe) interruptLocked() {
	if p.recvCancel != nil {
		p.recvCancel()
		p.recvCancel = nil
	}
	signal(p.wake)
}

// armReceive registers cancel as the way to interrupt the reader's next
// receive. It returns false, and the reader should not block, when a wake is
// already pending.
func (p *pipe) armReceive(cancel context.CancelFunc) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.wake:
		return false
	default:
	}
	p.recvCancel = cancel
	return true
}

func (p *pipe) disarmReceive() {
	p.mu.Lock()
	p.recvCancel = nil
	p.mu.Unlock()
}

// take waits for queued chunks and returns up to max rows of them (at least
// one chunk), waiting up to linger for a batch to fill, with the last
// transaction end among them (zero if none ends there). ok is false when ctx
// ended.
func (p *pipe) take(ctx context.Context, clock outbox.Clock, max int, linger time.Duration) (rows []row, endLSN pglogrepl.LSN, ok bool) {
	for {
		p.mu.Lock()
		n := len(p.queue)
		p.mu.Unlock()
		if n > 0 {
			break
		}
		select {
		case <-p.work:
		case <-ctx.Done():
			return nil, 0, false
		}
	}
	if linger > 0 {
		timeout := clock.After(linger)
	fill:
		for {
			if q, _ := p.state(); q >= max {
				break
			}
			select {
			case <-p.work:
			case <-timeout:
				break fill
			case <-ctx.Done():
				return nil, 0, false
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	i := 0
	for i < len(p.queue) && (i == 0 || len(rows)+len(p.queue[i].rows) <= max) {
		rows = append(rows, p.queue[i].rows...)
		if p.queue[i].endLSN != 0 {
			endLSN = p.queue[i].endLSN
		}
		i++
	}
	p.queued -= len(rows)
	p.queue = p.queue[i:]
	if len(p.queue) > 0 {
		signal(p.work)
	}
	signal(p.wake) // a reader held back by a full queue may go on
	return rows, endLSN, true
}
