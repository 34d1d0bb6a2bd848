package saga_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// customerService is a participant with a credit limit: the action
// reserves an amount, refusing beyond the limit; the compensation releases
// it. Every run of a side is counted, to prove which ones ran.
type customerService struct {
	db                 *sqldb.DB
	p                  *saga.Participant
	actions, releases  atomic.Int32
	failNext           atomic.Bool // the next action fails with a transient error
	limit              int
	replyTopic, source string
}

type reserveInput struct {
	Customer string `json:"customer"`
	Amount   int    `json:"amount"`
}

func newCustomerService(t *testing.T, kind string) *customerService {
	t.Helper()
	ctx := context.Background()
	url := "sqlite://" + filepath.Join(t.TempDir(), "customer.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := inbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	if err := outbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE customers (id TEXT PRIMARY KEY, credit_limit INTEGER NOT NULL, reserved INTEGER NOT NULL)`,
		`INSERT INTO customers VALUES ('alice', 100, 0)`,
	} {
		if _, err := db.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := saga.NewParticipant(ib, "/services/customer")
	if err != nil {
		t.Fatal(err)
	}
	c := &customerService{db: db, p: p, limit: 100, replyTopic: "orders.replies", source: "/services/order"}
	reserve := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
		c.actions.Add(1)
		if c.failNext.CompareAndSwap(true, false) {
			_, _ = tx.Exec(ctx, `UPDATE customers SET reserved = reserved + 1000 WHERE id = 'alice'`)
			return saga.Reply{}, errors.New("database hiccup")
		}
		in, err := decodeInput(cmd)
		if err != nil {
			return saga.Reply{}, inbox.Permanent(err)
		}
		n, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved + $1 WHERE id = $2 AND reserved + $1 <= credit_limit`, in.Amount, in.Customer)
		if err != nil {
			return saga.Reply{}, err
		}
		if n == 0 {
			return saga.Failure("credit limit exceeded"), nil
		}
		return saga.Success(map[string]int{"reserved": in.Amount}), nil
	}
	release := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
		c.releases.Add(1)
		in, err := decodeInput(cmd)
		if err != nil {
			return saga.Reply{}, inbox.Permanent(err)
		}
		_, err = tx.Exec(ctx, `UPDATE customers SET reserved = reserved - $1 WHERE id = $2`, in.Amount, in.Customer)
		return saga.Success(nil), err
	}
	if err := p.Handle("shop.customer.reserve-credit", reserve, release); err != nil {
		t.Fatal(err)
	}
	return c
}

func decodeInput(cmd *saga.Command) (reserveInput, error) {
	var in reserveInput
	err := json.Unmarshal(cmd.Msg.Data, &in)
	return in, err
}

// command builds a command for saga id's reserve-credit step.
func (c *customerService) command(t *testing.T, sagaID string, op saga.Op, amount int) *message.Message {
	t.Helper()
	m, err := saga.NewCommand(c.source, "shop.customer.reserve-credit", sagaID, "reserve-credit", op, c.replyTopic, reserveInput{Customer: "alice", Amount: amount})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// deliver handles m as inbox.Handler does: claim, then the participant, in
// one transaction; it returns the participant's error.
func (c *customerService) deliver(t *testing.T, m *message.Message) error {
	t.Helper()
	ib, _ := inbox.New(c.db, inbox.Config{})
	return c.db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		first, err := ib.ClaimTx(ctx, tx, "customer", m)
		if err != nil || !first {
			return err
		}
		return c.p.HandleTx(message.WithCause(ctx, m), tx, m)
	})
}

func (c *customerService) reserved(t *testing.T) int {
	t.Helper()
	var n int
	if err := c.db.QueryRow(context.Background(), `SELECT reserved FROM customers WHERE id = 'alice'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// replies returns the replies in the participant's outbox, in order.
func (c *customerService) replies(t *testing.T) []*saga.ReplyMsg {
	t.Helper()
	rows, err := c.db.Query(context.Background(), `SELECT topic, envelope FROM troupe_outbox ORDER BY seq`)
	if err != nil {
		t.Fatal(err)
	}
	var out []*saga.ReplyMsg
	for rows.Next() {
		var topic string
		var env []byte
		if err := rows.Scan(&topic, &env); err != nil {
			t.Fatal(err)
		}
		if topic != c.replyTopic {
			t.Fatalf("a reply went to %q, want %q", topic, c.replyTopic)
		}
		m, err := outbox.DecodeEnvelope(env)
		if err != nil {
			t.Fatal(err)
		}
		r, err := saga.ParseReply(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestParticipant_ActionReservesAndRepliesInTheSameTransaction(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			cmd := c.command(t, "saga-1", saga.Action, 30)
			if err := c.deliver(t, cmd); err != nil {
				t.Fatal(err)
			}
			if got := c.reserved(t); got != 30 {
				t.Fatalf("reserved %d, want 30", got)
			}
			rs := c.replies(t)
			if len(rs) != 1 {
				t.Fatalf("%d replies, want 1", len(rs))
			}
			r := rs[0]
			if r.Outcome != saga.Succeeded || r.SagaID != "saga-1" || r.Step != "reserve-credit" || r.Op != saga.Action {
				t.Fatalf("reply %+v", r)
			}
			if string(r.Msg.Data) != `{"reserved":30}` {
				t.Fatalf("reply data %s", r.Msg.Data)
			}
			if r.Msg.CorrelationID != "saga-1" || r.Msg.CausationID != cmd.ID || r.Msg.Subject != "saga-1" {
				t.Fatalf("reply correlation %q causation %q subject %q: want the saga id, the command's id, the saga id",
					r.Msg.CorrelationID, r.Msg.CausationID, r.Msg.Subject)
			}
		})
	}
}

func TestParticipant_RefusalIsARepliedAndRecordedAnswer(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			if err := c.deliver(t, c.command(t, "saga-big", saga.Action, 500)); err != nil {
				t.Fatal(err)
			}
			if got := c.reserved(t); got != 0 {
				t.Fatalf("reserved %d after a refusal, want 0", got)
			}
			// The saga's retry (a new command for the same step) gets no
			// second run and no second reply: the first answer stands.
			if err := c.deliver(t, c.command(t, "saga-big", saga.Action, 500)); err != nil {
				t.Fatal(err)
			}
			rs := c.replies(t)
			if len(rs) != 1 || rs[0].Outcome != saga.Failed || rs[0].Reason != "credit limit exceeded" {
				t.Fatalf("replies %+v: want one failure with its reason", rs)
			}
			if n := c.actions.Load(); n != 1 {
				t.Fatalf("the action ran %d times, want 1", n)
			}
		})
	}
}

func TestParticipant_RepeatedCommandsHaveNoSecondEffect(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			act := c.command(t, "saga-1", saga.Action, 30)
			for _, m := range []*message.Message{act, act, c.command(t, "saga-1", saga.Action, 30)} { // redelivery, then a retry
				if err := c.deliver(t, m); err != nil {
					t.Fatal(err)
				}
			}
			comp := c.command(t, "saga-1", saga.Compensation, 30)
			for _, m := range []*message.Message{comp, c.command(t, "saga-1", saga.Compensation, 30)} {
				if err := c.deliver(t, m); err != nil {
					t.Fatal(err)
				}
			}
			if got := c.reserved(t); got != 0 {
				t.Fatalf("reserved %d after reserve and release, want 0", got)
			}
			if a, r := c.actions.Load(), c.releases.Load(); a != 1 || r != 1 {
				t.Fatalf("action ran %d times, compensation %d: want once each", a, r)
			}
			rs := c.replies(t)
			// A repeated action gets no second reply (the first carries its
			// data); a repeated compensation is answered success again.
			if len(rs) != 3 || rs[0].Op != saga.Action || rs[1].Op != saga.Compensation || rs[1].Outcome != saga.Succeeded ||
				rs[2].Op != saga.Compensation || rs[2].Outcome != saga.Succeeded {
				t.Fatalf("replies %+v: want one for the action, one per compensation", rs)
			}
		})
	}
}

func TestParticipant_CompensationBeforeActionIsNullAndTheLateActionIsRefused(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			if err := c.deliver(t, c.command(t, "saga-2", saga.Compensation, 30)); err != nil {
				t.Fatal(err)
			}
			if err := c.deliver(t, c.command(t, "saga-2", saga.Action, 30)); err != nil {
				t.Fatal(err)
			}
			if got := c.reserved(t); got != 0 {
				t.Fatalf("reserved %d: the late action reserved credit no compensation will release", got)
			}
			if a, r := c.actions.Load(), c.releases.Load(); a != 0 || r != 0 {
				t.Fatalf("action ran %d times, compensation %d: want neither", a, r)
			}
			rs := c.replies(t)
			if len(rs) != 2 {
				t.Fatalf("%d replies, want 2", len(rs))
			}
			if rs[0].Op != saga.Compensation || rs[0].Outcome != saga.Succeeded {
				t.Fatalf("the null compensation's reply %+v: want success", rs[0])
			}
			if rs[1].Op != saga.Action || rs[1].Outcome != saga.Failed || !strings.Contains(rs[1].Reason, "compensated") {
				t.Fatalf("the late action's reply %+v: want a refusal", rs[1])
			}
		})
	}
}

func TestParticipant_TransientErrorRollsBackSoTheRedeliveryRunsAgain(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			c.failNext.Store(true)
			cmd := c.command(t, "saga-3", saga.Action, 30)
			if err := c.deliver(t, cmd); err == nil {
				t.Fatal("the failing action's error was not returned")
			}
			if got, n := c.reserved(t), len(c.replies(t)); got != 0 || n != 0 {
				t.Fatalf("after a transient error: reserved %d, %d replies; want nothing written", got, n)
			}
			if err := c.deliver(t, cmd); err != nil { // the broker's redelivery
				t.Fatal(err)
			}
			if got := c.reserved(t); got != 30 {
				t.Fatalf("reserved %d after the redelivery, want 30", got)
			}
			if rs := c.replies(t); len(rs) != 1 || rs[0].Outcome != saga.Succeeded {
				t.Fatalf("replies %+v: want one success", rs)
			}
		})
	}
}

func TestParticipant_MessagesItCannotHandleArePermanentFailures(t *testing.T) {
	c := newCustomerService(t, "sqlite")
	plain := message.New("/x", "shop.customer.reserve-credit", nil)
	unknown, err := saga.NewCommand("/x", "shop.customer.unknown", "s", "step", saga.Action, "r", nil)
	if err != nil {
		t.Fatal(err)
	}
	badOp := c.command(t, "s", saga.Action, 1)
	badOp.Extensions[saga.ExtOp] = "undo"
	for name, m := range map[string]*message.Message{"no saga attributes": plain, "unknown type": unknown, "unknown op": badOp} {
		err := c.deliver(t, m)
		if !errors.Is(err, inbox.ErrPermanent) {
			t.Errorf("%s: %v, want a permanent error", name, err)
		}
	}
	for name, m := range map[string]*message.Message{"no saga attributes": plain, "unknown op": badOp} {
		if _, err := saga.ParseCommand(m); !errors.Is(err, saga.ErrNotACommand) {
			t.Errorf("ParseCommand, %s: %v, want ErrNotACommand", name, err)
		}
	}
	if n := c.actions.Load(); n != 0 {
		t.Fatalf("the action ran %d times for messages it cannot handle", n)
	}
}

// End to end through the embedded broker: commands published to the
// participant's topic, handled by its subscription, replies relayed from its
// outbox to the reply topic; the command published twice (same id) and
// retried (new id) still reserves once.
func TestParticipant_ThroughTheBrokerRepliesOncePerSide(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := newCustomerService(t, "sqlite")
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "customer.commands", Group: "customer"}, c.p.Handler("customer"))
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Stop(ctx)
	relay, err := outbox.NewRelay(c.db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan struct{})
	go func() { defer close(relayDone); _ = relay.Run(relayCtx) }()
	defer func() { stopRelay(); <-relayDone }()

	got := make(chan *saga.ReplyMsg, 10)
	rsub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: c.replyTopic, Group: "order"}, func(ctx context.Context, ds []*broker.Delivery) {
		for _, d := range ds {
			r, err := saga.ParseReply(d.Msg)
			if err != nil {
				d.DeadLetter(err.Error())
				continue
			}
			got <- r
			d.Ack()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer rsub.Stop(ctx)

	act := c.command(t, "saga-9", saga.Action, 40)
	for _, m := range []*message.Message{act, act.Clone(), c.command(t, "saga-9", saga.Action, 40)} {
		if err := b.Publish(ctx, "customer.commands", m); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case r := <-got:
		if r.SagaID != "saga-9" || r.Op != saga.Action || r.Outcome != saga.Succeeded {
			t.Fatalf("reply %+v", r)
		}
	case <-ctx.Done():
		t.Fatal("no reply")
	}
	if err := b.Publish(ctx, "customer.commands", c.command(t, "saga-9", saga.Compensation, 40)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-got:
		if r.Op != saga.Compensation || r.Outcome != saga.Succeeded {
			t.Fatalf("reply %+v", r)
		}
	case <-ctx.Done():
		t.Fatal("no reply to the compensation")
	}
	if got := c.reserved(t); got != 0 {
		t.Fatalf("reserved %d, want 0", got)
	}
	if a, r := c.actions.Load(), c.releases.Load(); a != 1 || r != 1 {
		t.Fatalf("action ran %d times, compensation %d: want once each", a, r)
	}
	// The retry and the duplicate publish made no reply of their own.
	var all int
	if err := c.db.QueryRow(ctx, `SELECT count(*) FROM troupe_outbox`).Scan(&all); err != nil {
		t.Fatal(err)
	}
	if all != 2 {
		t.Fatalf("%d replies in the outbox, want 2", all)
	}
}

func TestParticipant_HandleBatchTxRepliesAndReservesAsCommandByCommandHandlingDoes(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			batch, single := newCustomerService(t, kind), newCustomerService(t, kind)
			// Before the batch: an action handled, and a compensation that
			// came before its action (a null compensation).
			for _, c := range []*customerService{batch, single} {
				for _, m := range []*message.Message{c.command(t, "dup", saga.Action, 10), c.command(t, "late", saga.Compensation, 5)} {
					if err := c.deliver(t, m); err != nil {
						t.Fatal(err)
					}
				}
			}
			cmds := func(c *customerService) []*message.Message {
				return []*message.Message{
					c.command(t, "new", saga.Action, 30),
					c.command(t, "dup", saga.Action, 10),   // a repeat: no second effect, no reply
					c.command(t, "late", saga.Action, 5),   // its compensation came first: refused
					c.command(t, "big", saga.Action, 200),  // over the limit: the step refuses
					c.command(t, "twice", saga.Action, 20), // twice in the batch: applied once
					c.command(t, "twice", saga.Action, 20),
					c.command(t, "new", saga.Compensation, 30),
					// A compensation that comes before its action in the
					// batch: null, and the late action refused.
					c.command(t, "early", saga.Compensation, 40),
					c.command(t, "early", saga.Action, 40),
				}
			}
			msgs := cmds(batch)
			if err := batch.db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
				return batch.p.HandleBatchTx(ctx, tx, msgs)
			}); err != nil {
				t.Fatal(err)
			}
			for _, m := range cmds(single) {
				if err := single.deliver(t, m); err != nil {
					t.Fatal(err)
				}
			}
			if b, s := batch.reserved(t), single.reserved(t); b != s || b != 30 {
				t.Errorf("reserved %d after the batch, %d command by command; want 30 (dup 10 + twice 20)", b, s)
			}
			if b, s := batch.actions.Load(), single.actions.Load(); b != s {
				t.Errorf("the action ran %d times in the batch, %d command by command", b, s)
			}
			describe := func(rs []*saga.ReplyMsg) []string {
				var out []string
				for _, r := range rs {
					out = append(out, r.SagaID+" "+r.Op.String()+" "+r.Outcome.String()+" "+r.Reason)
				}
				return out
			}
			if b, s := describe(batch.replies(t)), describe(single.replies(t)); strings.Join(b, "\n") != strings.Join(s, "\n") {
				t.Errorf("replies in the batch:\n%s\ncommand by command:\n%s", strings.Join(b, "\n"), strings.Join(s, "\n"))
			}
		})
	}
}
