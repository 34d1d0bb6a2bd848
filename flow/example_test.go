package flow_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/flow"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// A tracker follows the create-order choreography of three services. Its
// handler is called here with deliveries made by hand, the completion
// first; in the tracker's service it is subscribed to every topic the
// services publish on.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "flow-example")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "flows.db"), nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()
	if err := flow.Migrate(ctx, db); err != nil {
		fmt.Println(err)
		return
	}
	tr, err := flow.New(db, flow.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	err = tr.Define(flow.Definition{
		Name:      "shop.create-order",
		Starts:    []string{"shop.order.created"},
		Steps:     []string{"shop.credit.reserved", "shop.credit.refused"},
		Completes: []string{"shop.order.approved"},
		Fails:     []string{"shop.order.rejected"},
		Deadline:  time.Minute,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// for _, topic := range []string{"shop.orders", "shop.customers"} {
	// 	b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "flows"}, tr.Handler())
	// }
	h := tr.Handler()

	// What the services publish, each message caused by the one before.
	created := message.New("/services/order", "shop.order.created", nil)
	reserved := message.New("/services/customer", "shop.credit.reserved", nil).CausedBy(created)
	approved := message.New("/services/order", "shop.order.approved", nil).CausedBy(reserved)
	for _, m := range []*message.Message{approved, reserved, created, created} { // out of order, and a duplicate
		h(ctx, []*broker.Delivery{{Msg: m, Topic: "shop.orders", Attempt: 1}})
	}

	f, err := tr.Get(ctx, created.ID) // the flow's id is its correlation id
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(f.Name, f.Status, f.Events, f.Services)
	events, err := tr.History(ctx, created.ID)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, e := range events {
		fmt.Println(e.Role, e.Type)
	}
	fmt.Printf("%+v\n", tr.Stats())
	// Output:
	// shop.create-order completed 3 [/services/order /services/customer]
	// start shop.order.created
	// step shop.credit.reserved
	// complete shop.order.approved
	// {Recorded:3 Duplicates:1 Ignored:0 DeadLettered:0}
}

// The Order service records the start of a flow in the transaction that
// writes the order and its event, so the flow exists exactly when the
// order does (here the tracker's tables are in the service's database).
func ExampleTracker_RecordTx() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "flow-example")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "order.db"), nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()
	for _, migrate := range []func(context.Context, *sqldb.DB) error{flow.Migrate, outbox.Migrate} {
		if err := migrate(ctx, db); err != nil {
			fmt.Println(err)
			return
		}
	}
	tr, _ := flow.New(db, flow.Config{})
	_ = tr.Define(flow.Definition{
		Name:      "shop.create-order",
		Starts:    []string{"shop.order.created"},
		Completes: []string{"shop.order.approved"},
		Fails:     []string{"shop.order.rejected"},
	})

	created := message.New("/services/order", "shop.order.created", []byte(`{"order_id":"42"}`))
	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		// ... INSERT INTO orders ...
		if err := outbox.Add(ctx, tx, "shop.orders", created); err != nil {
			return err
		}
		return tr.RecordTx(ctx, tx, created)
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	running, err := tr.List(ctx, flow.Filter{Status: flow.Running})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(len(running), running[0].ID == created.ID, running[0].Status)
	// Output: 1 true running
}
