package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// A consumer whose effect (a row in payments) commits with its inbox row, so
// the broker's redelivery of the same message has no second effect. The
// handler is called here with deliveries made by hand; in a service it is
// passed to a broker's Subscribe.
func ExampleInbox_Handler() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "inbox-example")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "billing.db"), nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()
	if err := inbox.Migrate(ctx, db); err != nil {
		fmt.Println(err)
		return
	}
	db.Exec(ctx, `CREATE TABLE payments (order_id TEXT NOT NULL)`)

	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	h := ib.Handler("billing", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
		if m.Subject == "" {
			return inbox.Permanent(errors.New("order created without an order id"))
		}
		_, err := tx.Exec(ctx, `INSERT INTO payments (order_id) VALUES ($1)`, m.Subject)
		return err
	})
	// Subscribe with: b.Subscribe(ctx, broker.SubscribeConfig{Topic: "shop.orders", Group: "billing"}, h)

	created := message.New("/services/order", "shop.order.created", nil)
	created.Subject = "order-42"
	bad := message.New("/services/order", "shop.order.created", nil)
	for _, attempt := range []int{1, 2} { // the second as after a lost ack
		batch := []*broker.Delivery{
			{Msg: created, Topic: "shop.orders", Attempt: attempt},
			{Msg: bad, Topic: "shop.orders", Attempt: attempt},
		}
		h(ctx, batch)
		for _, d := range batch {
			if s, _, reason := d.Settlement(); reason != "" {
				fmt.Println(attempt, s, reason)
			} else {
				fmt.Println(attempt, s)
			}
		}
	}
	var n int
	db.QueryRow(ctx, `SELECT COUNT(*) FROM payments`).Scan(&n)
	fmt.Println("payments:", n)
	// Output:
	// 1 acked
	// 1 deadlettered order created without an order id
	// 2 acked
	// 2 deadlettered order created without an order id
	// payments: 1
}
