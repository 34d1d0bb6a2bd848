package saga_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// exampleOrder is the data of the examples' sagas.
type exampleOrder struct {
	ID     string `json:"id"`
	Amount int    `json:"amount"`
	Items  int    `json:"items"`
}

// exampleDB opens a SQLite database in dir with the tables of Troupe's
// packages.
func exampleDB(ctx context.Context, dir, name string) *sqldb.DB {
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, name+".db"), nil)
	if err != nil {
		panic(err)
	}
	for _, migrate := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := migrate(ctx, db); err != nil {
			panic(err)
		}
	}
	return db
}

// warehouse is a participant service that serves two steps over HTTP
// (see ExampleParticipant_HTTPHandler): holding credit (up to 100) and
// stock (up to 5), in its own database.
func warehouse(ctx context.Context, dir string) (db *sqldb.DB, srv *httptest.Server) {
	db = exampleDB(ctx, dir, "warehouse")
	db.Exec(ctx, `CREATE TABLE held (what TEXT PRIMARY KEY, amount INTEGER NOT NULL, cap INTEGER NOT NULL)`)
	db.Exec(ctx, `INSERT INTO held VALUES ('credit', 0, 100), ('stock', 0, 5)`)
	ib, _ := inbox.New(db, inbox.Config{})
	p, _ := saga.NewParticipant(ib, "/services/warehouse")
	mux := http.NewServeMux()
	for _, what := range []string{"credit", "stock"} {
		hold := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			var in struct{ N int }
			json.Unmarshal(cmd.Msg.Data, &in)
			n, err := tx.Exec(ctx, `UPDATE held SET amount = amount + $1 WHERE what = $2 AND amount + $1 <= cap`, in.N, what)
			if err != nil {
				return saga.Reply{}, err
			}
			if n == 0 {
				return saga.Failure("not enough " + what), nil
			}
			return saga.Success(map[string]int{"held": in.N}), nil
		}
		release := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			var in struct{ N int }
			json.Unmarshal(cmd.Msg.Data, &in)
			_, err := tx.Exec(ctx, `UPDATE held SET amount = amount - $1 WHERE what = $2`, in.N, what)
			return saga.Success(nil), err
		}
		p.Handle("warehouse.hold-"+what, hold, release)
		mux.Handle("/hold-"+what, p.HTTPHandler(db, "warehouse.hold-"+what))
	}
	return db, httptest.NewServer(mux)
}

// runOrders runs the order service: it starts a saga of def per order,
// waits for each to end, and prints how it ended and what report says.
func runOrders(ctx context.Context, dir string, def *saga.Definition[exampleOrder], report func() string, orders ...exampleOrder) {
	db := exampleDB(ctx, dir, "order")
	defer db.Close()
	var sched *timer.Scheduler
	sched, _ = timer.New(db, timer.Config{
		PollInterval: 10 * time.Millisecond,
		OnFired:      func([]timer.Fired) { sched.Notify() }, // a finished call may send the next
	})
	ib, _ := inbox.New(db, inbox.Config{})
	o, _ := saga.New(db, sched, ib, saga.Config{Source: "/services/order", ReplyTopic: "order.replies"})
	if err := o.Register(def); err != nil {
		fmt.Println(err)
		return
	}
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { sched.Run(runCtx) })
	defer func() { stop(); wg.Wait() }()

	for _, ord := range orders {
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			return def.StartTx(ctx, tx, o, "order/"+ord.ID, ord)
		})
		if err != nil {
			fmt.Println(err)
			return
		}
		sched.Notify() // its first call is stored: make it now
		info, _ := o.Get(ctx, "order/"+ord.ID)
		for info.Status == saga.Running || info.Status == saga.Compensating {
			time.Sleep(10 * time.Millisecond)
			info, _ = o.Get(ctx, "order/"+ord.ID)
		}
		fmt.Printf("%s: %s", ord.ID, info.Status)
		if info.Reason != "" {
			fmt.Printf(" (%s)", info.Reason)
		}
		fmt.Printf("; %s\n", report())
	}
}

// A step called over HTTP: the orchestrator POSTs the step's input to the
// participant's URL, and the response is the reply (2xx: success, its body
// the reply's data; 409: a refusal, its body the reason). The participant
// here is a Go service serving Participant.HTTPHandler, with the barrier
// that makes repeated and reordered calls safe; a service in any language
// that speaks the protocol will do.
func ExampleParticipant_HTTPHandler() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "saga-example")
	defer os.RemoveAll(dir)

	// The customer service: a participant with its own database.
	customerDB := exampleDB(ctx, dir, "customer")
	defer customerDB.Close()
	customerDB.Exec(ctx, `CREATE TABLE credit (reserved INTEGER NOT NULL, credit_limit INTEGER NOT NULL)`)
	customerDB.Exec(ctx, `INSERT INTO credit VALUES (0, 100)`)
	ib, _ := inbox.New(customerDB, inbox.Config{})
	customer, _ := saga.NewParticipant(ib, "/services/customer")
	customer.Handle("shop.customer.reserve-credit",
		func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			var in struct{ Amount int }
			json.Unmarshal(cmd.Msg.Data, &in)
			n, err := tx.Exec(ctx, `UPDATE credit SET reserved = reserved + $1 WHERE reserved + $1 <= credit_limit`, in.Amount)
			if err != nil {
				return saga.Reply{}, err // 503: called again
			}
			if n == 0 {
				return saga.Failure("credit limit exceeded"), nil // 409
			}
			return saga.Success(map[string]int{"reserved": in.Amount}), nil // 200
		},
		func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
			var in struct{ Amount int }
			json.Unmarshal(cmd.Msg.Data, &in)
			_, err := tx.Exec(ctx, `UPDATE credit SET reserved = reserved - $1`, in.Amount)
			return saga.Success(nil), err
		})
	srv := httptest.NewServer(customer.HTTPHandler(customerDB, "shop.customer.reserve-credit"))
	defer srv.Close()

	// The order service's saga calls it.
	pay := &saga.Definition[exampleOrder]{
		Name: "pay",
		Steps: []saga.Step[exampleOrder]{{
			Name:  "reserve-credit",
			URL:   srv.URL,
			Input: func(o *exampleOrder) any { return map[string]int{"amount": o.Amount} },
		}},
	}
	reserved := func() string {
		var n int
		customerDB.QueryRow(ctx, `SELECT reserved FROM credit`).Scan(&n)
		return fmt.Sprintf("credit reserved %d", n)
	}
	runOrders(ctx, dir, pay, reserved, exampleOrder{ID: "o-1", Amount: 40}, exampleOrder{ID: "o-2", Amount: 400})
	// Output:
	// o-1: completed; credit reserved 40
	// o-2: compensated (credit limit exceeded); credit reserved 40
}

// A parallel group: credit and stock are held at once, and the saga moves
// on when both are. When one is refused, the other is released (whether
// its answer came or not), then the steps before the group are undone.
func ExampleStep_parallel() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "saga-example")
	defer os.RemoveAll(dir)
	warehouseDB, srv := warehouse(ctx, dir)
	defer warehouseDB.Close()
	defer srv.Close()

	checkout := &saga.Definition[exampleOrder]{
		Name: "checkout",
		Steps: []saga.Step[exampleOrder]{
			{Name: "hold", Parallel: []saga.Step[exampleOrder]{
				{
					Name:  "hold-credit",
					URL:   srv.URL + "/hold-credit",
					Input: func(o *exampleOrder) any { return map[string]int{"n": o.Amount} },
				},
				{
					Name:  "hold-stock",
					URL:   srv.URL + "/hold-stock",
					Input: func(o *exampleOrder) any { return map[string]int{"n": o.Items} },
				},
			}},
		},
	}
	held := func() string {
		var credit, stock int
		warehouseDB.QueryRow(ctx, `SELECT amount FROM held WHERE what = 'credit'`).Scan(&credit)
		warehouseDB.QueryRow(ctx, `SELECT amount FROM held WHERE what = 'stock'`).Scan(&stock)
		return fmt.Sprintf("the warehouse holds credit %d, stock %d", credit, stock)
	}
	runOrders(ctx, dir, checkout, held,
		exampleOrder{ID: "o-1", Amount: 40, Items: 2},
		exampleOrder{ID: "o-2", Amount: 30, Items: 9})
	// Output:
	// o-1: completed; the warehouse holds credit 40, stock 2
	// o-2: compensated (not enough stock); the warehouse holds credit 40, stock 2
}
