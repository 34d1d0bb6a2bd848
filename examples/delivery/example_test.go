package delivery_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/sqldb"
)

// The example end to end: three services, each with its own database,
// the Store over an embedded NATS JetStream server, the Delivery service
// over HTTP. A food sold out is not placed; an order is placed with its
// packets and the only agent; the next one finds no agent free and is not
// placed; nothing stays held for the orders not placed.
func ExampleStart() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "delivery-example")
	defer os.RemoveAll(dir)
	open := func(name string) *sqldb.DB {
		db, _ := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, name+".db"), nil)
		return db
	}
	orderDB, storeDB, deliveryDB := open("order"), open("store"), open("delivery")
	defer orderDB.Close()
	defer storeDB.Close()
	defer deliveryDB.Close()
	b, _ := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(dir, "nats")})
	defer b.Close()

	s, err := delivery.Start(ctx, delivery.Config{OrderDB: orderDB, StoreDB: storeDB, DeliveryDB: deliveryDB, Broker: b})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Stop()
	s.Store().AddFood(ctx, "pizza", "Pizza margherita", 5)
	s.Store().AddFood(ctx, "soup", "Miso soup", 0)
	s.Delivery().AddAgents(ctx, "agent-01")

	for _, req := range []order.PlaceRequest{{FoodID: "soup", Quantity: 1}, {FoodID: "pizza", Quantity: 2}, {FoodID: "pizza", Quantity: 1}} {
		placed, err := s.Order().Place(ctx, req)
		if err != nil {
			fmt.Println(err)
			return
		}
		o, _ := s.Order().Await(ctx, placed.ID)
		fmt.Printf("%d × %s: %s", req.Quantity, req.FoodID, o.State)
		if o.State == order.Placed {
			fmt.Printf(" (%d packets, %s)", len(o.Packets), o.Agent)
		} else {
			fmt.Printf(" (%s)", o.Reason)
		}
		fmt.Println()
	}
	// The last replies reach the broker a moment after the orders end:
	// the invariants hold once they have.
	v, _ := s.Check(ctx)
	for end := time.Now().Add(10 * time.Second); len(v) > 0 && time.Now().Before(end); v, _ = s.Check(ctx) {
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Println("invariants broken:", len(v))
	// Output:
	// 1 × soup: NOT_PLACED (sold out)
	// 2 × pizza: PLACED (2 packets, agent-01)
	// 1 × pizza: NOT_PLACED (no delivery agent free)
	// invariants broken: 0
}
