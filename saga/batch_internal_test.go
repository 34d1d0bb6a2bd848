package saga

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// batchData is the data of the sagas of the batch tests: a command step,
// then a local step that refuses when Refuse is set.
type batchData struct {
	Refuse bool `json:"refuse"`
}

type batchFixture struct {
	db  *sqldb.DB
	o   *Orchestrator
	def *Definition[batchData]
}

func newBatchFixture(t *testing.T, kind string) *batchFixture {
	t.Helper()
	ctx := context.Background()
	url := "sqlite://" + filepath.Join(t.TempDir(), "order.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, m := range []func(context.Context, *sqldb.DB) error{Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.Exec(ctx, `CREATE TABLE outcomes (saga_id TEXT NOT NULL, outcome TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
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
	o, err := New(db, sched, ib, Config{Source: "/order", ReplyTopic: "order.replies"})
	if err != nil {
		t.Fatal(err)
	}
	outcome := func(ctx context.Context, tx sqldb.Tx, id, what string) error {
		_, err := tx.Exec(ctx, `INSERT INTO outcomes (saga_id, outcome) VALUES ($1, $2)`, id, what)
		return err
	}
	def := &Definition[batchData]{
		Name: "batch",
		Steps: []Step[batchData]{
			{Name: "reserve", Topic: "customer.commands", Command: "reserve", Deadline: time.Minute, MaxAttempts: 2},
			{Name: "approve", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData) error {
				if err := outcome(ctx, tx, id, "approve ran"); err != nil {
					return err
				}
				// The step's own event: in a batch its insert is deferred,
				// and a refusal must drop it with the step's other writes.
				ev := message.New("/order", "order.approved", nil)
				ev.Subject = id
				if err := outbox.Add(ctx, tx, "order.events", ev); err != nil {
					return err
				}
				if d.Refuse {
					return Refuse(errors.New("cancelled meanwhile"))
				}
				return nil
			}},
		},
		OnCompleted: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData) error {
			return outcome(ctx, tx, id, "completed")
		},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData, reason string) error {
			return outcome(ctx, tx, id, "compensated: "+reason)
		},
	}
	if err := o.Register(def); err != nil {
		t.Fatal(err)
	}
	return &batchFixture{db: db, o: o, def: def}
}

func (f *batchFixture) start(t *testing.T, id string, d batchData) {
	t.Helper()
	if err := f.db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		return f.def.StartTx(ctx, tx, f.o, id, d)
	}); err != nil {
		t.Fatal(err)
	}
}

func reply(t *testing.T, sagaID string, op Op, r Reply) *message.Message {
	t.Helper()
	m, err := replyMessage("/customer", &Command{SagaID: sagaID, Step: "reserve", Op: op}, r)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// state is what a saga is, as stored: its row, its history, the outcomes
// its steps and hooks wrote, and its pending timers.
func (f *batchFixture) state(t *testing.T, id string) string {
	t.Helper()
	ctx := context.Background()
	in, err := f.o.Get(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	s := fmt.Sprintf("%s step %d reason %q", in.Status, in.Step, in.Reason)
	for _, q := range []string{
		`SELECT step || ' ' || op || ' ' || attempt || ' ' || event || ' ' || detail FROM troupe_saga_history WHERE saga_id = $1 ORDER BY seq`,
		`SELECT outcome FROM outcomes WHERE saga_id = $1 ORDER BY outcome`,
		`SELECT substr(id, length($1) + 15) FROM troupe_timers WHERE id LIKE 'saga-deadline/' || $1 || '/%' ORDER BY id`,
		`SELECT topic FROM troupe_outbox WHERE subject = $1 ORDER BY seq`,
	} {
		rows, err := f.db.Query(ctx, q, id)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for rows.Next() {
			var v string
			if err := rows.Scan(&v); err != nil {
				t.Fatal(err)
			}
			got = append(got, v)
		}
		if err := rows.Close(); err != nil {
			t.Fatal(err)
		}
		s += fmt.Sprintf("\n  %q", got)
	}
	return s
}

// normalize drops the saga id and the ids of messages (commands sent) from
// a state, so that the states of two sagas can be compared.
func normalize(s, id string) string {
	s = uuid.ReplaceAllString(s, "<id>")
	return strings.ReplaceAll(s, id, "<saga>")
}

var uuid = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)

func TestHandleRepliesTx_EndsEachSagaAsReplyByReplyHandlingDoes(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			ctx := context.Background()
			// Each case: the saga's data, and the replies it gets.
			cases := []struct {
				name    string
				data    batchData
				replies []Reply
			}{
				{"approved", batchData{}, []Reply{Success(nil)}},
				{"refused by the participant", batchData{}, []Reply{Failure("over the credit limit")}},
				{"refused by the local step", batchData{Refuse: true}, []Reply{Success(nil)}},
				{"answered twice", batchData{}, []Reply{Success(nil), Success(nil)}},
			}
			var batch []*message.Message
			var single [][]*message.Message
			for i, c := range cases {
				f.start(t, fmt.Sprintf("batch-%d", i), c.data)
				f.start(t, fmt.Sprintf("single-%d", i), c.data)
				var one []*message.Message
				for _, r := range c.replies {
					batch = append(batch, reply(t, fmt.Sprintf("batch-%d", i), Action, r))
					one = append(one, reply(t, fmt.Sprintf("single-%d", i), Action, r))
				}
				single = append(single, one)
			}
			if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return f.o.HandleRepliesTx(ctx, tx, batch)
			}); err != nil {
				t.Fatal(err)
			}
			for i, c := range cases {
				for _, m := range single[i] {
					if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.o.HandleReplyTx(ctx, tx, m) }); err != nil {
						t.Fatal(err)
					}
				}
				b, s := fmt.Sprintf("batch-%d", i), fmt.Sprintf("single-%d", i)
				got := normalize(f.state(t, b), b)
				want := normalize(f.state(t, s), s)
				if got != want {
					t.Errorf("%s: handled in a batch:\n%s\nreply by reply:\n%s", c.name, got, want)
				}
			}
			// The batch did what the cases say, not merely the same as the
			// other path.
			for i, want := range []Status{Completed, Compensated, Compensating, Completed} {
				if in, err := f.o.Get(ctx, fmt.Sprintf("batch-%d", i)); err != nil || in.Status != want {
					t.Errorf("%s: %v, %v; want %s", cases[i].name, in.Status, err, want)
				}
			}
			for i, want := range []int{1, 0, 0, 1} {
				var events int
				if err := f.db.QueryRow(ctx, `SELECT count(*) FROM troupe_outbox WHERE topic = 'order.events' AND subject = $1`, fmt.Sprintf("batch-%d", i)).Scan(&events); err != nil {
					t.Fatal(err)
				}
				if events != want {
					t.Errorf("%s: %d order.events rows from the local step, want %d", cases[i].name, events, want)
				}
			}
		})
	}
}

func TestHandler_ABatchWithAReplyForAnUnknownSagaDeadLettersItAndAppliesTheOthers(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			ctx := context.Background()
			f.start(t, "known-1", batchData{})
			f.start(t, "known-2", batchData{})
			msgs := []*message.Message{reply(t, "known-1", Action, Success(nil)), reply(t, "nobody", Action, Success(nil)), reply(t, "known-2", Action, Success(nil))}

			// Set-wise, the batch fails whole and writes nothing.
			err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.o.HandleRepliesTx(ctx, tx, msgs) })
			if err == nil {
				t.Fatal("HandleRepliesTx accepted a reply for an unknown saga")
			}
			if in, err := f.o.Get(ctx, "known-1"); err != nil || in.Status != Running {
				t.Fatalf("known-1 after the failed batch: %v, %v; want still running", in.Status, err)
			}

			// The Handler then applies the replies one by one.
			ds := make([]*broker.Delivery, len(msgs))
			for i, m := range msgs {
				ds[i] = &broker.Delivery{Msg: m, Topic: "order.replies", Attempt: 1}
			}
			f.o.Handler("order")(ctx, slices.Clone(ds))
			var settled []broker.Settlement
			for _, d := range ds {
				s, _, _ := d.Settlement()
				settled = append(settled, s)
			}
			if want := []broker.Settlement{broker.Acked, broker.DeadLettered, broker.Acked}; !slices.Equal(settled, want) {
				t.Errorf("settled %v, want %v", settled, want)
			}
			for _, id := range []string{"known-1", "known-2"} {
				if in, err := f.o.Get(ctx, id); err != nil || in.Status != Completed {
					t.Errorf("%s: %v, %v; want completed", id, in.Status, err)
				}
			}
		})
	}
}

func TestStartManyTx_StartsEachSagaAsStartTxDoes(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			ctx := context.Background()
			var starts []Start[batchData]
			for i := range 3 {
				starts = append(starts, Start[batchData]{ID: fmt.Sprintf("many-%d", i), Data: batchData{Refuse: i == 1}})
				f.start(t, fmt.Sprintf("one-%d", i), batchData{Refuse: i == 1})
			}
			if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return f.def.StartManyTx(ctx, tx, f.o, starts)
			}); err != nil {
				t.Fatal(err)
			}
			for i := range 3 {
				m, o := fmt.Sprintf("many-%d", i), fmt.Sprintf("one-%d", i)
				if got, want := normalize(f.state(t, m), m), normalize(f.state(t, o), o); got != want {
					t.Errorf("saga %d started with others:\n%s\nalone:\n%s", i, got, want)
				}
				var commands int
				if err := f.db.QueryRow(ctx, `SELECT count(*) FROM troupe_outbox WHERE topic = 'customer.commands' AND subject = $1`, m).Scan(&commands); err != nil {
					t.Fatal(err)
				}
				if commands != 1 {
					t.Errorf("saga %d: %d commands in the outbox, want 1", i, commands)
				}
			}
		})
	}
}

func TestStartManyTx_AnIDTakenOrGivenTwiceIsErrExistsAndTheRollbackLeavesNothing(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			ctx := context.Background()
			f.start(t, "taken", batchData{})
			for _, ids := range [][]string{{"new-1", "taken"}, {"new-2", "new-2"}} {
				var starts []Start[batchData]
				for _, id := range ids {
					starts = append(starts, Start[batchData]{ID: id})
				}
				err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.def.StartManyTx(ctx, tx, f.o, starts) })
				if !errors.Is(err, ErrExists) {
					t.Fatalf("StartManyTx(%v) = %v, want ErrExists", ids, err)
				}
				if _, err := f.o.Get(ctx, ids[0]); !errors.Is(err, sqldb.ErrNoRows) {
					t.Errorf("%s after the rolled-back start: %v, want no such saga", ids[0], err)
				}
			}
			var rows int
			if err := f.db.QueryRow(ctx, `SELECT (SELECT count(*) FROM troupe_outbox) + (SELECT count(*) FROM troupe_timers) + (SELECT count(*) FROM troupe_saga_history WHERE saga_id <> 'taken')`).Scan(&rows); err != nil {
				t.Fatal(err)
			}
			if rows != 2 { // the taken saga's command and deadline
				t.Errorf("%d outbox, timer and history rows besides the first saga's, want only its command and deadline", rows)
			}
		})
	}
}

// A saga started (StartTx) by a local step of a batch of sagas runs
// without a batch of its own, yet its outbox.Add calls are kept by the
// batch's (outbox.Defer): when its local step refuses, the message it added
// goes with its other writes.
func TestStartManyTx_ARefusedStepOfASagaStartedByALocalStepPublishesNothing(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			child := &Definition[batchData]{Name: "child", Steps: []Step[batchData]{
				{Name: "refuse", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData) error {
					ev := message.New("/order", "child.refused-step", nil)
					ev.Subject = id
					if err := outbox.Add(ctx, tx, "child.events", ev); err != nil {
						return err
					}
					return Refuse(errors.New("no"))
				}},
			}}
			if err := f.o.Register(child); err != nil {
				t.Fatal(err)
			}
			parent := &Definition[batchData]{Name: "parent", Steps: []Step[batchData]{
				{Name: "spawn", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData) error {
					return child.StartTx(ctx, tx, f.o, id+"-child", batchData{})
				}},
				{Name: "reserve", Topic: "customer.commands", Command: "reserve"},
			}}
			if err := f.o.Register(parent); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return parent.StartManyTx(ctx, tx, f.o, []Start[batchData]{{ID: "p1"}, {ID: "p2"}})
			}); err != nil {
				t.Fatal(err)
			}
			var n int
			if err := f.db.QueryRow(ctx, `SELECT count(*) FROM troupe_outbox WHERE topic = 'child.events'`).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Errorf("%d messages of refused (rolled back) child steps are in the outbox, want 0", n)
			}
		})
	}
}
