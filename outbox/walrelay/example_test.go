package walrelay_test

import (
	"context"
	"log"
	"log/slog"
	"os"
	"os/signal"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/outbox/walrelay"
)

// A service relays its outbox from the WAL until it is told to stop. Every
// instance runs the same code: one holds the slot, the others stand by.
func ExampleNew() {
	var pub broker.Publisher // the service's broker, such as a *natsjs.Broker

	r, err := walrelay.New(walrelay.Config{
		URL:       "postgres://troupe@db:5432/orders",
		Publisher: pub,
		Logger:    slog.Default(),
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := r.Run(ctx); err != nil {
		log.Fatal(err)
	}
}

// A retired WAL relay must drop its slot, or the server keeps WAL for it
// until the disk fills.
func ExampleDropSlot() {
	ctx := context.Background()
	if err := walrelay.DropSlot(ctx, "postgres://troupe@db:5432/orders", walrelay.DefaultSlotName); err != nil {
		log.Fatal(err)
	}
}
