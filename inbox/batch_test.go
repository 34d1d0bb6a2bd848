package inbox_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// The tests of this file hold whichever way Handler runs a batch (in one
// transaction without savepoints, again with savepoints after a failure,
// one transaction per message after a failed commit): what a user relies on
// is each message's outcome, its writes applied once or not at all, and
// the handler calls that this costs.

// wantOnlyFailing checks that, after a batch of msgs in which only the
// message at bad failed, every other message has one effect and one inbox
// row, and bad has neither.
func wantOnlyFailing(t *testing.T, db *sqldb.DB, msgs []*message.Message, bad int) {
	t.Helper()
	gotEffects, gotRows := effects(t, db), inboxRows(t, db)
	for i, m := range msgs {
		want := 1
		if i == bad {
			want = 0
		}
		if gotEffects[m.ID] != want || gotRows[m.ID] != want {
			t.Errorf("message %d: %d effects and %d inbox rows, want %d each", i, gotEffects[m.ID], gotRows[m.ID], want)
		}
	}
}

func TestHandler_OneFailingMessageOfABatchUndoesOnlyItsOwnWrites(t *testing.T) {
	for _, tt := range []struct {
		name       string
		fail       func() error // after the message's effect
		settlement broker.Settlement
		reason     string
	}{
		{"error", func() error { return errors.New("payment service unavailable") }, broker.Naked, ""},
		{"panic", func() error { panic("nil map in the pricing code") }, broker.Naked, ""},
		{"permanent", func() error { return inbox.Permanent(errors.New("order total is negative")) },
			broker.DeadLettered, "order total is negative"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			forEachDB(t, func(t *testing.T, db testDB) {
				ctx := context.Background()
				ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
				msgs := newMessages(50)
				const bad = 23
				calls := map[string]int{}
				h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
					calls[m.ID]++
					if err := applyEffect(ctx, tx, "billing", m); err != nil {
						return err
					}
					if m.ID == msgs[bad].ID {
						return tt.fail()
					}
					return nil
				})
				ds := deliveries(1, msgs...)
				h(ctx, ds)

				for i, d := range ds {
					got := settlement(d)
					switch {
					case i != bad && got.s != broker.Acked:
						t.Errorf("message %d settled %+v, want acked", i, got)
					case i == bad && (got.s != tt.settlement || !strings.Contains(got.reason, tt.reason)):
						t.Errorf("failing message settled %+v, want %v with a reason holding %q", got, tt.settlement, tt.reason)
					}
				}
				wantOnlyFailing(t, db.DB, msgs, bad)
				// The failure is not provoked a second time for the same
				// delivery; a message that succeeded may run again, its
				// writes having been rolled back with the failing one's.
				if calls[msgs[bad].ID] != 1 {
					t.Errorf("failing message's handler called %d times, want 1", calls[msgs[bad].ID])
				}
				for i, m := range msgs {
					if calls[m.ID] < 1 || calls[m.ID] > 2 {
						t.Errorf("message %d: handler called %d times, want once or twice", i, calls[m.ID])
					}
				}
			})
		})
	}
}

func TestHandler_HandlerRunsOncePerMessageUnlessAnotherOfItsBatchFailed(t *testing.T) {
	// The handler counts its calls outside the transaction, as a call to
	// another service would: a batch where every handler succeeds costs one
	// call per message.
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		calls := map[string]int{}
		failing := ""
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			calls[m.ID]++
			if m.ID == failing {
				return errors.New("payment service unavailable")
			}
			return applyEffect(ctx, tx, "billing", m)
		})

		msgs := newMessages(50)
		ds := deliveries(1, msgs...)
		h(ctx, ds)
		wantAllSettled(t, ds, broker.Acked)
		for i, m := range msgs {
			if calls[m.ID] != 1 {
				t.Errorf("message %d of a batch without failure: handler called %d times, want 1", i, calls[m.ID])
			}
		}

		// A batch with one failure: a message may run again, but only one
		// that succeeded before the failure rolled its writes back.
		clear(calls)
		msgs = newMessages(50)
		failing = msgs[30].ID
		h(ctx, deliveries(1, msgs...))
		reran := 0
		for _, m := range msgs {
			if calls[m.ID] == 2 {
				reran++
			}
		}
		if reran > 30 || calls[failing] != 1 {
			t.Errorf("%d messages ran twice and the failing one %d times; want at most the 30 before it, and 1",
				reran, calls[failing])
		}
		if got := effects(t, db.DB); len(got) != 99 {
			t.Errorf("effects of %d messages, want 99", len(got))
		}
	})
}

func TestHandler_HandlerThatIgnoresAFailedStatementDoesNotLoseTheRestOfTheBatch(t *testing.T) {
	// On PostgreSQL a failed statement aborts the transaction: every later
	// statement of the batch fails until the culprit's writes are undone.
	// The culprit returns nil, in the middle of the batch (the next handler
	// then fails) or last (then the commit fails).
	for _, tt := range []struct {
		name string
		bad  int
	}{{"middle", 23}, {"last", 49}} {
		t.Run(tt.name, func(t *testing.T) {
			forEachDB(t, func(t *testing.T, db testDB) {
				ctx := context.Background()
				ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
				msgs := newMessages(50)
				h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
					if err := applyEffect(ctx, tx, "billing", m); err != nil {
						return err
					}
					if m.ID == msgs[tt.bad].ID {
						_, _ = tx.Exec(ctx, `INSERT INTO no_such_table VALUES (1)`)
					}
					return nil
				})
				ds := deliveries(1, msgs...)
				h(ctx, ds)

				if db.Dialect() == sqldb.SQLite {
					// The failed statement left the transaction usable.
					wantAllSettled(t, ds, broker.Acked)
					wantOnlyFailing(t, db.DB, msgs, -1)
					return
				}
				for i, d := range ds {
					want := broker.Acked
					if i == tt.bad {
						want = broker.Naked
					}
					if got := settlement(d); got.s != want {
						t.Errorf("message %d settled %+v, want %v", i, got, want)
					}
				}
				wantOnlyFailing(t, db.DB, msgs, tt.bad)
			})
		})
	}
}

func TestHandler_CopiesOfAMessageInOneBatchHaveOneEffect(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
		msgs := newMessages(4)
		a, b, c, failing := msgs[0], msgs[1], msgs[2], msgs[3]
		calls := map[string]int{}
		fail := false
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			calls[m.ID]++
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			if fail && m.ID == failing.ID {
				return errors.New("payment service unavailable")
			}
			return nil
		})
		h(ctx, deliveries(1, c))

		// Without a failure, and with one that makes the batch run again.
		for _, f := range []bool{false, true} {
			fail = f
			clear(calls)
			if _, err := db.Exec(ctx, `DELETE FROM effects WHERE message_id <> $1`, c.ID); err != nil {
				t.Fatal(err)
			}
			if _, err := db.Exec(ctx, `DELETE FROM troupe_inbox WHERE message_id <> $1`, c.ID); err != nil {
				t.Fatal(err)
			}
			ds := deliveries(2, a, b, a, c, failing, b, c, a, failing)
			h(ctx, ds)

			wantFailing := broker.Acked
			if fail {
				wantFailing = broker.Naked
			}
			for i, d := range ds {
				want := broker.Acked
				if i == 4 {
					want = wantFailing // the first copy decides
				}
				if got := settlement(d); got.s != want {
					t.Errorf("failure %v: delivery %d settled %+v, want %v", fail, i, got, want)
				}
			}
			got := effects(t, db.DB)
			wantFailingEffects := 1
			if fail {
				wantFailingEffects = 0
			}
			if got[a.ID] != 1 || got[b.ID] != 1 || got[c.ID] != 1 || got[failing.ID] != wantFailingEffects {
				t.Errorf("failure %v: effects %v, want one each for a, b and c, %d for the failing one", fail, got, wantFailingEffects)
			}
			if calls[c.ID] != 0 || calls[failing.ID] != 1 {
				t.Errorf("failure %v: handler called %d times for the message handled before and %d for the failing one, want 0 and 1",
					fail, calls[c.ID], calls[failing.ID])
			}
		}
	})
}

// deferredFK creates a table whose foreign key is checked only at commit,
// and returns a statement that violates it.
func deferredFK(t *testing.T, db *sqldb.DB) string {
	t.Helper()
	for _, q := range []string{
		`CREATE TABLE parents (id TEXT PRIMARY KEY)`,
		`CREATE TABLE children (parent_id TEXT NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)`,
	} {
		if _, err := db.Exec(context.Background(), q); err != nil {
			t.Fatal(err)
		}
	}
	return `INSERT INTO children (parent_id) VALUES ('missing')`
}

func TestHandler_MessageThatCannotCommitDoesNotHoldBackTheRestOfItsBatch(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		violate := deferredFK(t, db.DB)
		commits := 0
		ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay, MaxAttempts: 3,
			AfterCommit: func() { commits++ }})
		msgs := newMessages(5)
		const bad = 3
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			if m.ID == msgs[bad].ID {
				_, err := tx.Exec(ctx, violate)
				return err
			}
			return nil
		})
		ds := deliveries(2, msgs...)
		h(ctx, ds)
		for i, d := range ds {
			want := settled{broker.Acked, 0, ""}
			if i == bad {
				want = settled{broker.Naked, 150 * time.Millisecond, ""} // Nak'ed with the backoff of attempt 2
			}
			if got := settlement(d); got != want {
				t.Errorf("message %d settled %+v, want %+v", i, got, want)
			}
		}
		wantOnlyFailing(t, db.DB, msgs, bad)
		if commits != 1 {
			t.Errorf("AfterCommit called %d times, want 1", commits)
		}

		// At MaxAttempts the message is dead-lettered with the commit's
		// error as the reason.
		ds = deliveries(3, msgs[bad], newMessages(1)[0])
		h(ctx, ds)
		if got := settlement(ds[0]); got.s != broker.DeadLettered || !strings.Contains(strings.ToLower(got.reason), "foreign key") {
			t.Errorf("message that cannot commit, at its last attempt, settled %+v; want dead-lettered with the constraint's error", got)
		}
		if got := settlement(ds[1]); got.s != broker.Acked {
			t.Errorf("the other message settled %+v, want acked", got)
		}
		if got := effects(t, db.DB); len(got) != 5 || got[msgs[bad].ID] != 0 {
			t.Errorf("effects %v, want 5 messages without the one that cannot commit", got)
		}
	})
}

func TestHandler_AFailingQueuedWriteIsBlamedOnItsOwnMessage(t *testing.T) {
	// A write queued with sqldb.ExecLater fails when the next statement
	// sends it: on PostgreSQL that is the next handler's, in the first,
	// savepoint-less run of the batch. Only the message that queued it may
	// fail; the next one is handled.
	for _, tt := range []struct {
		name string
		bad  int
	}{{"middle", 23}, {"last", 49}} {
		t.Run(tt.name, func(t *testing.T) {
			forEachDB(t, func(t *testing.T, db testDB) {
				ctx := context.Background()
				ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
				msgs := newMessages(50)
				h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
					if err := applyEffect(ctx, tx, "billing", m); err != nil {
						return err
					}
					if m.ID == msgs[tt.bad].ID {
						return sqldb.ExecLater(ctx, tx, `INSERT INTO no_such_table VALUES (1)`)
					}
					return nil
				})
				ds := deliveries(1, msgs...)
				h(ctx, ds)
				for i, d := range ds {
					want := broker.Acked
					if i == tt.bad {
						want = broker.Naked
					}
					if got := settlement(d); got.s != want {
						t.Errorf("message %d settled %+v, want %v", i, got, want)
					}
				}
				wantOnlyFailing(t, db.DB, msgs, tt.bad)
			})
		})
	}
}
