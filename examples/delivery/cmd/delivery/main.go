// Command delivery runs the food-delivery example: the Order, Store and
// Delivery services, each on its own database, the Store reached over a
// broker and the Delivery service over HTTP, with their APIs on one
// address.
//
//	go run ./examples/delivery/cmd/delivery [--dir DIR | --postgres URL] [--broker nats|kafka|URL] [--addr HOST:PORT] [--deliver-after D]
//
// With no flags the databases are SQLite files in ./delivery-data and the
// broker is an embedded NATS JetStream server; on first start the Store
// gets 20 packets each of pizza, ramen and salad, and the Delivery service
// 3 agents, each back 30 s after its order is placed (or at once with
// POST /deliveries/{order}/delivered).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/troupedev/troupe/examples/delivery"
	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/internal/servicedb"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "delivery:", err)
		os.Exit(1)
	}
}

func run() error {
	dir := flag.String("dir", "delivery-data", "directory of the SQLite databases and the embedded broker's files")
	pg := flag.String("postgres", "", "PostgreSQL server URL; each service gets a database troupe_delivery_<service> there (created when missing)")
	brokerSpec := flag.String("broker", "nats", "broker: "+brokeropen.Usage)
	addr := flag.String("addr", "127.0.0.1:8081", "HTTP address of the services' APIs")
	deliverAfter := flag.Duration("deliver-after", 30*time.Second, "how long an agent is out with a placed order")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dbs, err := servicedb.Open(ctx, servicedb.Config{Dir: *dir, Postgres: *pg, Prefix: "troupe_delivery_"}, "order", "store", "delivery")
	if err != nil {
		return err
	}
	defer dbs.Close()
	ob, err := brokeropen.Open(ctx, *brokerSpec, *dir, log)
	if err != nil {
		return err
	}
	defer ob.Close()
	s, err := delivery.Start(ctx, delivery.Config{
		OrderDB: dbs.DBs["order"], StoreDB: dbs.DBs["store"], DeliveryDB: dbs.DBs["delivery"], Broker: ob.Broker,
		Order:    order.Config{Logger: log},
		Store:    store.Config{Logger: log},
		Delivery: dispatch.Config{Logger: log, DeliverAfter: *deliverAfter},
	})
	if err != nil {
		return err
	}
	defer s.Stop()
	if foods, err := s.Store().Foods(ctx); err == nil && len(foods) == 0 {
		for _, f := range []struct{ id, name string }{{"pizza", "Pizza margherita"}, {"ramen", "Shoyu ramen"}, {"salad", "Greek salad"}} {
			if err := s.Store().AddFood(ctx, f.id, f.name, 20); err != nil {
				return err
			}
		}
		if err := s.Delivery().AddAgents(ctx, "agent-01", "agent-02", "agent-03"); err != nil {
			return err
		}
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	log.Info("delivery: serving", "addr", "http://"+ln.Addr().String(), "delivery_api", s.DeliveryURL(),
		"databases", dbs.Description, "broker", ob.Description)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
