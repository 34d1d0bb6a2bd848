package flow_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

func TestTracker_CompletedAndFailedFlowsHaveTheirStatusReasonAndServices(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		clock := clocktest.New(t0)
		tr := newTracker(t, db, clock)
		ok, ko := completed("o-1", t0), failed("o-2", t0.Add(time.Second), "credit limit exceeded")
		clock.Advance(5 * time.Second)
		mustAck(t, deliver(tr.Handler(), append(ok, ko...)...))

		f := get(t, tr, ok[0].ID)
		if f.Name != "shop.create-order" || f.Status != flow.Completed || f.Reason != "" || f.Events != 4 {
			t.Errorf("completed flow: %+v", f)
		}
		if !f.StartedAt.Equal(t0) || !f.EndedAt.Equal(ok[3].Time) || !f.UpdatedAt.Equal(clock.Now()) {
			t.Errorf("completed flow: started %v ended %v updated %v; want %v, %v, %v", f.StartedAt, f.EndedAt, f.UpdatedAt, t0, ok[3].Time, clock.Now())
		}
		if want := []string{"/services/order", "/services/customer", "/services/inventory"}; !equal(f.Services, want) {
			t.Errorf("services %q, want %q", f.Services, want)
		}
		f = get(t, tr, ko[0].ID)
		if f.Status != flow.Failed || f.Reason != "credit limit exceeded" || f.Events != 3 || !f.EndedAt.Equal(ko[2].Time) {
			t.Errorf("failed flow: %+v", f)
		}
		if _, err := tr.Get(context.Background(), "no-such-flow"); !errors.Is(err, flow.ErrUnknownFlow) {
			t.Errorf("Get of an unknown flow: %v, want ErrUnknownFlow", err)
		}
		if _, err := tr.History(context.Background(), "no-such-flow"); !errors.Is(err, flow.ErrUnknownFlow) {
			t.Errorf("History of an unknown flow: %v, want ErrUnknownFlow", err)
		}
	})
}

func TestTracker_DuplicateDeliveriesChangeNothing(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		clock := clocktest.New(t0)
		tr := newTracker(t, db, clock)
		msgs := completed("o-1", t0)
		id := msgs[0].ID

		// The step twice in one batch, then the whole flow redelivered.
		mustAck(t, deliver(tr.Handler(), msgs[0], msgs[1], msgs[1].Clone()))
		mustAck(t, deliver(tr.Handler(), msgs[2], msgs[3]))
		before, beforeHistory := get(t, tr, id), history(t, tr, id)
		clock.Advance(time.Minute)
		mustAck(t, deliver(tr.Handler(), msgs...))

		after := get(t, tr, id)
		if after.Events != 4 || after.Status != flow.Completed || !after.UpdatedAt.Equal(before.UpdatedAt) {
			t.Errorf("after duplicates: %+v; before: %+v", after, before)
		}
		afterHistory := history(t, tr, id)
		if len(afterHistory) != 4 || !equal(types(afterHistory), types(beforeHistory)) {
			t.Errorf("history after duplicates %q, before %q", types(afterHistory), types(beforeHistory))
		}
		if st := tr.Stats(); st.Recorded != 4 || st.Duplicates != 5 || st.Ignored != 0 {
			t.Errorf("stats %+v, want 4 recorded, 5 duplicates", st)
		}
	})
}

func TestTracker_OutOfOrderMessagesStillMakeOneFlowInCausalOrder(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))
		msgs := completed("o-1", t0)
		id := msgs[0].ID
		// The services' clocks disagree: the inventory's reservation
		// carries a time before the credit reservation that caused it.
		msgs[2].Time = t0.Add(500 * time.Millisecond)
		msgs[1].Time = t0.Add(900 * time.Millisecond)

		// The completion arrives first, alone.
		mustAck(t, deliver(tr.Handler(), msgs[3]))
		f := get(t, tr, id)
		if f.Name != "shop.create-order" || f.Status != flow.Completed || f.Events != 1 {
			t.Errorf("flow known by its completion only: %+v", f)
		}
		// Then the rest, newest first.
		mustAck(t, deliver(tr.Handler(), msgs[2], msgs[1]))
		mustAck(t, deliver(tr.Handler(), msgs[0]))

		f = get(t, tr, id)
		if f.Status != flow.Completed || f.Events != 4 || !f.StartedAt.Equal(t0) || !f.EndedAt.Equal(msgs[3].Time) {
			t.Errorf("flow after every message: %+v", f)
		}
		list, err := tr.List(context.Background(), flow.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		if !equal(ids(list), []string{id}) {
			t.Errorf("List: %q, want the one flow %q", ids(list), id)
		}
		h := history(t, tr, id)
		if want := typesOf(msgs); !equal(types(h), want) {
			t.Errorf("history %q, want causal order %q", types(h), want)
		}
		for i, e := range h {
			m := msgs[i]
			if e.MessageID != m.ID || e.Source != m.Source || e.CausationID != m.CausationID || e.Subject != "o-1" || !e.Time.Equal(m.Time) {
				t.Errorf("event %d: %+v, want message %+v", i, e, m)
			}
		}
		if roles := [4]flow.Role{h[0].Role, h[1].Role, h[2].Role, h[3].Role}; roles != [4]flow.Role{flow.RoleStart, flow.RoleStep, flow.RoleStep, flow.RoleComplete} {
			t.Errorf("roles %q", roles)
		}
	})
}

func TestTracker_FirstEndDecidesAndALaterContradictingEndIsFlagged(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))

		// o-1 is approved, then rejected in a later batch.
		ok := completed("o-1", t0)
		mustAck(t, deliver(tr.Handler(), ok...))
		rejected := next("/services/order", orderRejected, ok[3], time.Second)
		rejected.Extensions = map[string]string{flow.ExtReason: "out of stock"}
		mustAck(t, deliver(tr.Handler(), rejected))

		f := get(t, tr, ok[0].ID)
		if f.Status != flow.Completed || f.Reason != "also failed by shop.order.rejected: out of stock" || !f.EndedAt.Equal(ok[3].Time) || f.Events != 5 {
			t.Errorf("approved then rejected: %+v", f)
		}
		h := history(t, tr, ok[0].ID)
		if len(h) != 5 || h[4].Type != orderRejected || !h[4].Contradicts || h[3].Contradicts {
			t.Errorf("history: %+v", h)
		}

		// o-2 is rejected, then approved twice, all in one batch.
		ko := failed("o-2", t0, "credit limit exceeded")
		approved1 := next("/services/order", orderApproved, ko[1], 2*time.Second)
		approved2 := next("/services/order", orderApproved, ko[1], 3*time.Second)
		mustAck(t, deliver(tr.Handler(), append(ko, approved1, approved2)...))
		f = get(t, tr, ko[0].ID)
		want := "credit limit exceeded; also completed by shop.order.approved; also completed by shop.order.approved"
		if f.Status != flow.Failed || f.Reason != want {
			t.Errorf("rejected then approved: status %s, reason %q; want failed, %q", f.Status, f.Reason, want)
		}
	})
}

func TestTracker_RunningFlowPastItsDeadlineIsStalled(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		db, _ := trackerDB(t, kind)
		clock := clocktest.New(t0)
		tr := newTracker(t, db, clock) // deadline 10 minutes
		slow := completed("o-slow", t0)
		fresh := completed("o-fresh", t0.Add(8*time.Minute))
		mustAck(t, deliver(tr.Handler(), slow[0], slow[1], fresh[0]))

		list := func(s flow.Status) []string {
			t.Helper()
			fs, err := tr.List(ctx, flow.Filter{Status: s})
			if err != nil {
				t.Fatal(err)
			}
			return ids(fs)
		}
		clock.Set(t0.Add(10 * time.Minute))
		if s := get(t, tr, slow[0].ID).Status; s != flow.Running {
			t.Errorf("at its deadline: %s, want running", s)
		}
		if got := list(flow.Stalled); len(got) != 0 {
			t.Errorf("stalled at the deadline: %q", got)
		}
		clock.Advance(time.Second)
		if s := get(t, tr, slow[0].ID).Status; s != flow.Stalled {
			t.Errorf("past its deadline: %s, want stalled", s)
		}
		if got := list(flow.Stalled); !equal(got, []string{slow[0].ID}) {
			t.Errorf("stalled: %q, want %q", got, slow[0].ID)
		}
		if got := list(flow.Running); !equal(got, []string{fresh[0].ID}) {
			t.Errorf("running: %q, want only %q", got, fresh[0].ID)
		}
		// Completed late, it is no longer stalled.
		mustAck(t, deliver(tr.Handler(), slow[2], slow[3]))
		if s := get(t, tr, slow[0].ID).Status; s != flow.Completed {
			t.Errorf("completed late: %s, want completed", s)
		}
		if got := list(flow.Stalled); len(got) != 0 {
			t.Errorf("stalled after the completion: %q", got)
		}
	})
}

func TestTracker_ListFiltersByNameAndStatusOldestFirst(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		db, _ := trackerDB(t, kind)
		clock := clocktest.New(t0.Add(time.Hour))
		tr := newTracker(t, db, clock)
		if err := tr.Define(flow.Definition{Name: "shop.refund", Starts: []string{"shop.refund.requested"}, Completes: []string{"shop.refund.paid"}}); err != nil {
			t.Fatal(err)
		}
		ok1, ok2 := completed("o-1", t0.Add(2*time.Minute)), completed("o-2", t0)
		ko := failed("o-3", t0.Add(time.Minute), "no")
		run := completed("o-4", t0.Add(50*time.Minute))[:2] // running, within its deadline
		refund := message.New("/services/payment", "shop.refund.requested", nil)
		refund.Time = t0.Add(3 * time.Minute)
		var all []*message.Message
		for _, ms := range [][]*message.Message{ok1, ok2, ko, run, {refund}} {
			all = append(all, ms...)
		}
		mustAck(t, deliver(tr.Handler(), all...))

		for _, tc := range []struct {
			name   string
			filter flow.Filter
			want   []string
		}{
			{"everything, oldest first", flow.Filter{}, []string{ok2[0].ID, ko[0].ID, ok1[0].ID, refund.ID, run[0].ID}},
			{"completed", flow.Filter{Status: flow.Completed}, []string{ok2[0].ID, ok1[0].ID}},
			{"completed, limit 1", flow.Filter{Status: flow.Completed, Limit: 1}, []string{ok2[0].ID}},
			{"failed", flow.Filter{Status: flow.Failed}, []string{ko[0].ID}},
			{"running (refunds never stall)", flow.Filter{Status: flow.Running}, []string{refund.ID, run[0].ID}},
			{"running orders", flow.Filter{Name: "shop.create-order", Status: flow.Running}, []string{run[0].ID}},
			{"refunds", flow.Filter{Name: "shop.refund"}, []string{refund.ID}},
			{"stalled: none", flow.Filter{Status: flow.Stalled}, nil},
		} {
			t.Run(tc.name, func(t *testing.T) {
				got, err := tr.List(ctx, tc.filter)
				if err != nil {
					t.Fatal(err)
				}
				if !equal(ids(got), tc.want) {
					t.Errorf("List(%+v) = %q, want %q", tc.filter, ids(got), tc.want)
				}
			})
		}
		got, err := tr.List(ctx, flow.Filter{Status: flow.Failed})
		if err != nil || len(got) != 1 || got[0].Reason != "no" || len(got[0].Services) != 2 {
			t.Errorf("listed failed flow %+v, %v: want its reason and services", got, err)
		}
		for _, bad := range []flow.Filter{{Status: "parked"}, {Limit: -1}, {Limit: 1001}} {
			if _, err := tr.List(ctx, bad); !errors.Is(err, flow.ErrInvalidFilter) {
				t.Errorf("List(%+v): %v, want ErrInvalidFilter", bad, err)
			}
		}
	})
}

func TestTracker_RecordTxRollsBackWithTheCallersTransaction(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))
		if _, err := db.Exec(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY)`); err != nil {
			t.Fatal(err)
		}
		place := func(order string, fail error) (*message.Message, error) {
			m := start(order, t0)
			return m, db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if _, err := tx.Exec(ctx, `INSERT INTO orders (id) VALUES ($1)`, order); err != nil {
					return err
				}
				if err := tr.RecordTx(ctx, tx, m); err != nil {
					return err
				}
				return fail
			})
		}
		boom := errors.New("payment declined")
		lost, err := place("o-1", boom)
		if !errors.Is(err, boom) {
			t.Fatal(err)
		}
		if _, err := tr.Get(ctx, lost.ID); !errors.Is(err, flow.ErrUnknownFlow) {
			t.Errorf("flow of a rolled-back transaction: %v, want ErrUnknownFlow", err)
		}
		kept, err := place("o-2", nil)
		if err != nil {
			t.Fatal(err)
		}
		if f := get(t, tr, kept.ID); f.Status != flow.Running || f.Events != 1 {
			t.Errorf("flow of a committed transaction: %+v", f)
		}
		err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			return tr.RecordTx(ctx, tx, start("o-3", t0), &message.Message{Source: "/services/order", Type: orderCreated})
		})
		if !errors.Is(err, flow.ErrInvalidMessage) {
			t.Errorf("RecordTx of a message without id: %v, want ErrInvalidMessage", err)
		}
	})
}

func TestTracker_MessagesOfNoFlowAreAckedAndCountedAndMalformedOnesDeadLettered(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))
		ok := completed("o-1", t0)
		mustAck(t, deliver(tr.Handler(), ok[0]))

		uncorrelated := message.New("/services/customer", creditOK, nil) // a step, no correlation id
		stranger := message.New("/services/mail", "shop.mail.sent", nil) // undeclared, unknown flow
		stranger.CorrelationID = "someone-else"
		noted := next("/services/audit", "shop.audit.noted", ok[0], time.Second) // undeclared, known flow
		batch := deliver(tr.Handler(), uncorrelated, nil, stranger, &message.Message{Source: "/x", Type: orderCreated}, noted,
			&message.Message{ID: "1", Type: orderCreated})

		for i, want := range []struct {
			s      broker.Settlement
			reason string
		}{{broker.Acked, ""}, {broker.DeadLettered, "flow: no message"}, {broker.Acked, ""},
			{broker.DeadLettered, "flow: message has no id"}, {broker.Acked, ""}, {broker.DeadLettered, `flow: message "1" has no source`}} {
			if s, _, reason := batch[i].Settlement(); s != want.s || reason != want.reason {
				t.Errorf("delivery %d: %s (%q), want %s (%q)", i, s, reason, want.s, want.reason)
			}
		}
		if st := tr.Stats(); st.Recorded != 2 || st.Ignored != 2 || st.DeadLettered != 3 {
			t.Errorf("stats %+v, want 2 recorded, 2 ignored, 3 dead-lettered", st)
		}
		h := history(t, tr, ok[0].ID)
		if !equal(types(h), []string{orderCreated, "shop.audit.noted"}) || h[1].Role != flow.RoleOther {
			t.Errorf("history %+v: want the start and the undeclared message of the known flow", h)
		}
		if _, err := tr.Get(context.Background(), "someone-else"); !errors.Is(err, flow.ErrUnknownFlow) {
			t.Errorf("a flow was made of an undeclared message: %v", err)
		}
	})
}

func TestTracker_MessagesOfAnotherDefinitionDoNotEndTheFlow(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))
		if err := tr.Define(flow.Definition{Name: "shop.ship", Starts: []string{"shop.shipment.requested"}, Fails: []string{"shop.shipment.lost"}}); err != nil {
			t.Fatal(err)
		}
		msgs := completed("o-1", t0)
		shipped := next("/services/shipping", "shop.shipment.requested", msgs[3], time.Second)
		lost := next("/services/shipping", "shop.shipment.lost", shipped, time.Second)
		mustAck(t, deliver(tr.Handler(), msgs[0], msgs[1]))
		mustAck(t, deliver(tr.Handler(), lost, msgs[2], shipped))
		f := get(t, tr, msgs[0].ID)
		if f.Name != "shop.create-order" || f.Status != flow.Running || f.Events != 5 {
			t.Errorf("order flow with a lost shipment: %+v, want running with 5 events", f)
		}
		mustAck(t, deliver(tr.Handler(), msgs[3]))
		if f := get(t, tr, msgs[0].ID); f.Status != flow.Completed || f.Reason != "" {
			t.Errorf("after the approval: %+v, want completed", f)
		}
		if h := history(t, tr, msgs[0].ID); h[5].Type != "shop.shipment.lost" || h[5].Contradicts {
			t.Errorf("history %+v", h)
		}
	})
}

func TestTracker_TwoTrackersRecordingConcurrentlyLoseNoUpdate(t *testing.T) {
	// Two instances of the tracker service, each with its own connections,
	// receive every message of 30 flows (a redelivery to the other member,
	// a duplicate publish), in different orders and batches, at once.
	forEachDialect(t, func(t *testing.T, kind string) {
		db, url := trackerDB(t, kind)
		clock := clocktest.New(t0)
		trackers := []*flow.Tracker{newTracker(t, db, clock), newTracker(t, open(t, url), clock)}
		var msgs []*message.Message
		var flows [][]*message.Message
		for i := range 30 {
			ms := completed(fmt.Sprint("o-", i), t0)
			if i%3 == 0 {
				ms = failed(fmt.Sprint("o-", i), t0, "refused")
			}
			flows = append(flows, ms)
			msgs = append(msgs, ms...)
		}
		var wg sync.WaitGroup
		var failedBatches atomic.Int32
		for n, tr := range trackers {
			rng := rand.New(rand.NewPCG(uint64(n), 7))
			shuffled := append([]*message.Message(nil), msgs...)
			rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
			wg.Go(func() {
				h := tr.Handler()
				for len(shuffled) > 0 {
					size := min(len(shuffled), 1+rng.IntN(12))
					if batch := deliver(h, shuffled[:size]...); !acked(batch) {
						failedBatches.Add(1) // a deadlock victim, say: redeliver it
						continue
					}
					shuffled = shuffled[size:]
				}
			})
		}
		wg.Wait()
		if n := failedBatches.Load(); n > 0 {
			t.Errorf("%d batches failed and were redelivered; overlapping batches must wait for each other, not deadlock", n)
		}

		var recorded, duplicates uint64
		for _, tr := range trackers {
			st := tr.Stats()
			recorded, duplicates = recorded+st.Recorded, duplicates+st.Duplicates
		}
		if recorded != uint64(len(msgs)) || duplicates != uint64(len(msgs)) {
			t.Errorf("recorded %d and duplicates %d, want %d each", recorded, duplicates, len(msgs))
		}
		for _, ms := range flows {
			f := get(t, trackers[0], ms[0].ID)
			want := flow.Completed
			if len(ms) == 3 {
				want = flow.Failed
			}
			if f.Status != want || f.Events != len(ms) || !f.StartedAt.Equal(t0) || len(f.Services) != len(ms)-1 {
				t.Errorf("flow %s: %+v, want %s with %d events", ms[0].Subject, f, want, len(ms))
			}
			if h := history(t, trackers[1], ms[0].ID); !equal(types(h), typesOf(ms)) {
				t.Errorf("flow %s: history %q, want %q", ms[0].Subject, types(h), typesOf(ms))
			}
		}
	})
}

// acked reports whether every delivery of batch was acknowledged.
func acked(batch []*broker.Delivery) bool {
	for _, d := range batch {
		if s, _, _ := d.Settlement(); s != broker.Acked {
			return false
		}
	}
	return true
}

func TestTracker_PruneDeletesEndedFlowsOnly(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		db, _ := trackerDB(t, kind)
		tr := newTracker(t, db, clocktest.New(t0))
		var ended []string
		for i := range 3 {
			ms := completed(fmt.Sprint("o-", i), t0.Add(time.Duration(i)*time.Hour))
			mustAck(t, deliver(tr.Handler(), ms...))
			ended = append(ended, ms[0].ID)
		}
		running := completed("o-run", t0)[:1]
		mustAck(t, deliver(tr.Handler(), running...))

		n, err := tr.Prune(ctx, t0.Add(90*time.Minute), 10) // the first two ended before
		if err != nil || n != 2 {
			t.Fatalf("Prune: %d, %v; want 2", n, err)
		}
		for i, id := range ended {
			_, err := tr.Get(ctx, id)
			if gone := errors.Is(err, flow.ErrUnknownFlow); gone != (i < 2) {
				t.Errorf("flow %d: Get error %v after pruning", i, err)
			}
		}
		var events int
		if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM troupe_flow_events`).Scan(&events); err != nil {
			t.Fatal(err)
		}
		if events != 5 {
			t.Errorf("%d events left, want 5 (4 of the last ended flow, 1 of the running one)", events)
		}
		if _, err := tr.Prune(ctx, t0.Add(1000*time.Hour), 0); err == nil {
			t.Error("Prune with limit 0 succeeded")
		}
	})
}

func TestDefine_RefusesAnInvalidDefinitionNamingEveryProblem(t *testing.T) {
	db, _ := trackerDB(t, "sqlite")
	tr := newTracker(t, db, clocktest.New(t0))
	for _, tc := range []struct {
		name string
		def  flow.Definition
		want []string
	}{
		{"empty", flow.Definition{}, []string{"empty Name", "no Starts type", "no Completes or Fails type"}},
		{"taken name and type", flow.Definition{Name: "shop.create-order", Starts: []string{orderCreated}, Fails: []string{"x"}},
			[]string{`named "shop.create-order" is defined already`, `"shop.order.created" belongs to definition "shop.create-order"`}},
		{"one type, two roles", flow.Definition{Name: "a", Starts: []string{"a.b"}, Completes: []string{"a.b", ""}, Deadline: -time.Second},
			[]string{`"a.b" is in Starts and in Completes`, "empty type in Completes", "negative Deadline"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tr.Define(tc.def)
			if !errors.Is(err, flow.ErrInvalidDefinition) {
				t.Fatalf("Define: %v, want ErrInvalidDefinition", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	if err := tr.Define(flow.Definition{Name: "a", Starts: []string{"a.b"}, Completes: []string{"a.c"}}); err != nil {
		t.Errorf("a valid definition after refused ones: %v", err)
	}
}

func TestTracker_BatchThatCannotBeRecordedIsNakedWithBackoff(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		ctx := context.Background()
		db, _ := trackerDB(t, kind)
		tr, err := flow.New(db, flow.Config{Backoff: func(attempt int) time.Duration { return time.Duration(attempt) * time.Second }})
		if err != nil {
			t.Fatal(err)
		}
		if err := tr.Define(createOrder(0)); err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(ctx, `ALTER TABLE troupe_flow_events RENAME TO lost`); err != nil {
			t.Fatal(err)
		}
		msgs := completed("o-1", t0)
		batch := make([]*broker.Delivery, len(msgs))
		for i, m := range msgs {
			batch[i] = &broker.Delivery{Msg: m, Topic: "shop.orders", Attempt: 3}
		}
		tr.Handler()(ctx, batch)
		for i, d := range batch {
			if s, delay, _ := d.Settlement(); s != broker.Naked || delay != 3*time.Second {
				t.Errorf("delivery %d: %s after %v, want naked after 3s", i, s, delay)
			}
		}
		if st := tr.Stats(); st != (flow.Stats{}) {
			t.Errorf("stats %+v after a failed batch, want zero", st)
		}
	})
}
