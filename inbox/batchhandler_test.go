package inbox_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// applyEffects is the set-wise database effect of a test batch handler:
// one INSERT for the lot.
func applyEffects(ctx context.Context, tx sqldb.Tx, consumer string, msgs []*message.Message) error {
	var q strings.Builder
	args := []any{consumer}
	q.WriteString(`INSERT INTO effects (message_id, consumer) VALUES `)
	for i, m := range msgs {
		if i > 0 {
			q.WriteString(", ")
		}
		args = append(args, m.ID)
		q.WriteString("($" + strconv.Itoa(len(args)) + ", $1)")
	}
	_, err := tx.Exec(ctx, q.String(), args...)
	return err
}

func TestBatchHandler_HandlesTheNewMessagesOfABatchInOneCallInBatchOrder(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(6)
		var batches [][]string
		single := 0
		h := ib.BatchHandler("billing", func(ctx context.Context, tx sqldb.Tx, ms []*message.Message) error {
			var ids []string
			for _, m := range ms {
				ids = append(ids, m.ID)
			}
			batches = append(batches, ids)
			return applyEffects(ctx, tx, "billing", ms)
		}, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			single++
			return applyEffect(ctx, tx, "billing", m)
		})

		// Message 0 was handled before; message 3 comes twice.
		h(ctx, deliveries(1, msgs[0]))
		if single != 1 || len(batches) != 0 {
			t.Fatalf("a batch of one message: %d single calls and %d batch calls, want 1 and 0", single, len(batches))
		}
		ds := deliveries(1, msgs[0], msgs[1], msgs[2], msgs[3], msgs[3], msgs[4], msgs[5])
		h(ctx, ds)

		wantAllSettled(t, ds, broker.Acked)
		want := []string{msgs[1].ID, msgs[2].ID, msgs[3].ID, msgs[4].ID, msgs[5].ID}
		if single != 1 || len(batches) != 1 || !slices.Equal(batches[0], want) {
			t.Fatalf("batch calls %v and %d single calls, want one batch call with the new messages in order %v", batches, single-1, want)
		}
		wantOnlyFailing(t, db.DB, msgs, -1)
	})
}

func TestBatchHandler_AFailedBatchRunsMessageByMessageAndOnlyTheBadOneFails(t *testing.T) {
	for _, tt := range []struct {
		name string
		fail func() error
	}{
		{"error", func() error { return errors.New("one row broke the set-wise statement") }},
		{"panic", func() error { panic("index out of range in the batch code") }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			forEachDB(t, func(t *testing.T, db testDB) {
				ctx := context.Background()
				ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
				msgs := newMessages(8)
				const bad = 5
				batchCalls := 0
				calls := map[string]int{}
				h := ib.BatchHandler("billing", func(ctx context.Context, tx sqldb.Tx, ms []*message.Message) error {
					batchCalls++
					// Its writes happen, then are rolled back with it.
					if err := applyEffects(ctx, tx, "billing", ms); err != nil {
						return err
					}
					return tt.fail()
				}, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
					calls[m.ID]++
					if err := applyEffect(ctx, tx, "billing", m); err != nil {
						return err
					}
					if m.ID == msgs[bad].ID {
						return errors.New("payment service unavailable")
					}
					return nil
				})
				ds := deliveries(1, msgs...)
				h(ctx, ds)

				if batchCalls != 1 {
					t.Errorf("batch handler called %d times, want 1", batchCalls)
				}
				for i, d := range ds {
					got := settlement(d)
					if want := map[bool]broker.Settlement{true: broker.Naked, false: broker.Acked}[i == bad]; got.s != want {
						t.Errorf("message %d settled %+v, want %v", i, got, want)
					}
					if calls[msgs[i].ID] != 1 {
						t.Errorf("message %d: handler called %d times, want 1", i, calls[msgs[i].ID])
					}
				}
				wantOnlyFailing(t, db.DB, msgs, bad)
			})
		})
	}
}
