package demo

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/shop"
	"github.com/troupedev/troupe/sqldb"
)

// When the Order service could not be restarted (the restart's error ends
// the run), a client still holding an order to place reports that the
// service is not running: it does not crash the process, which would leave
// the run's PostgreSQL databases behind.
func TestWorkload_AClientWithoutARunningOrderServiceReturnsAnError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nb, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer nb.Close()
	open := func(name string) *sqldb.DB {
		db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(t.TempDir(), name+".db"), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		return db
	}
	s, err := shop.Start(ctx, shop.Config{OrderDB: open("order"), CustomerDB: open("customer"), Broker: nb})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if err := s.StopOrder(); err != nil { // as a failed restart leaves it
		t.Fatal(err)
	}
	w := &workload{cfg: Config{Orders: 1, Clients: 1, Seed: 1}, shop: s, limits: make([]int64, customers)}
	err = func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				t.Errorf("the client panicked: %v", r)
			}
		}()
		return w.one(ctx, rand.New(rand.NewPCG(1, 2)), 0)
	}()
	if err == nil {
		t.Error("the client placed an order without an Order service")
	}
}
