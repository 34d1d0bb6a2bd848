package outbox_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// outboxRows returns the (topic, id) of the outbox's rows in seq order.
func outboxRows(t *testing.T, db *sqldb.DB) [][2]string {
	t.Helper()
	rows, err := db.Query(context.Background(), "SELECT topic, id FROM troupe_outbox ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	var out [][2]string
	for rows.Next() {
		var r [2]string
		if err := rows.Scan(&r[0], &r[1]); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestDefer_AddsOfOneTransactionAreInsertedByFlushInTheirOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			var want [][2]string
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				dctx, d := outbox.Defer(ctx, tx)
				for i := range 40 {
					topic := []string{"orders", "payments"}[i%2]
					m := newMsg("s"+itoa(i%3), i)
					if err := outbox.Add(dctx, tx, topic, m); err != nil {
						return err
					}
					want = append(want, [2]string{topic, m.ID})
				}
				// Kept, not inserted yet.
				var n int
				if err := tx.QueryRow(ctx, "SELECT count(*) FROM troupe_outbox").Scan(&n); err != nil {
					return err
				}
				if n != 0 || d.Len() != 40 {
					t.Errorf("before Flush: %d rows in the table, %d held; want 0 and 40", n, d.Len())
				}
				if err := d.Flush(ctx); err != nil {
					return err
				}
				if d.Len() != 0 {
					t.Errorf("after Flush %d messages still held", d.Len())
				}
				return d.Flush(ctx) // a second Flush has nothing to insert
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := outboxRows(t, db); !slices.Equal(got, want) {
				t.Fatalf("rows (topic, id) in seq order:\n got %v\nwant %v", got, want)
			}
		})
	}
}

func TestDefer_TruncateDropsTheMessagesOfARolledBackSavepoint(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			kept, dropped := newMsg("a", 1), newMsg("b", 2)
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				dctx, d := outbox.Defer(ctx, tx)
				if err := outbox.Add(dctx, tx, "t", kept); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, "SAVEPOINT step"); err != nil {
					return err
				}
				mark := d.Len()
				if err := outbox.Add(dctx, tx, "t", dropped); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT step"); err != nil {
					return err
				}
				d.Truncate(mark)
				return d.Flush(ctx)
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := outboxRows(t, db); !slices.Equal(got, [][2]string{{"t", kept.ID}}) {
				t.Fatalf("rows %v, want only the message added before the savepoint (%s)", got, kept.ID)
			}
		})
	}
}

// A Deferred belongs to its transaction: Add given another one (another
// database's) inserts there at once, not into the Deferred.
func TestDefer_AddGivenAnotherTransactionInsertsAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			other, _ := openDB(t, "sqlite")
			ctx := context.Background()
			m := newMsg("s", 1)
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				dctx, d := outbox.Defer(ctx, tx)
				err := other.InTx(dctx, func(octx context.Context, otx sqldb.Tx) error {
					return outbox.Add(octx, otx, "t", m)
				})
				if err != nil {
					return err
				}
				if d.Len() != 0 {
					t.Errorf("the Deferred of another transaction holds %d messages", d.Len())
				}
				return d.Flush(ctx)
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := outboxRows(t, other); !slices.Equal(got, [][2]string{{"t", m.ID}}) {
				t.Fatalf("the other database's outbox has %v, want the message", got)
			}
			if got := outboxRows(t, db); len(got) != 0 {
				t.Fatalf("the deferring transaction's outbox has %v, want nothing", got)
			}
		})
	}
}

func TestDefer_AnInvalidMessageIsRefusedByAddAndNotHeld(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	ctx := context.Background()
	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		dctx, d := outbox.Defer(ctx, tx)
		err := outbox.Add(dctx, tx, "t", newMsg("s", 1), &message.Message{ID: "x", Type: "t"})
		if !errors.Is(err, outbox.ErrInvalidMessage) {
			t.Errorf("Add of a message without a source = %v, want ErrInvalidMessage", err)
		}
		if err := outbox.Add(dctx, tx, "", newMsg("s", 2)); !errors.Is(err, outbox.ErrInvalidMessage) {
			t.Errorf("Add to an empty topic = %v, want ErrInvalidMessage", err)
		}
		if d.Len() != 0 {
			t.Errorf("%d messages held after refused Adds", d.Len())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Flush ends the Deferred: an Add given its context afterwards inserts at
// once instead of being kept by a Deferred no one flushes again.
func TestDefer_AnAddAfterFlushIsInsertedAtOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			first, late := newMsg("s", 1), newMsg("s", 2)
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				dctx, d := outbox.Defer(ctx, tx)
				if err := outbox.Add(dctx, tx, "t", first); err != nil {
					return err
				}
				if err := d.Flush(dctx); err != nil {
					return err
				}
				if err := outbox.Add(dctx, tx, "t", late); err != nil {
					return err
				}
				if d.Len() != 0 || outbox.DeferredFrom(dctx, tx) != nil {
					t.Errorf("after Flush the Deferred still keeps messages (%d) or is still found", d.Len())
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := outboxRows(t, db); !slices.Equal(got, [][2]string{{"t", first.ID}, {"t", late.ID}}) {
				t.Fatalf("rows %v, want both messages in order", got)
			}
		})
	}
}

// A transaction of InGroupTx defers too: its Tx is the same as itself.
func TestDefer_WorksInAGroupTransaction(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	m := newMsg("s", 1)
	err := db.InGroupTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		dctx, d := outbox.Defer(ctx, tx)
		if err := outbox.Add(dctx, tx, "t", m); err != nil {
			return err
		}
		if d.Len() != 1 || outbox.DeferredFrom(dctx, tx) != d {
			t.Errorf("an Add in InGroupTx was not deferred: Len %d", d.Len())
		}
		return d.Flush(dctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := outboxRows(t, db); !slices.Equal(got, [][2]string{{"t", m.ID}}) {
		t.Fatalf("rows %v, want the message", got)
	}
}
