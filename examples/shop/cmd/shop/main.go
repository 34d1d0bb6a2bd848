// Command shop runs the online shop example: the Order and Customer
// services, each on its own database, over a broker, with their HTTP APIs
// on one address.
//
//	go run ./examples/shop/cmd/shop [--mode orchestrated|choreographed] [--dir DIR | --postgres URL] [--broker nats|kafka|URL] [--addr HOST:PORT]
//
// With no flags the databases are SQLite files in ./shop-data and the broker
// is an embedded NATS JetStream server; three customers (c1, c2, c3, with
// credit limits of 100.00, 1,000.00 and 10,000.00) are created on first
// start.
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

	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/examples/shop/customer"
	"github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/internal/brokeropen"
	"github.com/troupedev/troupe/internal/servicedb"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "shop:", err)
		os.Exit(1)
	}
}

func run() error {
	mode := flag.String("mode", string(order.Orchestrated), "how CreateOrder runs: orchestrated (a saga) or choreographed (events)")
	dir := flag.String("dir", "shop-data", "directory of the SQLite databases and the embedded broker's files")
	pg := flag.String("postgres", "", "PostgreSQL server URL; each service gets a database troupe_shop_<service> there (created when missing)")
	brokerSpec := flag.String("broker", "nats", "broker: "+brokeropen.Usage)
	addr := flag.String("addr", "127.0.0.1:8080", "HTTP address of the services' APIs")
	flag.Parse()
	m, err := order.ParseMode(*mode)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dbs, err := servicedb.Open(ctx, servicedb.Config{Dir: *dir, Postgres: *pg, Prefix: "troupe_shop_"}, "order", "customer")
	if err != nil {
		return err
	}
	defer dbs.Close()
	ob, err := brokeropen.Open(ctx, *brokerSpec, *dir, log)
	if err != nil {
		return err
	}
	defer ob.Close()
	s, err := shop.Start(ctx, shop.Config{
		OrderDB: dbs.DBs["order"], CustomerDB: dbs.DBs["customer"], Broker: ob.Broker,
		Order:    order.Config{Mode: m, Logger: log},
		Customer: customer.Config{Logger: log},
	})
	if err != nil {
		return err
	}
	defer s.Stop()
	if cs, err := s.Customer().List(ctx); err == nil && len(cs) == 0 {
		for i, limit := range []int64{10_000, 100_000, 1_000_000} {
			c := customer.Customer{ID: fmt.Sprintf("c%d", i+1), Name: []string{"Ada", "Grace", "Edsger"}[i], CreditLimit: limit}
			if err := s.Customer().Create(ctx, c); err != nil {
				return err
			}
		}
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	log.Info("shop: serving", "addr", "http://"+ln.Addr().String(), "mode", m, "databases", dbs.Description, "broker", ob.Description)
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
