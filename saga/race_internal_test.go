package saga

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A reply and its command's deadline at once on PostgreSQL: the scheduler's
// transaction holds the deadline timer's row (claimDue, FOR UPDATE) and
// wants the saga's; the reply's holds the saga's and wants the timer's
// (CancelTx). Both must commit, neither may be chosen as a deadlock victim.
func TestOrchestrator_AReplyAndItsDeadlineAtOnceDoNotDeadlock(t *testing.T) {
	ctx := context.Background()
	db, err := sqldb.Open(ctx, pgtest.URL(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, m := range []func(context.Context, *sqldb.DB) error{Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	clock := clocktest.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	sched, err := timer.New(db, timer.Config{Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	o, err := New(db, sched, ib, Config{Source: "/s", ReplyTopic: "r"})
	if err != nil {
		t.Fatal(err)
	}
	def := &Definition[struct{}]{Name: "d", Steps: []Step[struct{}]{{Name: "a", Topic: "p", Command: "c", Deadline: time.Minute}}}
	if err := o.Register(def); err != nil {
		t.Fatal(err)
	}
	if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, "s1", struct{}{}) }); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Minute)
	timerID := deadlineID("s1", 0, Action, 1)
	reply, err := replyMessage("/p", &Command{SagaID: "s1", Step: "a", Op: Action}, Success(nil))
	if err != nil {
		t.Fatal(err)
	}

	locked, proceed := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	var deadlineErr, replyErr error
	wg.Go(func() {
		deadlineErr = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			var payload []byte // as the scheduler's claimDue reads it
			if err := tx.QueryRow(ctx, `SELECT payload FROM troupe_timers WHERE id = $1 FOR UPDATE SKIP LOCKED`, timerID).Scan(&payload); err != nil {
				close(locked)
				return err
			}
			close(locked)
			<-proceed
			m, err := message.DecodeJSON(payload)
			if err != nil {
				return err
			}
			if err := o.onDeadline(ctx, tx, &timer.Fired{ID: timerID, Msg: m}); err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `DELETE FROM troupe_timers WHERE id = $1`, timerID)
			return err
		})
	})
	<-locked
	wg.Go(func() {
		replyErr = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return o.HandleReplyTx(ctx, tx, reply) })
	})
	// Let the reply take the saga's row and wait (or not) for the timer's.
	until := time.Now().Add(2 * time.Second)
	for time.Now().Before(until) {
		var waiting int
		if err := db.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		if waiting > 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(proceed)
	wg.Wait()
	if deadlineErr != nil || replyErr != nil {
		t.Fatalf("deadline: %v; reply: %v", deadlineErr, replyErr)
	}
	in, err := o.Get(ctx, "s1")
	if err != nil || in.Status != Completed {
		t.Fatalf("%+v, %v: want completed", in, err)
	}
}
