package saga_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// A Customer service takes part in CreateOrder sagas: it reserves credit
// within a limit, and releases it when the saga compensates. Here commands
// are handed over by hand; in the service, Participant.Handler is
// subscribed to the command topic and the outbox relay sends the replies.
func ExampleParticipant() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "participant-example")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "customer.db"), nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()
	_ = inbox.Migrate(ctx, db)
	_ = outbox.Migrate(ctx, db)
	db.Exec(ctx, `CREATE TABLE customers (id TEXT PRIMARY KEY, credit_limit INTEGER, reserved INTEGER)`)
	db.Exec(ctx, `INSERT INTO customers VALUES ('alice', 100, 0)`)

	ib, _ := inbox.New(db, inbox.Config{})
	p, _ := saga.NewParticipant(ib, "/services/customer")
	type credit struct {
		Customer string `json:"customer"`
		Amount   int    `json:"amount"`
	}
	read := func(cmd *saga.Command) (c credit, err error) { err = json.Unmarshal(cmd.Msg.Data, &c); return }
	p.Handle("shop.customer.reserve-credit",
		func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			c, err := read(cmd)
			if err != nil {
				return saga.Reply{}, inbox.Permanent(err)
			}
			n, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved + $1
				WHERE id = $2 AND reserved + $1 <= credit_limit`, c.Amount, c.Customer)
			if err != nil {
				return saga.Reply{}, err // transient: rolled back, redelivered
			}
			if n == 0 {
				return saga.Failure("credit limit exceeded"), nil
			}
			return saga.Success(nil), nil
		},
		func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			c, err := read(cmd)
			if err != nil {
				return saga.Reply{}, inbox.Permanent(err)
			}
			_, err = tx.Exec(ctx, `UPDATE customers SET reserved = reserved - $1 WHERE id = $2`, c.Amount, c.Customer)
			return saga.Success(nil), err
		})

	deliver := func(sagaID string, op saga.Op, amount int) {
		m, _ := saga.NewCommand("/services/order", "shop.customer.reserve-credit", sagaID, "reserve-credit", op,
			"shop.order.replies", credit{Customer: "alice", Amount: amount})
		db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if first, err := ib.ClaimTx(ctx, tx, "customer", m); err != nil || !first {
				return err
			}
			return p.HandleTx(message.WithCause(ctx, m), tx, m)
		})
		var reserved int
		db.QueryRow(ctx, `SELECT reserved FROM customers WHERE id = 'alice'`).Scan(&reserved)
		fmt.Printf("%s %s %d: reserved %d\n", sagaID, op, amount, reserved)
	}
	deliver("order-1", saga.Action, 60)
	deliver("order-1", saga.Action, 60) // the saga retried: no second reservation
	deliver("order-2", saga.Action, 60) // over the limit: refused
	deliver("order-1", saga.Compensation, 60)
	deliver("order-3", saga.Compensation, 10) // overtook its action: nothing to undo
	deliver("order-3", saga.Action, 10)       // ... and the late action is refused

	rows, _ := db.Query(ctx, `SELECT envelope FROM troupe_outbox ORDER BY seq`)
	for rows.Next() {
		var env []byte
		rows.Scan(&env)
		m, _ := outbox.DecodeEnvelope(env)
		r, _ := saga.ParseReply(m)
		if r.Reason != "" {
			fmt.Printf("reply: %s %s %s: %s\n", r.SagaID, r.Op, r.Outcome, r.Reason)
			continue
		}
		fmt.Println("reply:", r.SagaID, r.Op, r.Outcome)
	}
	rows.Close()
	// Output:
	// order-1 action 60: reserved 60
	// order-1 action 60: reserved 60
	// order-2 action 60: reserved 60
	// order-1 compensation 60: reserved 0
	// order-3 compensation 10: reserved 0
	// order-3 action 10: reserved 0
	// reply: order-1 action success
	// reply: order-2 action failure: credit limit exceeded
	// reply: order-1 compensation success
	// reply: order-3 compensation success
	// reply: order-3 action failure: refused: the step was compensated before this action arrived
}
