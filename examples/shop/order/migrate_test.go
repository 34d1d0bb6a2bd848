package order

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// A database made before Idempotency-Keys (the service's schema version 1)
// upgrades in place: its orders stay, readable and without a key, and a
// key is unique from then on.
func TestMigrate_ADatabaseOfVersion1UpgradesKeepingItsOrders(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			url := "sqlite://" + filepath.Join(t.TempDir(), "order.db")
			if kind == "postgres" {
				url = pgtest.URL(t)
			}
			db, err := sqldb.Open(ctx, url, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if err := db.Migrate(ctx, "shop.order", migrations[:1]); err != nil {
				t.Fatal(err)
			}
			now := time.Now().UTC().Truncate(time.Microsecond)
			insert := func(id string, key any) error {
				q := `INSERT INTO shop_orders (id, customer_id, items, total, state, mode, created_at, updated_at)
					VALUES ($1, 'c1', '[{"sku":"tea","quantity":1,"unit_price":100}]', 100, 'APPROVED', 'orchestrated', $2, $2)`
				args := []any{id, now}
				if key != nil {
					q = `INSERT INTO shop_orders (id, customer_id, items, total, state, mode, created_at, updated_at, idempotency_key)
						VALUES ($1, 'c1', '[]', 100, 'PENDING', 'orchestrated', $2, $2, $3)`
					args = append(args, key)
				}
				_, err := db.Exec(ctx, q, args...)
				return err
			}
			for _, id := range []string{"old-1", "old-2"} {
				if err := insert(id, nil); err != nil {
					t.Fatal(err)
				}
			}
			if err := Migrate(ctx, db); err != nil {
				t.Fatalf("upgrade: %v", err)
			}
			s := &Service{db: db}
			for _, id := range []string{"old-1", "old-2"} {
				if o, err := s.Get(ctx, id); err != nil || o.State != Approved || o.Total != 100 {
					t.Fatalf("order %s after the upgrade: %+v, %v", id, o, err)
				}
			}
			if err := insert("new-1", "k-1"); err != nil {
				t.Fatalf("an order with a key: %v", err)
			}
			if err := insert("new-2", "k-1"); err == nil {
				t.Fatal("a second order with the same key was stored")
			}
		})
	}
}
