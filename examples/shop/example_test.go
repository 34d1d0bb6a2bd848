package shop_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/sqldb"
)

// The shop end to end: two services, each with its own database, over an
// embedded NATS JetStream server. An order within the customer's credit
// limit is approved; one beyond it is rejected, and nothing stays reserved
// for it.
func ExampleStart() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "shop-example")
	defer os.RemoveAll(dir)
	orderDB, _ := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "order.db"), nil)
	defer orderDB.Close()
	customerDB, _ := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "customer.db"), nil)
	defer customerDB.Close()
	b, _ := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(dir, "nats")})
	defer b.Close()

	s, err := shop.Start(ctx, shop.Config{OrderDB: orderDB, CustomerDB: customerDB, Broker: b})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer s.Stop()
	s.Customer().Create(ctx, customer.Customer{ID: "ada", Name: "Ada", CreditLimit: 10_000})

	for _, price := range []int64{2_500, 9_000} {
		placed, err := s.Order().Place(ctx, order.PlaceRequest{
			CustomerID: "ada",
			Items:      []order.Item{{SKU: "tea", Quantity: 1, UnitPrice: price}},
		})
		if err != nil {
			fmt.Println(err)
			return
		}
		o, _ := s.Order().Await(ctx, placed.ID)
		fmt.Printf("order of %d: %s", price, o.State)
		if o.Reason != "" {
			fmt.Printf(" (%s)", o.Reason)
		}
		fmt.Println()
	}
	c, _ := s.Customer().Get(ctx, "ada")
	fmt.Println("reserved for ada:", c.Reserved)
	// Output:
	// order of 2500: APPROVED
	// order of 9000: REJECTED (credit limit exceeded)
	// reserved for ada: 2500
}
