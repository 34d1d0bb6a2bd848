package saga_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A saga of two local steps, run by the service that owns it. A step that
// refuses makes the saga undo the steps before it, in reverse order. (Steps
// that are commands to other services are declared with Topic and Command
// instead of Local; their replies arrive through Orchestrator.Handler.)
func ExampleDefinition() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "saga-example")
	defer os.RemoveAll(dir)
	db, _ := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "order.db"), nil)
	defer db.Close()
	for _, migrate := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		migrate(ctx, db)
	}
	db.Exec(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT, stock_held INTEGER)`)

	sched, _ := timer.New(db, timer.Config{})
	ib, _ := inbox.New(db, inbox.Config{})
	o, _ := saga.New(db, sched, ib, saga.Config{Source: "/services/order", ReplyTopic: "order.replies"})

	type order struct {
		ID    string `json:"id"`
		Total int    `json:"total"`
	}
	createOrder := &saga.Definition[order]{
		Name: "create-order",
		Steps: []saga.Step[order]{
			{
				Name: "hold-stock",
				Local: func(ctx context.Context, tx sqldb.Tx, sagaID string, o *order) error {
					_, err := tx.Exec(ctx, `UPDATE orders SET stock_held = 1 WHERE id = $1`, o.ID)
					return err
				},
				UndoLocal: func(ctx context.Context, tx sqldb.Tx, sagaID string, o *order) error {
					_, err := tx.Exec(ctx, `UPDATE orders SET stock_held = 0 WHERE id = $1`, o.ID)
					return err
				},
			},
			{
				Name: "check-total",
				Local: func(ctx context.Context, tx sqldb.Tx, sagaID string, o *order) error {
					if o.Total > 100 {
						return saga.Refuse(errors.New("total over 100"))
					}
					return nil
				},
			},
		},
		OnCompleted: func(ctx context.Context, tx sqldb.Tx, sagaID string, o *order) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'APPROVED' WHERE id = $1`, o.ID)
			return err
		},
		OnCompensated: func(ctx context.Context, tx sqldb.Tx, sagaID string, o *order, reason string) error {
			_, err := tx.Exec(ctx, `UPDATE orders SET state = 'REJECTED' WHERE id = $1`, o.ID)
			return err
		},
	}
	o.Register(createOrder)

	for _, ord := range []order{{ID: "o-1", Total: 40}, {ID: "o-2", Total: 400}} {
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			tx.Exec(ctx, `INSERT INTO orders (id, state, stock_held) VALUES ($1, 'PENDING', 0)`, ord.ID)
			return createOrder.StartTx(ctx, tx, o, "create-order/"+ord.ID, ord)
		})
		if err != nil {
			fmt.Println(err)
			return
		}
		info, _ := o.Get(ctx, "create-order/"+ord.ID)
		var state string
		var held int
		db.QueryRow(ctx, `SELECT state, stock_held FROM orders WHERE id = $1`, ord.ID).Scan(&state, &held)
		fmt.Printf("%s: saga %s, order %s, stock held %d", ord.ID, info.Status, state, held)
		if info.Reason != "" {
			fmt.Printf(" (%s)", info.Reason)
		}
		fmt.Println()
	}
	// Output:
	// o-1: saga completed, order APPROVED, stock held 1
	// o-2: saga compensated, order REJECTED, stock held 0 (total over 100)
}
