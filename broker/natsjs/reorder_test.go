package natsjs

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
)

// TestSubscribe_AHandlerThatReordersItsBatchSettlesEachMessageItsOwnWay: a
// handler may sort its batch in place (the shop's Order service and the saga
// orchestrator sort theirs by order or saga id); each settlement still
// reaches the message of its own delivery, whatever its place in the slice
// once the handler returns. Half the messages are Nak'ed on their first
// delivery and the others acked: every Nak'ed one must come back, and no
// acked one.
func TestSubscribe_AHandlerThatReordersItsBatchSettlesEachMessageItsOwnWay(t *testing.T) {
	const topic = "shop.customer.events"
	b := newBroker(t, Config{DataDir: t.TempDir()})
	msgs := numbered(40, "")
	nak := make(map[string]bool, len(msgs))
	for i, m := range msgs {
		nak[m.ID] = i%2 == 1 // alternating, so that moving a delivery by one place swaps a Nak and an Ack
	}
	publishAll(t, b, topic, len(msgs), msgs)

	var mu sync.Mutex
	seen := make(map[string]int) // deliveries per message id
	multi := 0                   // batches of two or more deliveries
	h := func(_ context.Context, batch []*broker.Delivery) {
		mu.Lock()
		defer mu.Unlock()
		if len(batch) > 1 {
			multi++
		}
		// Reorder in place: the first delivery goes last.
		first := batch[0]
		copy(batch, batch[1:])
		batch[len(batch)-1] = first
		for _, d := range batch {
			seen[d.Msg.ID]++
			if nak[d.Msg.ID] && d.Attempt == 1 {
				d.Nak(10 * time.Millisecond)
				continue
			}
			d.Ack()
		}
	}
	subscribe(t, b, broker.SubscribeConfig{Topic: topic, Group: "order", AckWait: time.Minute}, h)

	back := func() (missing int, again []string, batches int) {
		mu.Lock()
		defer mu.Unlock()
		for _, m := range msgs {
			switch n := seen[m.ID]; {
			case nak[m.ID] && n < 2:
				missing++
			case !nak[m.ID] && n > 1:
				again = append(again, m.ID)
			}
		}
		return missing, again, multi
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		missing, again, batches := back()
		if len(again) > 0 {
			t.Fatalf("%d acked messages delivered again (a Nak meant for another delivery reached them): %v", len(again), again)
		}
		if missing == 0 {
			if batches == 0 {
				t.Fatal("no batch of two or more deliveries: the test proved nothing")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d Nak'ed messages never came back (an Ack meant for another delivery reached them); %d batches of two or more", missing, len(msgs)/2, batches)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition with a deadline
	}
}
