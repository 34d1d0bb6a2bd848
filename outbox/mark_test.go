package outbox_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// refuseMarks makes the database refuse to mark outbox rows delivered
// while the returned switch is on.
func refuseMarks(t *testing.T, db *sqldb.DB) (set func(on bool)) {
	t.Helper()
	ctx := context.Background()
	ddl := `CREATE TABLE mark_switch (refuse BOOLEAN NOT NULL);
		INSERT INTO mark_switch VALUES (FALSE);
		CREATE TRIGGER refuse_mark BEFORE UPDATE OF delivered_at ON troupe_outbox
		WHEN (SELECT refuse FROM mark_switch) BEGIN SELECT RAISE(ABORT, 'mark refused'); END`
	if db.Dialect() == sqldb.Postgres {
		ddl = `CREATE TABLE mark_switch (refuse BOOLEAN NOT NULL);
		INSERT INTO mark_switch VALUES (FALSE);
		CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF (SELECT refuse FROM mark_switch) THEN RAISE EXCEPTION 'mark refused'; END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER refuse_mark BEFORE UPDATE OF delivered_at ON troupe_outbox
		FOR EACH ROW EXECUTE FUNCTION refuse_mark()`
	}
	if _, err := db.Exec(ctx, ddl); err != nil {
		t.Fatal(err)
	}
	return func(on bool) {
		t.Helper()
		if _, err := db.Exec(ctx, "UPDATE mark_switch SET refuse = $1", on); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRelay_PublishedRowsWhoseMarkFailsAreMarkedLaterNotPublishedAgain: the
// relay marks published rows delivered apart from its rounds; while the
// marks fail, the rows it published are neither read nor published again,
// and they are marked once the database takes writes again. Each message
// reaches the broker once.
func TestRelay_PublishedRowsWhoseMarkFailsAreMarkedLaterNotPublishedAgain(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			refuse := refuseMarks(t, db)
			refuse(true)
			first := []*message.Message{newMsg("a", 0), newMsg("a", 1), newMsg("b", 0)}
			addAll(t, db, "shop.orders", first)
			pub := &flakyPublisher{changed: make(chan struct{}, 1), fail: func(int, []*message.Message) error { return nil }}
			clock := newFakeClock()
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Clock: clock, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			runRelay(t, r)
			pub.waitAccepted(t, len(first))

			// The mark fails and is retried after a backoff; meanwhile the
			// next round publishes the new rows only, and the mark of both
			// batches fails again.
			clock.waitRequest(t, outbox.DefaultMinBackoff)
			second := []*message.Message{newMsg("a", 2), newMsg("c", 0)}
			addAll(t, db, "shop.orders", second)
			r.Notify()
			clock.waitRequest(t, 2*outbox.DefaultMinBackoff)
			want := append(idsOf(first), idsOf(second)...)
			if got := pub.waitAccepted(t, len(want)); !slices.Equal(got, want) {
				t.Fatalf("published %v\nwant each once: %v", got, want)
			}
			if n := pendingRows(t, db); n != len(want) {
				t.Fatalf("%d rows marked delivered while marks were refused", len(want)-n)
			}

			refuse(false)
			clock.Advance(2 * outbox.DefaultMinBackoff)
			waitFor(t, 10*time.Second, "every row marked delivered", func() bool { return pendingRows(t, db) == 0 })
			pub.mu.Lock()
			got := slices.Clone(pub.accepted)
			pub.mu.Unlock()
			if !slices.Equal(got, want) {
				t.Fatalf("published %v\nwant each once: %v", got, want)
			}
		})
	}
}

// TestRelay_StoppedWithRowsAwaitingTheirMarkMarksThemBeforeRunReturns: a
// relay stopped while its published rows wait for their mark (the mark
// failed and waits out its backoff) makes one last mark before Run returns,
// so the relay that takes over does not publish them again.
func TestRelay_StoppedWithRowsAwaitingTheirMarkMarksThemBeforeRunReturns(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			refuse := refuseMarks(t, db)
			refuse(true)
			msgs := []*message.Message{newMsg("a", 0), newMsg("b", 0)}
			addAll(t, db, "shop.orders", msgs)
			pub := &flakyPublisher{changed: make(chan struct{}, 1), fail: func(int, []*message.Message) error { return nil }}
			clock := newFakeClock()
			r, err := outbox.NewRelay(db, pub, outbox.RelayConfig{Clock: clock, PollInterval: time.Hour, LeaseTTL: 3 * time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			stop := runRelay(t, r)
			pub.waitAccepted(t, len(msgs))
			clock.waitRequest(t, outbox.DefaultMinBackoff) // the mark failed
			if n := pendingRows(t, db); n != len(msgs) {
				t.Fatalf("%d rows pending while marks are refused, want %d", n, len(msgs))
			}
			refuse(false)
			stop()
			if n := pendingRows(t, db); n != 0 {
				t.Fatalf("%d published rows left unmarked after Run returned, want 0", n)
			}
		})
	}
}
