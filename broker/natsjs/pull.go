package natsjs

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// pull holds the messages of one pull request from their arrival until
// their settlement, and keeps them in progress at the server meanwhile.
//
// A message's AckWait runs from its delivery, not from its hand-over to the
// handler: while the handler works on a batch, both the batch and the
// messages of the same pull that arrived meanwhile would otherwise be
// redelivered to other members of the group once AckWait passes, and their
// attempt count would climb toward a dead letter although nothing failed.
// So a goroutine receives the pull's messages as they arrive and, every
// AckWait/3, tells the server that each message it holds is in progress,
// until the message is released just before its settlement. Buffered
// messages are handed to the handler as soon as it is free, so waiting for
// the whole pull is not needed and adds no latency.
//
// The goroutine stops keeping messages in progress when ctx (the
// subscription's run context) ends: a subscription given up on, by Close or
// by a Stop whose context ended, lets its messages go back to the group
// after AckWait even if its handler never returns.
type pull struct {
	log   *slog.Logger
	every time.Duration

	mu     sync.Mutex      // held while in-progress notices are sent, so that none follows a release
	queued []jetstream.Msg // arrived, not yet taken by next
	held   map[jetstream.Msg]struct{}
	ended  bool // the pull request is over: no more messages

	arrived chan struct{} // receives a token when queued grows or ended is set
	stop    chan struct{} // closed by close
	done    chan struct{} // closed when the goroutine has returned
}

// startPull starts holding msgs, the messages of one pull request, keeping
// them in progress every ackWait/3 while ctx lasts. Call close once next
// has reported the end of the pull.
func startPull(ctx context.Context, log *slog.Logger, msgs <-chan jetstream.Msg, ackWait time.Duration) *pull {
	p := &pull{
		log:     log,
		every:   max(ackWait/3, time.Millisecond),
		held:    make(map[jetstream.Msg]struct{}),
		arrived: make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	go p.run(ctx, msgs)
	return p
}

// run receives the pull's messages and sends the in-progress notices.
func (p *pull) run(ctx context.Context, msgs <-chan jetstream.Msg) {
	defer close(p.done)
	ticker := time.NewTicker(p.every)
	defer ticker.Stop()
	tick, ctxDone := ticker.C, ctx.Done()
	for {
		select {
		case m, ok := <-msgs:
			p.mu.Lock()
			if ok {
				p.queued = append(p.queued, m)
				p.held[m] = struct{}{}
			} else {
				p.ended, msgs = true, nil
			}
			p.mu.Unlock()
			select {
			case p.arrived <- struct{}{}:
			default: // a token is already waiting
			}
		case <-tick:
			p.keepInProgress()
		case <-ctxDone:
			tick, ctxDone = nil, nil
		case <-p.stop:
			return
		}
	}
}

// keepInProgress tells the server that every held message is in progress,
// which restarts its AckWait.
func (p *pull) keepInProgress() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for m := range p.held {
		if err := m.InProgress(); err != nil {
			p.log.Debug("natsjs: in-progress notice failed", "err", err)
		}
	}
}

// next waits for messages of the pull that have not been taken yet, and
// takes them all (a pull brings at most MaxBatch). It reports false once
// the pull has ended and every message has been taken.
func (p *pull) next() ([]jetstream.Msg, bool) {
	for {
		p.mu.Lock()
		got, ended := p.queued, p.ended
		p.queued = nil
		p.mu.Unlock()
		if len(got) > 0 {
			return got, true
		}
		if ended {
			return nil, false
		}
		<-p.arrived
	}
}

// release stops keeping m in progress. Call it just before settling m: a
// notice sent after a Nak would make the server wait AckWait instead of
// the Nak's delay.
func (p *pull) release(m jetstream.Msg) {
	p.mu.Lock()
	delete(p.held, m)
	p.mu.Unlock()
}

// close stops the goroutine and waits for it to return.
func (p *pull) close() {
	close(p.stop)
	<-p.done
}
