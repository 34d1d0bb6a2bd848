package inbox_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// TestHandler_WithNATS_ABatchReorderedBeforeTheInboxLosesNoFailedMessage: a
// subscription that reorders its batches before the inbox handles them (the
// shop's Order service sorts them by order, so that its consumers lock
// orders in one order) still has each failed message redelivered and each
// handled one acknowledged: every message ends with its one effect. The
// failures stand for a database outage that fails some handlers of a batch
// while others commit.
func TestHandler_WithNATS_ABatchReorderedBeforeTheInboxLosesNoFailedMessage(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		b := newNATS(t)
		const topic, group = "shop.customer.events", "order"
		msgs := newMessages(40)
		failOnce := make(map[string]bool, len(msgs))
		for i, m := range msgs {
			failOnce[m.ID] = i%2 == 1
		}

		var mu sync.Mutex
		attempts := map[string]int{}
		ib := newInbox(t, db.DB, inbox.Config{Backoff: func(int) time.Duration { return 10 * time.Millisecond }})
		h := ib.Handler(group, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			mu.Lock()
			attempts[m.ID]++
			n := attempts[m.ID]
			mu.Unlock()
			if failOnce[m.ID] && n == 1 {
				return errors.New("database unreachable")
			}
			return applyEffect(ctx, tx, group, m)
		})
		multi := false // a batch of two or more deliveries was seen
		byEntity := func(ctx context.Context, batch []*broker.Delivery) {
			mu.Lock()
			multi = multi || len(batch) > 1
			mu.Unlock()
			// Reordered in place, as a sort by entity would: the first
			// delivery goes last, so that neighbours, one failing and one
			// not, change places.
			first := batch[0]
			copy(batch, batch[1:])
			batch[len(batch)-1] = first
			h(ctx, batch)
		}
		subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: group, MaxBatch: 40}, byEntity)
		if err := b.Publish(ctx, topic, msgs...); err != nil {
			t.Fatal(err)
		}

		waitFor(t, "every message's effect", func() bool {
			got := effects(t, db.DB)
			return !slices.ContainsFunc(msgs, func(m *message.Message) bool { return got[m.ID] == 0 })
		})
		mu.Lock()
		if !multi {
			t.Error("every batch had one delivery: the reordering was not exercised")
		}
		mu.Unlock()
		got := effects(t, db.DB)
		for _, m := range msgs {
			if got[m.ID] != 1 {
				t.Errorf("message %s has %d effects, want 1", m.ID, got[m.ID])
			}
		}
	})
}
