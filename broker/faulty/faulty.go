// Package faulty wraps a broker so that it misbehaves the way real ones do
// under failures: it publishes some messages twice (a producer's retry after
// a lost acknowledgement), holds some copies back to publish them with a
// later call (a delayed redelivery), and shuffles each call's messages. The
// shuffle reorders messages of one subject too, which breaks the order a
// broker keeps per subject: a consumer that relies on that order should
// be tested without Reorder. Tests, the demo and chaos runs use it to show
// that consumers built on the inbox have every effect once.
//
// A duplicate keeps its original's id and source, as a retried publish
// does: it is the same message, twice.
package faulty

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// Config says how often to misbehave.
type Config struct {
	// Duplicate is the share (0..1) of messages published twice.
	Duplicate float64
	// Delay is the share (0..1) of those duplicates held back and
	// published with the next Publish call to the same topic (or by
	// Flush), instead of right after their original.
	Delay float64
	// Reorder shuffles the messages of each Publish call, those of one
	// subject included.
	Reorder bool
	// Seed makes a run repeatable. Default 1.
	Seed uint64
}

// Stats counts what the broker did.
type Stats struct {
	// Published counts messages handed to the wrapped broker, copies
	// included.
	Published int
	// Duplicated counts the copies made; Delayed those of them held back.
	Duplicated, Delayed int
}

// Broker is a broker.Broker that misbehaves as its Config says.
type Broker struct {
	broker.Broker
	cfg Config

	mu    sync.Mutex
	rng   *rand.Rand
	held  map[string][]*message.Message
	stats Stats
}

// Wrap returns b misbehaving as cfg says. Subscriptions pass through.
func Wrap(b broker.Broker, cfg Config) (*Broker, error) {
	if b == nil {
		return nil, errors.New("faulty: Wrap needs a broker")
	}
	if cfg.Duplicate < 0 || cfg.Duplicate > 1 || cfg.Delay < 0 || cfg.Delay > 1 {
		return nil, fmt.Errorf("faulty: Duplicate %v and Delay %v must be within 0..1", cfg.Duplicate, cfg.Delay)
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	return &Broker{Broker: b, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, ^cfg.Seed)), held: map[string][]*message.Message{}}, nil
}

// Publish publishes msgs to topic with the faults applied: copies of some,
// the held-back copies of earlier calls, in shuffled order. When the
// wrapped broker fails, the held-back copies it was given are held again.
func (b *Broker) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	b.mu.Lock()
	taken := b.held[topic]
	out := append(make([]*message.Message, 0, len(msgs)+len(taken)), taken...)
	orig := make([]int, len(taken), len(msgs)+len(taken)) // out[i] is msgs[orig[i]], or a copy (-1)
	for i := range orig {
		orig[i] = -1
	}
	delete(b.held, topic)
	for k, m := range msgs {
		out, orig = append(out, m), append(orig, k)
		if b.rng.Float64() >= b.cfg.Duplicate {
			continue
		}
		b.stats.Duplicated++
		if b.rng.Float64() < b.cfg.Delay {
			b.stats.Delayed++
			b.held[topic] = append(b.held[topic], m.Clone())
			continue
		}
		out, orig = append(out, m.Clone()), append(orig, -1)
	}
	if b.cfg.Reorder {
		b.rng.Shuffle(len(out), func(i, j int) {
			out[i], out[j] = out[j], out[i]
			orig[i], orig[j] = orig[j], orig[i]
		})
	}
	b.mu.Unlock()
	err := b.Broker.Publish(ctx, topic, out...)
	if pe := (*broker.PublishError)(nil); errors.As(err, &pe) {
		// The caller reads the indices in its own batch; a copy's failure
		// is not its concern.
		mine := &broker.PublishError{Topic: topic, Failed: map[int]error{}, Total: len(msgs)}
		for i, e := range pe.Failed {
			if i >= 0 && i < len(orig) && orig[i] >= 0 {
				mine.Failed[orig[i]] = e
			}
		}
		err = nil
		if len(mine.Failed) > 0 {
			err = mine
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		// Whether they went out is unknown: hold the delayed copies
		// again (one duplicate more does no harm here). The caller
		// publishes the originals again.
		b.held[topic] = append(taken, b.held[topic]...)
		return err
	}
	b.stats.Published += len(out)
	return nil
}

// Flush publishes every held-back copy.
func (b *Broker) Flush(ctx context.Context) error {
	b.mu.Lock()
	held := b.held
	b.held = map[string][]*message.Message{}
	b.mu.Unlock()
	var errs []error
	for topic, msgs := range held {
		if err := b.Broker.Publish(ctx, topic, msgs...); err != nil {
			errs = append(errs, err)
			continue
		}
		b.mu.Lock()
		b.stats.Published += len(msgs)
		b.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Stats returns what the broker did so far.
func (b *Broker) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stats
}
