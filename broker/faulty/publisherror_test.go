package faulty_test

import (
	"context"
	"errors"
	"testing"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/message"
)

// refuser is a broker that refuses one message (by id), reporting it, as
// real brokers do, by its index in the batch it was given.
type refuser struct {
	broker.Broker
	refuse string
}

func (r *refuser) Publish(_ context.Context, topic string, msgs ...*message.Message) error {
	pe := &broker.PublishError{Topic: topic, Failed: map[int]error{}, Total: len(msgs)}
	for i, m := range msgs {
		if m.ID == r.refuse {
			pe.Failed[i] = errors.New("refused")
		}
	}
	if len(pe.Failed) == 0 {
		return nil
	}
	return pe
}

// The outbox relay reads a *PublishError's indices as indices into the
// batch it passed: a wrapper that shuffles and adds copies must translate
// them, or the relay deletes the refused message's row as published (lost)
// and retries one that went out.
func TestBroker_PublishErrorNamesTheCallersIndices(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		var batch []*message.Message
		for range 10 {
			batch = append(batch, message.New("/test", "t", nil))
		}
		const refused = 3
		b, err := faulty.Wrap(&refuser{refuse: batch[refused].ID}, faulty.Config{Duplicate: 0.3, Reorder: true, Seed: seed})
		if err != nil {
			t.Fatal(err)
		}
		err = b.Publish(context.Background(), "topic", batch...)
		var pe *broker.PublishError
		if !errors.As(err, &pe) {
			t.Fatalf("seed %d: error %v, want a *PublishError", seed, err)
		}
		if _, ok := pe.Failed[refused]; !ok || len(pe.Failed) != 1 || pe.Total != len(batch) {
			t.Fatalf("seed %d: Failed %v (Total %d), want only index %d of %d", seed, pe.Failed, pe.Total, refused, len(batch))
		}
	}
}
