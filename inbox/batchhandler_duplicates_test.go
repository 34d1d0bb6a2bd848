package inbox_test

import (
	"context"
	"testing"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// A redelivered batch whose messages are all handled already is
// acknowledged without a call of the batch handler: it has nothing to
// handle, and BatchHandler promises it at least two messages.
func TestBatchHandler_ARedeliveredBatchOfDuplicatesCallsNoHandler(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(2)
		var sizes []int
		h := ib.BatchHandler("billing", func(ctx context.Context, tx sqldb.Tx, ms []*message.Message) error {
			sizes = append(sizes, len(ms))
			if len(ms) == 0 {
				return nil
			}
			return applyEffects(ctx, tx, "billing", ms)
		}, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			return applyEffect(ctx, tx, "billing", m)
		})
		h(ctx, deliveries(1, msgs[0], msgs[1]))
		h(ctx, deliveries(2, msgs[0], msgs[1]))
		if len(sizes) != 1 || sizes[0] != 2 {
			t.Errorf("batch handler called with %v messages, want once with 2", sizes)
		}
	})
}
