package flow_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// shop is a choreography of three services over an embedded NATS
// JetStream, each with its own database, inbox and outbox relay, and no
// orchestrator:
//
//	order:     places an order          -> shop.order.created   on shop.orders
//	customer:  on shop.order.created    -> shop.credit.reserved on shop.customers
//	                                       (or shop.credit.refused over 100)
//	inventory: on shop.credit.reserved  -> shop.stock.reserved  on shop.inventory
//	order:     on shop.stock.reserved   -> shop.order.approved  on shop.orders
//	           on shop.credit.refused   -> shop.order.rejected  on shop.orders
//
// A tracker, in a database of its own, consumes all three topics.
type shop struct {
	t       *testing.T
	ctx     context.Context
	broker  *natsjs.Broker
	orderDB *sqldb.DB
	tracker *flow.Tracker
	subs    []broker.Subscription
}

var shopTopics = []string{"shop.orders", "shop.customers", "shop.inventory"}

func newShop(t *testing.T, kind string) *shop {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); b.Close() })
	s := &shop{t: t, ctx: ctx, broker: b}

	// service opens a service's database and relays its outbox.
	service := func(name string) (*sqldb.DB, *inbox.Inbox) {
		db := open(t, dbURL(t, kind, name))
		for _, m := range []func(context.Context, *sqldb.DB) error{outbox.Migrate, inbox.Migrate} {
			if err := m(ctx, db); err != nil {
				t.Fatal(err)
			}
		}
		r, err := outbox.NewRelay(db, b, outbox.RelayConfig{Mode: outbox.Poll, PollInterval: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		relayCtx, stopRelay := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { _ = r.Run(relayCtx) })
		t.Cleanup(func() { stopRelay(); wg.Wait() }) // before the database closes
		ib, err := inbox.New(db, inbox.Config{})
		if err != nil {
			t.Fatal(err)
		}
		return db, ib
	}
	// react subscribes group to topic, turning a message of type on into
	// the message reply returns (nil: none), written to the outbox's
	// topic out in the inbox's transaction.
	react := func(ib *inbox.Inbox, group, topic, on, out string, reply func(m *message.Message) *message.Message) {
		h := ib.Handler(group, func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			if m.Type != on {
				return nil
			}
			return outbox.Add(ctx, tx, out, reply(m))
		})
		s.subscribe(topic, group, h)
	}

	orderDB, orderIB := service("order")
	s.orderDB = orderDB
	react(orderIB, "order", "shop.inventory", stockReserved, "shop.orders", func(m *message.Message) *message.Message {
		return reply("/services/order", orderApproved, m, nil)
	})
	react(orderIB, "order", "shop.customers", creditRefused, "shop.orders", func(m *message.Message) *message.Message {
		return reply("/services/order", orderRejected, m, m.Data) // passes the reason on
	})

	_, customerIB := service("customer")
	react(customerIB, "customer", "shop.orders", orderCreated, "shop.customers", func(m *message.Message) *message.Message {
		var order struct{ Total int }
		_ = json.Unmarshal(m.Data, &order)
		if order.Total > 100 {
			return reply("/services/customer", creditRefused, m, []byte(`{"reason":"credit limit exceeded"}`))
		}
		return reply("/services/customer", creditOK, m, nil)
	})

	_, inventoryIB := service("inventory")
	react(inventoryIB, "inventory", "shop.customers", creditOK, "shop.inventory", func(m *message.Message) *message.Message {
		return reply("/services/inventory", stockReserved, m, nil)
	})

	trackerDB, _ := trackerDB(t, kind)
	tr, err := flow.New(trackerDB, flow.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Define(createOrder(time.Hour)); err != nil {
		t.Fatal(err)
	}
	for _, topic := range shopTopics {
		s.subscribe(topic, "flows", tr.Handler())
	}
	s.tracker = tr
	// Stop the subscriptions together (each takes a moment), before the
	// databases close.
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, sub := range s.subs {
			wg.Go(func() { sub.Stop(context.Background()) })
		}
		wg.Wait()
	})
	return s
}

// reply returns a message of type typ about the same order as m. Its
// correlation and causation ids are left to outbox.Add, which takes them
// from the message being handled.
func reply(source, typ string, m *message.Message, data []byte) *message.Message {
	r := message.New(source, typ, data)
	r.Subject, r.DataContentType = m.Subject, "application/json"
	return r
}

func (s *shop) subscribe(topic, group string, h broker.Handler) {
	sub, err := s.broker.Subscribe(s.ctx, broker.SubscribeConfig{Topic: topic, Group: group, NakDelay: 10 * time.Millisecond}, h)
	if err != nil {
		s.t.Fatal(err)
	}
	s.subs = append(s.subs, sub)
}

// place places an order in the Order service and returns the message that
// starts its flow.
func (s *shop) place(order string, total int) *message.Message {
	s.t.Helper()
	m := message.New("/services/order", orderCreated, []byte(`{"total":`+itoa(total)+`}`))
	m.Subject, m.DataContentType = order, "application/json"
	err := s.orderDB.InTx(s.ctx, func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, "shop.orders", m)
	})
	if err != nil {
		s.t.Fatal(err)
	}
	return m
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

// waitStatus waits until the flow of id has status want and events events.
func (s *shop) waitStatus(id string, want flow.Status, events int) flow.Flow {
	s.t.Helper()
	var f flow.Flow
	waitFor(s.t, "flow "+id+" to be "+string(want), func() bool {
		var err error
		f, err = s.tracker.Get(s.ctx, id)
		return err == nil && f.Status == want && f.Events == events
	})
	return f
}

func TestChoreography_WithNATS_FlowsAreListedWithTheirEventsInCausalOrder(t *testing.T) {
	forEachDialect(t, func(t *testing.T, kind string) {
		s := newShop(t, kind)
		ctx := s.ctx
		approved, rejected := s.place("o-1", 50), s.place("o-2", 500)

		ok := s.waitStatus(approved.ID, flow.Completed, 4)
		ko := s.waitStatus(rejected.ID, flow.Failed, 3)
		if ok.Name != "shop.create-order" || ok.Reason != "" ||
			!equal(ok.Services, []string{"/services/order", "/services/customer", "/services/inventory"}) {
			t.Errorf("approved order's flow: %+v", ok)
		}
		if ko.Reason != "credit limit exceeded" || !equal(ko.Services, []string{"/services/order", "/services/customer"}) {
			t.Errorf("rejected order's flow: %+v", ko)
		}
		for _, tc := range []struct {
			status flow.Status
			want   []string
		}{{flow.Completed, []string{approved.ID}}, {flow.Failed, []string{rejected.ID}}, {flow.Running, nil}} {
			got, err := s.tracker.List(ctx, flow.Filter{Status: tc.status})
			if err != nil {
				t.Fatal(err)
			}
			if !equal(ids(got), tc.want) {
				t.Errorf("List(%s) = %q, want %q", tc.status, ids(got), tc.want)
			}
		}

		for _, tc := range []struct {
			start *message.Message
			want  []string
		}{
			{approved, []string{orderCreated, creditOK, stockReserved, orderApproved}},
			{rejected, []string{orderCreated, creditRefused, orderRejected}},
		} {
			h := history(t, s.tracker, tc.start.ID)
			if !equal(types(h), tc.want) {
				t.Errorf("history of %s: %q, want %q", tc.start.Subject, types(h), tc.want)
				continue
			}
			for i, e := range h {
				if i > 0 && e.CausationID != h[i-1].MessageID {
					t.Errorf("history of %s: event %d (%s) was caused by %q, not by the event before it (%s)", tc.start.Subject, i, e.Type, e.CausationID, h[i-1].MessageID)
				}
				if e.Subject != tc.start.Subject {
					t.Errorf("history of %s: event %d has subject %q", tc.start.Subject, i, e.Subject)
				}
			}
		}

		// The start is published again: on its own topic the broker drops
		// it (same Nats-Msg-Id), on another topic it is delivered, and the
		// tracker takes it for the duplicate it is.
		before := s.tracker.Stats().Duplicates
		if err := s.broker.Publish(ctx, "shop.orders", approved); err != nil {
			t.Fatal(err)
		}
		if err := s.broker.Publish(ctx, "shop.inventory", approved); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the duplicate to reach the tracker", func() bool { return s.tracker.Stats().Duplicates > before })
		if f := get(t, s.tracker, approved.ID); f.Events != 4 || f.Status != flow.Completed || !f.UpdatedAt.Equal(ok.UpdatedAt) {
			t.Errorf("after the duplicate: %+v, before: %+v", f, ok)
		}
		if h := history(t, s.tracker, approved.ID); len(h) != 4 {
			t.Errorf("after the duplicate the history has %d events, want 4", len(h))
		}
	})
}
