package inbox_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/sqldb"
)

// A Customer service takes part in CreateOrder sagas: the step
// "reserve-credit" reserves an order's total, and its compensation releases
// it. The barrier lets a duplicate request through without a second
// reservation, and turns a compensation that overtook its action into a
// no-op that also refuses the late action. Here the requests are made by
// hand; in a service they arrive as commands (handled in an inbox
// HandlerFunc's tx) or HTTP calls.
func ExampleInbox_BarrierTx() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "barrier-example")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "customer.db"), nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer db.Close()
	if err := inbox.Migrate(ctx, db); err != nil {
		fmt.Println(err)
		return
	}
	db.Exec(ctx, `CREATE TABLE customers (id TEXT PRIMARY KEY, reserved INTEGER NOT NULL)`)
	db.Exec(ctx, `INSERT INTO customers (id, reserved) VALUES ('alice', 0)`)
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}

	// handle is the participant's handling of one request for a step of
	// sagaID: reserve 30 (the action) or release it (the compensation).
	handle := func(sagaID string, op inbox.BarrierOp) {
		delta := 30
		if op == inbox.BarrierCompensation {
			delta = -30
		}
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			outcome, err := ib.BarrierTx(ctx, tx, sagaID, "reserve-credit", op,
				func(ctx context.Context, tx sqldb.Tx) error {
					_, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved + $1 WHERE id = 'alice'`, delta)
					return err
				})
			if err != nil {
				return err
			}
			// A real participant writes its reply to its outbox here, in
			// tx: BarrierRefused is a business refusal, the other
			// outcomes success.
			var reserved int
			tx.QueryRow(ctx, `SELECT reserved FROM customers WHERE id = 'alice'`).Scan(&reserved)
			fmt.Printf("%s %s: %s, reserved %d\n", sagaID, op, outcome, reserved)
			return nil
		})
		if err != nil {
			fmt.Println(err)
		}
	}

	handle("saga-1", inbox.BarrierAction)
	handle("saga-1", inbox.BarrierAction) // redelivered
	handle("saga-1", inbox.BarrierCompensation)

	// saga-2's action is slow to arrive: the saga's deadline passes and it
	// compensates the step first.
	handle("saga-2", inbox.BarrierCompensation)
	handle("saga-2", inbox.BarrierAction)
	// Output:
	// saga-1 action: applied, reserved 30
	// saga-1 action: duplicate, reserved 30
	// saga-1 compensation: applied, reserved 0
	// saga-2 compensation: null_compensation, reserved 0
	// saga-2 action: refused, reserved 0
}
