package order

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

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
			if err := db.Migrate(ctx, "delivery.order", migrations[:1]); err != nil {
				t.Fatal(err)
			}
			now := time.Now().UTC().Truncate(time.Microsecond)
			insert := func(id string, key any) error {
				q := `INSERT INTO delivery_orders (id, food_id, quantity, state, packets, agent, created_at, updated_at)
					VALUES ($1, 'pizza', 1, 'PLACED', 'pizza-1', 'agent-01', $2, $2)`
				args := []any{id, now}
				if key != nil {
					q = `INSERT INTO delivery_orders (id, food_id, quantity, state, created_at, updated_at, idempotency_key)
						VALUES ($1, 'pizza', 1, 'PENDING', $2, $2, $3)`
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
			for _, id := range []string{"old-1", "old-2"} {
				if o, err := getOrder(ctx, db, id); err != nil || o.State != Placed || o.Agent != "agent-01" {
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
