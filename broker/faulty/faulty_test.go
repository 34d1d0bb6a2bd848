package faulty_test

import (
	"context"
	"sync"
	"testing"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/faulty"
	"github.com/troupedev/troupe/message"
)

// recorder is a broker that records what it is asked to publish.
type recorder struct {
	broker.Broker
	mu  sync.Mutex
	got map[string][]*message.Message
}

func (r *recorder) Publish(_ context.Context, topic string, msgs ...*message.Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got[topic] = append(r.got[topic], msgs...)
	return nil
}

func TestBroker_EveryMessageArrivesAtLeastOnceAndCopiesKeepTheirID(t *testing.T) {
	ctx := context.Background()
	rec := &recorder{got: map[string][]*message.Message{}}
	b, err := faulty.Wrap(rec, faulty.Config{Duplicate: 0.5, Delay: 0.5, Reorder: true, Seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	sent := map[string]bool{}
	for range 20 {
		var batch []*message.Message
		for range 10 {
			m := message.New("/test", "t", nil)
			sent[m.ID] = true
			batch = append(batch, m)
		}
		if err := b.Publish(ctx, "topic", batch...); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	count := map[string]int{}
	for _, m := range rec.got["topic"] {
		if !sent[m.ID] {
			t.Fatalf("published a message never sent: %s", m.ID)
		}
		count[m.ID]++
	}
	st := b.Stats()
	copies := 0
	for id := range sent {
		switch count[id] {
		case 1:
		case 2:
			copies++
		default:
			t.Errorf("message %s published %d times, want 1 or 2", id, count[id])
		}
	}
	if copies != st.Duplicated || copies == 0 || st.Delayed == 0 || st.Delayed == st.Duplicated {
		t.Errorf("copies %d, stats %+v: want some duplicated, some of them delayed, stats matching", copies, st)
	}
	if st.Published != len(rec.got["topic"]) {
		t.Errorf("stats say %d published, the broker got %d", st.Published, len(rec.got["topic"]))
	}
}

func TestWrap_RejectsSharesOutsideZeroToOne(t *testing.T) {
	if _, err := faulty.Wrap(&recorder{}, faulty.Config{Duplicate: 1.5}); err == nil {
		t.Error("Duplicate 1.5 accepted")
	}
}
