package natsjs_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/message"
)

// An embedded server keeps its files in a directory; a group consumes what
// a service publishes.
func Example() {
	dir, err := os.MkdirTemp("", "troupe-natsjs-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	ctx := context.Background()
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	received := make(chan *message.Message, 1)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "shop.orders", Group: "billing"},
		func(ctx context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				received <- d.Msg
				d.Ack()
			}
		})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Stop(ctx)

	m := message.New("/services/order", "shop.order.created", []byte(`{"order":"42"}`))
	m.Subject = "order-42"
	if err := b.Publish(ctx, "shop.orders", m); err != nil {
		log.Fatal(err)
	}

	got := <-received
	fmt.Println(got.Type, got.Subject, string(got.Data))
	// Output: shop.order.created order-42 {"order":"42"}
}
