package order_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/sqldb"
)

// A client that retries with the same IdempotencyKey gets the order its
// first call placed, never a second one; the key with another request is
// refused. Over HTTP the key is the Idempotency-Key header.
func ExampleService_Place_idempotencyKey() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "order-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "order.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	nb, err := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(dir, "nats")})
	if err != nil {
		panic(err)
	}
	defer nb.Close()
	if err := order.Migrate(ctx, db); err != nil {
		panic(err)
	}
	svc, err := order.New(db, nb, order.Config{})
	if err != nil {
		panic(err)
	}

	req := order.PlaceRequest{
		CustomerID:     "c1",
		Items:          []order.Item{{SKU: "tea", Quantity: 2, UnitPrice: 1250}},
		IdempotencyKey: "8e03978e-40d5-43e8-bc93-6894a57f9324",
	}
	first, err := svc.Place(ctx, req)
	if err != nil {
		panic(err)
	}
	again, err := svc.Place(ctx, req) // the answer to the first was lost
	if err != nil {
		panic(err)
	}
	fmt.Println("same order:", again.ID == first.ID, again.State)

	req.Items[0].Quantity = 3
	_, err = svc.Place(ctx, req)
	fmt.Println("other request:", errors.Is(err, order.ErrIdempotencyKeyReused))
	// Output:
	// same order: true PENDING
	// other request: true
}
