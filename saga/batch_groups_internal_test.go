package saga

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// groupCase is a saga of the group definition and the replies it gets.
type groupCase struct {
	data    batchData
	replies func(id string) []*message.Message
}

// groupReply is a participant's reply to step of saga id.
func groupReply(t *testing.T, id, step string, op Op, r Reply) *message.Message {
	t.Helper()
	m, err := replyMessage("/customer", &Command{SagaID: id, Step: step, Op: op}, r)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestHandleRepliesTx_GroupRepliesInOneBatchEndAsRepliedOneByOne: replies to
// a parallel group's branches (one refused, one succeeding; both
// succeeding, then a local step that refuses) in one batch leave each saga
// as the same replies applied one by one do.
func TestHandleRepliesTx_GroupRepliesInOneBatchEndAsRepliedOneByOne(t *testing.T) {
	rep := groupReply
	compareGroupCases(t, []groupCase{
		{batchData{}, func(id string) []*message.Message {
			return []*message.Message{rep(t, id, "b1", Action, Failure("no")), rep(t, id, "b2", Action, Success(nil))}
		}},
		{batchData{Refuse: true}, func(id string) []*message.Message {
			return []*message.Message{rep(t, id, "b1", Action, Success(nil)), rep(t, id, "b2", Action, Success(nil))}
		}},
	})
}

// TestHandleRepliesTx_ADeadlineSentAndAnsweredInOneBatchIsCancelled: a
// reply that answers a command the same batch sent (here b2's
// compensation, sent when b1's refusal turned the group around; replies
// are matched by saga, step and side, not by attempt) cancels that
// command's deadline, as reply-by-reply handling does. The batch cancels
// its answered deadlines before it schedules its new ones, so the
// deadline it both scheduled and answered is left pending.
func TestHandleRepliesTx_ADeadlineSentAndAnsweredInOneBatchIsCancelled(t *testing.T) {
	rep := groupReply
	compareGroupCases(t, []groupCase{
		{batchData{}, func(id string) []*message.Message {
			return []*message.Message{rep(t, id, "b2", Action, Success(nil)), rep(t, id, "b1", Action, Failure("no")), rep(t, id, "b2", Compensation, Success(nil))}
		}},
	})
}

// compareGroupCases starts, per case, two sagas of a definition with a
// parallel group, applies the case's replies to one in a batch and to the
// other one by one, and compares them.
func compareGroupCases(t *testing.T, cases []groupCase) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			f := newBatchFixture(t, kind)
			ctx := context.Background()
			branch := func(name string) Step[batchData] {
				return Step[batchData]{Name: name, Topic: "customer.commands", Command: name, Deadline: time.Minute, MaxAttempts: 2}
			}
			def := &Definition[batchData]{
				Name: "group",
				Steps: []Step[batchData]{
					branch("first"),
					{Name: "fork", Parallel: []Step[batchData]{branch("b1"), branch("b2")}},
					{Name: "approve", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *batchData) error {
						if d.Refuse {
							return Refuse(fmt.Errorf("no"))
						}
						return nil
					}},
				},
			}
			if err := f.o.Register(def); err != nil {
				t.Fatal(err)
			}
			var batch []*message.Message
			for i, c := range cases {
				for _, p := range []string{"gb", "gs"} {
					id := fmt.Sprintf("%s-%d", p, i)
					if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, f.o, id, c.data) }); err != nil {
						t.Fatal(err)
					}
					// The first step answered: the group is forked.
					if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						return f.o.HandleReplyTx(ctx, tx, groupReply(t, id, "first", Action, Success(nil)))
					}); err != nil {
						t.Fatal(err)
					}
				}
				batch = append(batch, c.replies(fmt.Sprintf("gb-%d", i))...)
			}
			if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.o.HandleRepliesTx(ctx, tx, batch) }); err != nil {
				t.Fatal(err)
			}
			for i, c := range cases {
				s := fmt.Sprintf("gs-%d", i)
				for _, m := range c.replies(s) {
					if err := f.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return f.o.HandleReplyTx(ctx, tx, m) }); err != nil {
						t.Fatal(err)
					}
				}
				b := fmt.Sprintf("gb-%d", i)
				if got, want := normalize(f.state(t, b), b), normalize(f.state(t, s), s); got != want {
					t.Errorf("case %d in a batch:\n%s\none by one:\n%s", i, got, want)
				}
			}
		})
	}
}
