package reserve_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A kitchen holds packets of a dish for orders: each order's packet is held
// for 15 minutes, and assigned when the order is confirmed. An order whose
// confirmation comes too late gets nothing, and its packet is free again.
func Example() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "reserve-example-*")
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "kitchen.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := timer.Migrate(ctx, db); err != nil {
		panic(err)
	}
	if err := reserve.Migrate(ctx, db); err != nil {
		panic(err)
	}

	// The example moves a test clock by hand; a service leaves Clock unset,
	// and runs sched.Run, which fires the expiry timers.
	clock := clocktest.New(time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC))
	sched, err := timer.New(db, timer.Config{Clock: clock})
	if err != nil {
		panic(err)
	}
	r, err := reserve.New(db, sched, reserve.Config{})
	if err != nil {
		panic(err)
	}
	if err := r.Add(ctx, "margherita", "packet-1", "packet-2"); err != nil {
		panic(err)
	}

	for _, order := range []string{"order-1", "order-2", "order-3"} {
		res, err := r.Try(ctx, reserve.Try{
			ID:        order + "/margherita", // the same on every retry
			Pool:      "margherita",
			Owner:     order,
			ExpiresAt: clock.Now().Add(15 * time.Minute),
		})
		switch {
		case errors.Is(err, reserve.ErrUnavailable):
			fmt.Println(order, "refused: sold out")
		case err != nil:
			panic(err)
		default:
			fmt.Println(order, "holds", res.Resource, "until", res.ExpiresAt.Format("15:04"))
		}
	}

	clock.Advance(10 * time.Minute)
	res, err := r.Confirm(ctx, "order-1/margherita")
	fmt.Println("order-1 confirmed:", res.State, res.Resource, err)

	clock.Advance(10 * time.Minute)
	_, err = r.Confirm(ctx, "order-2/margherita")
	fmt.Println("order-2 confirmed too late:", errors.Is(err, reserve.ErrReservationExpired))

	packets, err := r.Resources(ctx, "margherita")
	if err != nil {
		panic(err)
	}
	for _, p := range packets {
		fmt.Println(p.ID, p.State, p.Owner)
	}
	// Output:
	// order-1 holds packet-1 until 12:15
	// order-2 holds packet-2 until 12:15
	// order-3 refused: sold out
	// order-1 confirmed: confirmed packet-1 <nil>
	// order-2 confirmed too late: true
	// packet-1 assigned order-1
	// packet-2 free
}
