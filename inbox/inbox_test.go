package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// testDB is a migrated database with an effects table: each handled message
// a test handler applies adds one row, so a second effect would show as a
// second row.
type testDB struct {
	*sqldb.DB
	url string
}

// forEachDB runs f on a fresh SQLite database and a fresh PostgreSQL one.
func forEachDB(t *testing.T, f func(t *testing.T, db testDB)) {
	t.Helper()
	for _, dialect := range []string{"sqlite", "postgres"} {
		t.Run(dialect, func(t *testing.T) {
			f(t, openDB(t, dialect))
		})
	}
}

func openDB(t testing.TB, dialect string) testDB {
	t.Helper()
	var url string
	switch dialect {
	case "sqlite":
		url = "sqlite://" + filepath.Join(t.TempDir(), "inbox.db")
	case "postgres":
		url = pgtest.URL(t)
	}
	db := open(t, url)
	ctx := context.Background()
	if err := inbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(ctx, `CREATE TABLE effects (message_id TEXT NOT NULL, consumer TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return testDB{DB: db, url: url}
}

// open opens another handle on the database at url, closed when t ends.
func open(t testing.TB, url string) *sqldb.DB {
	t.Helper()
	db, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func newInbox(t testing.TB, db *sqldb.DB, cfg inbox.Config) *inbox.Inbox {
	t.Helper()
	ib, err := inbox.New(db, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return ib
}

// applyEffect is the database effect of a test handler.
func applyEffect(ctx context.Context, tx sqldb.Tx, consumer string, m *message.Message) error {
	_, err := tx.Exec(ctx, `INSERT INTO effects (message_id, consumer) VALUES ($1, $2)`, m.ID, consumer)
	return err
}

// effects returns how many effect rows each message id has.
func effects(t testing.TB, db *sqldb.DB) map[string]int {
	t.Helper()
	return countBy(t, db, `SELECT message_id, COUNT(*) FROM effects GROUP BY message_id`)
}

// inboxRows returns how many inbox rows each message id has.
func inboxRows(t testing.TB, db *sqldb.DB) map[string]int {
	t.Helper()
	return countBy(t, db, `SELECT message_id, COUNT(*) FROM troupe_inbox GROUP BY message_id`)
}

func countBy(t testing.TB, db *sqldb.DB, query string) map[string]int {
	t.Helper()
	rows, err := db.Query(context.Background(), query)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		got[id] = n
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return got
}

func newMessages(n int) []*message.Message {
	msgs := make([]*message.Message, n)
	for i := range msgs {
		msgs[i] = message.New("/inbox-test", "inbox.test.thing", fmt.Appendf(nil, `{"n":%d}`, i))
		msgs[i].Subject = fmt.Sprintf("thing-%d", i)
	}
	return msgs
}

func deliveries(attempt int, msgs ...*message.Message) []*broker.Delivery {
	ds := make([]*broker.Delivery, len(msgs))
	for i, m := range msgs {
		ds[i] = &broker.Delivery{Msg: m, Topic: "inbox.test", Attempt: attempt}
	}
	return ds
}

type settled struct {
	s      broker.Settlement
	delay  time.Duration
	reason string
}

func settlement(d *broker.Delivery) settled {
	s, delay, reason := d.Settlement()
	return settled{s, delay, reason}
}

func wantAllSettled(t *testing.T, ds []*broker.Delivery, want broker.Settlement) {
	t.Helper()
	for i, d := range ds {
		if s := settlement(d); s.s != want {
			t.Errorf("delivery %d settled %v (%+v), want %v", i, s.s, s, want)
		}
	}
}

// fixedBackoff is a backoff without randomness, whose delays the tests
// predict.
var fixedBackoff = inbox.ExponentialBackoff{Min: 100 * time.Millisecond, Max: time.Second, Jitter: 0.5,
	Rand: func() float64 { return 0.5 }}

func TestHandler_RedeliveredMessageIsAckedWithoutASecondEffect(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		calls := 0
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			calls++
			return applyEffect(ctx, tx, "billing", m)
		})
		msgs := newMessages(3)

		first := deliveries(1, msgs...)
		h(ctx, first)
		wantAllSettled(t, first, broker.Acked)

		// The same messages again, as after a lost ack; and one of them twice
		// in a single batch.
		again := deliveries(2, msgs[0], msgs[1], msgs[2], msgs[2])
		h(ctx, again)
		wantAllSettled(t, again, broker.Acked)

		if calls != 3 {
			t.Errorf("handler called %d times, want 3 (once per message id)", calls)
		}
		got := effects(t, db.DB)
		for _, m := range msgs {
			if got[m.ID] != 1 {
				t.Errorf("message %s has %d effects, want 1", m.ID, got[m.ID])
			}
		}

		// Another consumer group handles the same messages once more: the
		// inbox is per consumer.
		other := ib.Handler("shipping", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			return applyEffect(ctx, tx, "shipping", m)
		})
		ds := deliveries(1, msgs...)
		other(ctx, ds)
		wantAllSettled(t, ds, broker.Acked)
		for id, n := range inboxRows(t, db.DB) {
			if n != 2 {
				t.Errorf("message %s has %d inbox rows, want 2 (one per consumer)", id, n)
			}
		}
	})
}

func TestHandler_SameIDFromAnotherSourceIsADifferentMessage(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		calls := 0
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			calls++
			return nil
		})
		a := message.New("/services/order", "shop.order.created", nil)
		a.ID = "1"
		b := message.New("/services/refund", "shop.refund.created", nil)
		b.ID = "1"
		ds := deliveries(1, a, b, a.Clone())
		h(context.Background(), ds)
		wantAllSettled(t, ds, broker.Acked)
		if calls != 2 {
			t.Errorf("handler called %d times, want 2 (once per source)", calls)
		}
	})
}

func TestHandler_EveryDeliveryOfABatchIsSettled(t *testing.T) {
	// Batches that mix duplicates, a message without an id, and failures,
	// with one message or several to handle: no delivery is left
	// unsettled (which the broker would redeliver after its default delay
	// whatever the outcome).
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(4)
		done, failing, permanent, fine := msgs[0], msgs[1], msgs[2], msgs[3]
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			switch m.ID {
			case failing.ID:
				return errors.New("payment service unavailable")
			case permanent.ID:
				return inbox.Permanent(errors.New("order total is negative"))
			}
			return applyEffect(ctx, tx, "billing", m)
		})
		h(ctx, deliveries(1, done))
		noID := &message.Message{Source: "/inbox-test", Type: "inbox.test.thing"}
		for _, tt := range []struct {
			batch []*message.Message
			want  []broker.Settlement
		}{
			{[]*message.Message{failing, done, noID}, []broker.Settlement{broker.Naked, broker.Acked, broker.DeadLettered}},
			{[]*message.Message{done, permanent, done}, []broker.Settlement{broker.Acked, broker.DeadLettered, broker.Acked}},
			{[]*message.Message{failing, done, fine, noID, done}, []broker.Settlement{broker.Naked, broker.Acked, broker.Acked, broker.DeadLettered, broker.Acked}},
		} {
			ds := deliveries(2, tt.batch...)
			h(ctx, ds)
			for i, d := range ds {
				if got := settlement(d); got.s != tt.want[i] {
					t.Errorf("batch of %d, delivery %d settled %+v, want %v", len(ds), i, got, tt.want[i])
				}
			}
		}
		if got := effects(t, db.DB); len(got) != 2 || got[done.ID] != 1 || got[fine.ID] != 1 {
			t.Errorf("effects %v, want one each for 2 messages", got)
		}
	})
}

func TestHandler_ConcurrentDuplicatesOnTwoInstancesHaveOneEffect(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		// Two instances of the consumer, each with its own connections.
		winner := newInbox(t, open(t, db.url), inbox.Config{})
		loser := newInbox(t, open(t, db.url), inbox.Config{})
		m := newMessages(1)[0]

		inTx := make(chan struct{})
		release := make(chan struct{})
		winnerH := winner.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			close(inTx)
			<-release // hold the transaction open, inbox row written
			return nil
		})
		loserCalls := 0
		loserH := loser.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			loserCalls++
			return applyEffect(ctx, tx, "billing", m)
		})

		wd, ld := deliveries(1, m), deliveries(2, m)
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); winnerH(ctx, wd) }()
		<-inTx
		loserDone := make(chan struct{})
		go func() { defer wg.Done(); defer close(loserDone); loserH(ctx, ld) }()

		if db.Dialect() == sqldb.Postgres {
			// The loser's insert of the inbox row waits for the winner's
			// transaction to end.
			waitFor(t, "the second instance to wait for the first's row lock", func() bool {
				var waiting int
				err := db.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity
					WHERE datname = current_database() AND wait_event_type = 'Lock'
					AND query LIKE 'INSERT INTO troupe_inbox%'`).Scan(&waiting)
				if err != nil {
					t.Fatal(err)
				}
				return waiting == 1
			})
		}
		// On SQLite the loser's BEGIN IMMEDIATE queues behind the winner's
		// write lock, so it cannot have finished.
		select {
		case <-loserDone:
			t.Fatal("the second instance finished while the first held its transaction open")
		default:
		}
		close(release)
		wg.Wait()

		wantAllSettled(t, wd, broker.Acked)
		wantAllSettled(t, ld, broker.Acked)
		if loserCalls != 0 {
			t.Errorf("the second instance called its handler %d times, want 0", loserCalls)
		}
		if got := effects(t, db.DB)[m.ID]; got != 1 {
			t.Errorf("%d effects, want 1", got)
		}
	})
}

func TestHandler_ConcurrentDuplicateIsHandledWhenTheFirstRollsBack(t *testing.T) {
	db := openDB(t, "postgres")
	ctx := context.Background()
	first := newInbox(t, open(t, db.url), inbox.Config{Backoff: fixedBackoff.Delay})
	second := newInbox(t, open(t, db.url), inbox.Config{})
	m := newMessages(1)[0]

	inTx := make(chan struct{})
	release := make(chan struct{})
	firstH := first.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		if err := applyEffect(ctx, tx, "billing", m); err != nil {
			return err
		}
		close(inTx)
		<-release
		return errors.New("out of stock")
	})
	secondH := second.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		return applyEffect(ctx, tx, "billing", m)
	})
	fd, sd := deliveries(1, m), deliveries(2, m)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); firstH(ctx, fd) }()
	<-inTx
	go func() { defer wg.Done(); secondH(ctx, sd) }()
	waitFor(t, "the second instance to wait for the first's row lock", func() bool {
		var waiting int
		if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting == 1
	})
	close(release)
	wg.Wait()

	wantAllSettled(t, fd, broker.Naked)
	wantAllSettled(t, sd, broker.Acked)
	if got := effects(t, db.DB)[m.ID]; got != 1 {
		t.Errorf("%d effects, want 1 (the second instance's)", got)
	}
}

// waitFor polls cond until it holds, failing t after 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

func TestHandler_PoisonMessageIsDeadLetteredAndTheRestOfTheBatchCommits(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(50)
		poison := msgs[23]
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			if m.ID == poison.ID {
				return inbox.Permanent(errors.New("order total is negative"))
			}
			return nil
		})
		ds := deliveries(1, msgs...)
		h(ctx, ds)

		for i, d := range ds {
			s := settlement(d)
			if i == 23 {
				if s.s != broker.DeadLettered || !strings.Contains(s.reason, "order total is negative") {
					t.Errorf("poison message settled %+v, want dead-lettered with the handler's error", s)
				}
				continue
			}
			if s.s != broker.Acked {
				t.Errorf("message %d settled %+v, want acked", i, s)
			}
		}
		gotEffects, gotRows := effects(t, db.DB), inboxRows(t, db.DB)
		if len(gotEffects) != 49 || len(gotRows) != 49 {
			t.Errorf("%d messages with effects and %d inbox rows, want 49 each", len(gotEffects), len(gotRows))
		}
		for id, n := range gotEffects {
			if n != 1 {
				t.Errorf("message %s has %d effects, want 1", id, n)
			}
		}
		if gotEffects[poison.ID] != 0 || gotRows[poison.ID] != 0 {
			t.Error("the poison message's effect or inbox row was committed")
		}
	})
}

func TestHandler_TransientFailureIsRetriedWithBackoffUntilItSucceeds(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
		m := newMessages(1)[0]
		failures := 2
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			if failures > 0 {
				failures--
				return errors.New("payment service unavailable")
			}
			return nil
		})
		// Policy: Min 100ms doubling, half of each delay random, Rand 0.5:
		// 75ms after attempt 1, 150ms after attempt 2.
		want := []settled{{broker.Naked, 75 * time.Millisecond, ""}, {broker.Naked, 150 * time.Millisecond, ""}, {broker.Acked, 0, ""}}
		for attempt := 1; attempt <= 3; attempt++ {
			ds := deliveries(attempt, m)
			h(ctx, ds)
			if got := settlement(ds[0]); got != want[attempt-1] {
				t.Errorf("attempt %d settled %+v, want %+v", attempt, got, want[attempt-1])
			}
			wantEffects := 0
			if attempt == 3 {
				wantEffects = 1
			}
			if got := effects(t, db.DB)[m.ID]; got != wantEffects {
				t.Errorf("after attempt %d: %d effects, want %d", attempt, got, wantEffects)
			}
		}
	})
}

func TestHandler_MessageFailingAtMaxAttemptsIsDeadLetteredWithItsError(t *testing.T) {
	db := openDB(t, "sqlite")
	ib := newInbox(t, db.DB, inbox.Config{MaxAttempts: 3, Backoff: fixedBackoff.Delay})
	h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		return errors.New("payment service unavailable")
	})
	m := newMessages(1)[0]
	for attempt, want := range map[int]broker.Settlement{2: broker.Naked, 3: broker.DeadLettered, 4: broker.DeadLettered} {
		ds := deliveries(attempt, m)
		h(context.Background(), ds)
		got := settlement(ds[0])
		if got.s != want {
			t.Errorf("attempt %d settled %+v, want %v", attempt, got, want)
		}
		if want == broker.DeadLettered && !strings.Contains(got.reason, "payment service unavailable") {
			t.Errorf("attempt %d: reason %q lacks the handler's error", attempt, got.reason)
		}
	}
}

func TestHandler_EffectIsRolledBackWhenTheHandlerFailsAfterIt(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{Backoff: fixedBackoff.Delay})
		msgs := newMessages(3)
		panicking, failing, fine := msgs[0], msgs[1], msgs[2]
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(ctx, tx, "billing", m); err != nil {
				return err
			}
			switch m.ID {
			case panicking.ID:
				panic("nil map in the pricing code")
			case failing.ID:
				return errors.New("lost the connection to the tax service")
			}
			return nil
		})
		ds := deliveries(1, msgs...)
		h(ctx, ds)

		for i, want := range []broker.Settlement{broker.Naked, broker.Naked, broker.Acked} {
			if got := settlement(ds[i]); got.s != want {
				t.Errorf("message %d settled %+v, want %v", i, got, want)
			}
		}
		gotEffects, gotRows := effects(t, db.DB), inboxRows(t, db.DB)
		for _, m := range []*message.Message{panicking, failing} {
			if gotEffects[m.ID] != 0 || gotRows[m.ID] != 0 {
				t.Errorf("message %s: %d effects and %d inbox rows visible after its handler failed, want none",
					m.ID, gotEffects[m.ID], gotRows[m.ID])
			}
		}
		if gotEffects[fine.ID] != 1 || gotRows[fine.ID] != 1 {
			t.Errorf("the message whose handler succeeded has %d effects and %d inbox rows, want 1 each",
				gotEffects[fine.ID], gotRows[fine.ID])
		}

		// Alone in their batches (handled without a savepoint).
		for _, m := range []*message.Message{panicking, failing} {
			ds := deliveries(2, m)
			h(ctx, ds)
			if got := settlement(ds[0]); got.s != broker.Naked {
				t.Errorf("message %s alone in its batch settled %+v, want naked", m.ID, got)
			}
		}
		if got := effects(t, db.DB); len(got) != 1 {
			t.Errorf("effects of %d messages, want 1", len(got))
		}
	})
}

func TestHandler_HandlerThatSwallowsASQLErrorHasItsMessageRetried(t *testing.T) {
	// On PostgreSQL a failed statement aborts the transaction until the
	// savepoint is rolled back; a handler that ignores the error must not
	// take the batch down with it.
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(2)
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if m.ID == msgs[0].ID {
				_, _ = tx.Exec(ctx, `INSERT INTO no_such_table VALUES (1)`)
			}
			return applyEffect(ctx, tx, "billing", m)
		})
		ds := deliveries(1, msgs...)
		h(ctx, ds)
		if db.Dialect() == sqldb.Postgres {
			if got := settlement(ds[0]); got.s != broker.Naked {
				t.Errorf("message in an aborted savepoint settled %+v, want naked", got)
			}
		}
		if got := settlement(ds[1]); got.s != broker.Acked {
			t.Errorf("the next message settled %+v, want acked", got)
		}
		if got := effects(t, db.DB)[msgs[1].ID]; got != 1 {
			t.Errorf("the next message has %d effects, want 1", got)
		}

		// Alone in its batch.
		alone := deliveries(2, msgs[0])
		h(ctx, alone)
		if db.Dialect() == sqldb.Postgres {
			if got := settlement(alone[0]); got.s != broker.Naked {
				t.Errorf("message in an aborted transaction settled %+v, want naked", got)
			}
			if got := effects(t, db.DB)[msgs[0].ID]; got != 0 {
				t.Errorf("message in an aborted transaction has %d effects, want 0", got)
			}
		}
	})
}

func TestHandler_BatchIsNakedWhenTheDatabaseIsClosed(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		other := open(t, db.url)
		// Held for a moment (OutageHold), then handed back.
		ib := newInbox(t, other, inbox.Config{Backoff: fixedBackoff.Delay, OutageHold: 250 * time.Millisecond})
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			return applyEffect(ctx, tx, "billing", m)
		})
		other.Close()
		ds := deliveries(1, newMessages(3)...)
		h(ctx, ds)
		wantAllSettled(t, ds, broker.Naked)
		if got := effects(t, db.DB); len(got) != 0 {
			t.Errorf("%d effects, want none", len(got))
		}
	})
}

func TestHandler_StoppedSubscriptionLeavesNoPartialBatch(t *testing.T) {
	// The subscription's context ends in the middle of a batch (Stop, or
	// the process shutting down): the messages handled so far must not
	// commit without the rest being retried.
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		ib := newInbox(t, db.DB, inbox.Config{})
		msgs := newMessages(4)
		h := ib.Handler("billing", func(hctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if err := applyEffect(hctx, tx, "billing", m); err != nil {
				return err
			}
			if m.ID == msgs[1].ID {
				cancel()
			}
			return nil
		})
		ds := deliveries(1, msgs...)
		h(ctx, ds)
		for i, d := range ds {
			if s := settlement(d); s.s == broker.Acked {
				t.Errorf("message %d acked although its batch did not commit", i)
			}
		}
		if got := effects(t, db.DB); len(got) != 0 {
			t.Errorf("effects of %d messages visible, want none", len(got))
		}
	})
}

func TestHandler_HandlerContextCarriesTheMessageAsCause(t *testing.T) {
	db := openDB(t, "sqlite")
	ib := newInbox(t, db.DB, inbox.Config{})
	in := newMessages(1)[0]
	in.CorrelationID = "order-42"
	in.TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	var out *message.Message
	h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		out = message.New("/billing", "billing.invoice.created", nil)
		message.InheritCause(ctx, out) // what outbox.Add does
		return nil
	})
	h(context.Background(), deliveries(1, in))
	if out.CausationID != in.ID || out.CorrelationID != "order-42" || out.TraceParent != in.TraceParent {
		t.Errorf("message written by the handler has causation %q, correlation %q, traceparent %q; want %q, %q, %q",
			out.CausationID, out.CorrelationID, out.TraceParent, in.ID, "order-42", in.TraceParent)
	}
}

func TestNew_ReportsEveryConfigProblem(t *testing.T) {
	db := openDB(t, "sqlite")
	_, err := inbox.New(db.DB, inbox.Config{MaxAttempts: -1, Retention: -time.Hour, PruneBatchSize: -5})
	if err == nil {
		t.Fatal("New accepted an invalid config")
	}
	for _, want := range []string{"MaxAttempts", "Retention", "PruneBatchSize"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if _, err := inbox.New(nil, inbox.Config{}); err == nil {
		t.Error("New accepted a nil DB")
	}
}

func TestPermanent_IsMatchedAndKeepsTheCause(t *testing.T) {
	cause := errors.New("no such product")
	err := fmt.Errorf("handle order: %w", inbox.Permanent(cause))
	if !errors.Is(err, inbox.ErrPermanent) || !errors.Is(err, cause) {
		t.Errorf("errors.Is(%v, ErrPermanent / cause) = %v / %v, want true / true",
			err, errors.Is(err, inbox.ErrPermanent), errors.Is(err, cause))
	}
	if errors.Is(cause, inbox.ErrPermanent) {
		t.Error("an unmarked error matches ErrPermanent")
	}
	if inbox.Permanent(nil) != nil {
		t.Error("Permanent(nil) is not nil")
	}
}

// AfterCommit runs once per committed batch that handled something, after
// the commit (its effects are visible), and not for a batch of duplicates
// only or one that rolled back.
func TestHandler_AfterCommitRunsOncePerCommittedBatchThatHandledSomething(t *testing.T) {
	forEachDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		var seen []int
		ib := newInbox(t, db.DB, inbox.Config{AfterCommit: func() { seen = append(seen, len(effects(t, db.DB))) }})
		fail := false
		h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if fail {
				return errors.New("down")
			}
			return applyEffect(ctx, tx, "billing", m)
		})
		msgs := newMessages(3)
		h(ctx, deliveries(1, msgs...))
		h(ctx, deliveries(2, msgs...)) // duplicates only
		fail = true
		h(ctx, deliveries(1, newMessages(1)...)) // rolled back
		if len(seen) != 1 || seen[0] != 3 {
			t.Fatalf("AfterCommit saw %v (effects visible at each call), want one call seeing 3", seen)
		}
	})
}

func TestHandler_HoldsABatchWhileTheDatabaseIsUnreachableSpendingNoDelivery(t *testing.T) {
	// PostgreSQL refuses connections to the database for a while, as
	// during a restart: the batch is held and handled once it is back, not
	// handed back to the broker, whose deliveries lead to dead-lettering.
	db := openDB(t, "postgres")
	ctx := context.Background()
	u, err := url.Parse(db.url)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/postgres"
	admin := open(t, u.String())
	other := open(t, db.url)
	var log logLines
	ib := newInbox(t, other, inbox.Config{Backoff: func(int) time.Duration { return 20 * time.Millisecond },
		Logger: slog.New(slog.NewTextHandler(&log, nil))})
	h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		return applyEffect(ctx, tx, "billing", m)
	})
	name := dbName(t, db.DB)
	refuse := func(allow bool) {
		t.Helper()
		if _, err := admin.Exec(ctx, fmt.Sprintf(`ALTER DATABASE %q ALLOW_CONNECTIONS %t`, name, allow)); err != nil {
			t.Fatal(err)
		}
		if !allow {
			if _, err := admin.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, name); err != nil {
				t.Fatal(err)
			}
		}
	}
	refuse(false)
	t.Cleanup(func() { refuse(true) })
	msgs := newMessages(3)
	ds := deliveries(1, msgs...)
	done := make(chan struct{})
	go func() { defer close(done); h(ctx, ds) }()
	waitFor(t, "the handler to fail to reach the database twice", func() bool {
		select {
		case <-done:
			t.Fatal("the handler returned while the database refused connections")
		default:
		}
		return log.count("not committed") >= 2
	})
	refuse(true)
	<-done
	wantAllSettled(t, ds, broker.Acked)
	got := effects(t, open(t, db.url)) // db's idle connections were terminated too
	for _, m := range msgs {
		if got[m.ID] != 1 {
			t.Errorf("message %s has %d effects after the database came back, want 1", m.ID, got[m.ID])
		}
	}
}

// dbName returns the name of db's database.
func dbName(t *testing.T, db *sqldb.DB) string {
	t.Helper()
	var name string
	if err := db.QueryRow(context.Background(), `SELECT current_database()`).Scan(&name); err != nil {
		t.Fatal(err)
	}
	return name
}

// logLines is an io.Writer for a logger, safe for concurrent use, whose
// lines can be counted.
type logLines struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// count returns how many times s was written.
func (l *logLines) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}
