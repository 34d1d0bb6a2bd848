package timer_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A service that creates an order schedules, in the same transaction, a
// reminder a day later: the timer exists exactly when the order does. When
// it falls due, the scheduler writes the reminder to the outbox, and the
// outbox relay publishes it.
func ExampleScheduler_ScheduleTx() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "timer-example-*")
	defer os.RemoveAll(dir)

	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "orders.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := outbox.Migrate(ctx, db); err != nil {
		panic(err)
	}
	if err := timer.Migrate(ctx, db); err != nil {
		panic(err)
	}
	if _, err := db.Exec(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT NOT NULL)`); err != nil {
		panic(err)
	}

	// The example moves a test clock by hand; a service leaves Clock unset
	// and runs on the system clock.
	clock := clocktest.New(time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC))
	fired := make(chan timer.Fired, 1)
	sched, err := timer.New(db, timer.Config{
		Clock: clock,
		// Called after each firing commits; a service wakes its outbox
		// relay here (Relay.Notify).
		OnFired: func(fs []timer.Fired) {
			for _, f := range fs {
				fired <- f
			}
		},
	})
	if err != nil {
		panic(err)
	}
	done := make(chan error, 1)
	go func() { done <- sched.Run(ctx) }()

	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO orders (id, state) VALUES ($1, 'UNPAID')`, "order-1"); err != nil {
			return err
		}
		m := message.New("/services/order", "shop.order.payment-reminder", []byte(`{"order":"order-1"}`))
		m.ID = "payment-reminder/order-1" // derived from the order: cancellable without storing it
		m.Subject = "order-1"
		return sched.ScheduleTx(ctx, tx, clock.Now().Add(24*time.Hour), timer.ToTopic("shop.reminders"), m)
	})
	if err != nil {
		panic(err)
	}

	clock.Advance(24 * time.Hour)
	f := <-fired
	fmt.Println("fired", f.ID, "into", f.Target, "at", f.At.Format(time.RFC3339))

	var topic, id string
	if err := db.QueryRow(ctx, `SELECT topic, id FROM troupe_outbox`).Scan(&topic, &id); err != nil {
		panic(err)
	}
	fmt.Println("outbox:", topic, id)

	cancel()
	<-done
	// Output:
	// fired payment-reminder/order-1 into shop.reminders at 2030-01-02T09:00:00Z
	// outbox: shop.reminders payment-reminder/order-1
}

// A local handler runs in the transaction that consumes its timer: here it
// releases a seat hold that was never confirmed. Its writes commit exactly
// when the timer is deleted, so the hold is released once, even if the
// process crashes or several schedulers run.
func ExampleScheduler_Handle() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, _ := os.MkdirTemp("", "timer-example-*")
	defer os.RemoveAll(dir)

	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "seats.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := timer.Migrate(ctx, db); err != nil {
		panic(err)
	}
	if _, err := db.Exec(ctx, `CREATE TABLE holds (seat TEXT PRIMARY KEY, state TEXT NOT NULL)`); err != nil {
		panic(err)
	}

	clock := clocktest.New(time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC))
	fired := make(chan timer.Fired, 1)
	sched, err := timer.New(db, timer.Config{
		Clock:   clock,
		OnFired: func(fs []timer.Fired) { fired <- fs[0] },
	})
	if err != nil {
		panic(err)
	}
	err = sched.Handle("release-hold", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
		_, err := tx.Exec(ctx, `UPDATE holds SET state = 'RELEASED' WHERE seat = $1 AND state = 'HELD'`, f.Msg.Subject)
		return err // an error rolls these writes back and retries the timer later
	})
	if err != nil {
		panic(err)
	}
	done := make(chan error, 1)
	go func() { done <- sched.Run(ctx) }()

	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO holds (seat, state) VALUES ($1, 'HELD')`, "12A"); err != nil {
			return err
		}
		m := message.New("/services/booking", "booking.hold.expired", nil)
		m.Subject = "12A"
		return sched.ScheduleTx(ctx, tx, clock.Now().Add(15*time.Minute), timer.ToHandler("release-hold"), m)
	})
	if err != nil {
		panic(err)
	}

	clock.Advance(15 * time.Minute)
	f := <-fired
	var state string
	if err := db.QueryRow(ctx, `SELECT state FROM holds WHERE seat = $1`, "12A").Scan(&state); err != nil {
		panic(err)
	}
	fmt.Println(f.Target, "attempt", f.Attempt, "- seat 12A:", state)

	cancel()
	<-done
	// Output: release-hold attempt 1 - seat 12A: RELEASED
}

// When the customer pays, the reminder is cancelled in the transaction that
// records the payment. The timer's id was derived from the order, so the
// service need not have stored it. CancelTx reports whether the timer was
// still pending: true means it will never fire.
func ExampleScheduler_CancelTx() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "timer-example-*")
	defer os.RemoveAll(dir)

	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "orders.db"), nil)
	if err != nil {
		panic(err)
	}
	defer db.Close()
	if err := timer.Migrate(ctx, db); err != nil {
		panic(err)
	}
	if _, err := db.Exec(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, state TEXT NOT NULL)`); err != nil {
		panic(err)
	}

	clock := clocktest.New(time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC))
	sched, err := timer.New(db, timer.Config{Clock: clock})
	if err != nil {
		panic(err)
	}
	reminderID := func(order string) string { return "payment-reminder/" + order }

	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO orders (id, state) VALUES ($1, 'UNPAID')`, "order-1"); err != nil {
			return err
		}
		m := message.New("/services/order", "shop.order.payment-reminder", []byte(`{"order":"order-1"}`))
		m.ID = reminderID("order-1")
		return sched.ScheduleTx(ctx, tx, clock.Now().Add(24*time.Hour), timer.ToTopic("shop.reminders"), m)
	})
	if err != nil {
		panic(err)
	}

	// An hour later, the payment arrives.
	clock.Advance(time.Hour)
	err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx, `UPDATE orders SET state = 'PAID' WHERE id = $1`, "order-1"); err != nil {
			return err
		}
		cancelled, err := sched.CancelTx(ctx, tx, reminderID("order-1"))
		fmt.Println("reminder cancelled:", cancelled)
		return err
	})
	if err != nil {
		panic(err)
	}

	// A second cancel, say from a redelivered payment event, finds nothing.
	cancelled, err := sched.Cancel(ctx, reminderID("order-1"))
	if err != nil {
		panic(err)
	}
	fmt.Println("cancelled again:", cancelled)
	st, err := sched.Stats(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Println("pending timers:", st.Pending)
	// Output:
	// reminder cancelled: true
	// cancelled again: false
	// pending timers: 0
}
