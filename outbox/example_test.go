package outbox_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// A service writes its state change and the event announcing it in one
// transaction; the relay publishes the event once the transaction commits.
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "outbox-example-*")
	defer os.RemoveAll(dir)

	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "order.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := outbox.Migrate(ctx, db); err != nil {
		panic(err)
	}
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(dir, "nats")})
	if err != nil {
		panic(err)
	}
	defer b.Close()

	received := make(chan *message.Message, 1)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "shop.orders", Group: "billing"}, func(ctx context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			received <- d.Msg
			d.Ack()
		}
	})
	if err != nil {
		panic(err)
	}
	defer sub.Stop(ctx)

	relay, err := outbox.NewRelay(db, b, outbox.RelayConfig{})
	if err != nil {
		panic(err)
	}
	done := make(chan error)
	go func() { done <- relay.Run(ctx) }()

	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, "CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT)"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "INSERT INTO orders (id, state) VALUES ($1, $2)", "order-1", "PENDING"); err != nil {
			return err
		}
		m := message.New("/services/order", "shop.order.created", []byte(`{"id":"order-1"}`))
		m.Subject = "order-1"
		m.DataContentType = "application/json"
		return outbox.Add(ctx, tx, "shop.orders", m)
	})
	if err != nil {
		panic(err)
	}
	relay.Notify() // same process: no need to wait for the next poll

	m := <-received
	fmt.Println(m.Type, m.Subject, string(m.Data))
	cancel()
	<-done
	// Output: shop.order.created order-1 {"id":"order-1"}
}

// A loop that adds one message per item writes them with one statement
// when Add is deferred: here a batch of shipments, each with its event.
func ExampleDefer() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "outbox-defer-example-*")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "shipping.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := outbox.Migrate(ctx, db); err != nil {
		panic(err)
	}

	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		ctx, deferred := outbox.Defer(ctx, tx)
		for _, id := range []string{"order-1", "order-2", "order-3"} {
			// The item's own writes would go here, through tx.
			m := message.New("/services/shipping", "shop.order.shipped", nil)
			m.Subject = id
			if err := outbox.Add(ctx, tx, "shop.shipments", m); err != nil {
				return err
			}
		}
		fmt.Println("held:", deferred.Len())
		return deferred.Flush(ctx) // the three in one go: one INSERT on PostgreSQL, two on SQLite (2 + 1)
	})
	if err != nil {
		panic(err)
	}
	var n int
	if err := db.QueryRow(ctx, "SELECT count(*) FROM troupe_outbox WHERE topic = 'shop.shipments'").Scan(&n); err != nil {
		panic(err)
	}
	fmt.Println("in the outbox:", n)
	// Output:
	// held: 3
	// in the outbox: 3
}
