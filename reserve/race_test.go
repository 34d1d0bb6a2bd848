package reserve_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// An expiry timer that fires while a Confirm is in flight waits for it,
// then finds the reservation confirmed: the order keeps its agent, which
// is never freed under it for another order to take.
func TestExpiry_FiringDuringAConfirmLeavesTheResourceAssigned(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			e.add(t, "agents", "ada")
			if _, err := e.try(t, "order-1", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			e.run(t)

			stale := message.New("/test", "dev.troupe.reserve.expire", nil)
			stale.Subject = "order-1"
			// On SQLite, whose write transactions take turns, the timer is
			// scheduled in the Confirm's transaction and fires after it.
			confirmed, commit := make(chan struct{}), make(chan struct{})
			done := make(chan error, 1)
			go func() {
				done <- e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					if _, err := e.r.ConfirmTx(ctx, tx, "order-1"); err != nil {
						return err
					}
					if kind == "sqlite" {
						if err := e.sched.ScheduleTx(ctx, tx, e.clock.Now(), timer.ToHandler(reserve.ExpireHandler), stale); err != nil {
							return err
						}
					}
					close(confirmed)
					select {
					case <-commit:
						return nil
					case <-ctx.Done():
						return ctx.Err()
					}
				})
			}()
			select {
			case <-confirmed:
			case err := <-done:
				t.Fatalf("confirm: %v", err)
			}
			if kind == "postgres" {
				if err := e.sched.Schedule(ctx, e.clock.Now(), timer.ToHandler(reserve.ExpireHandler), stale); err != nil {
					t.Fatal(err)
				}
				e.sched.Notify()
				waitFor(t, "the expiry to wait for the Confirm's locks", func() bool {
					return e.count(t, `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) == 1
				})
			}
			close(commit)
			if err := <-done; err != nil {
				t.Fatalf("confirm: %v", err)
			}
			e.sched.Notify()
			waitFor(t, "the expiry timer to fire", func() bool {
				return e.count(t, `SELECT COUNT(*) FROM troupe_timers WHERE id = $1`, stale.ID) == 0
			})
			if got := e.get(t, "order-1"); got.State != reserve.Confirmed {
				t.Fatalf("order-1 is %s, want confirmed", got.State)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceAssigned, "order-1")
		})
	}
}

// A Cancel of a confirmed reservation whose resource was removed, then
// added again and taken by another reservation, leaves the new holder
// alone: a Cancel only ever frees what its own reservation holds.
func TestCancel_OfAReservationWhoseResourceWasRemovedLeavesItsNewHolderAlone(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "agents", "ada")
			if _, err := e.try(t, "order-1", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Confirm(ctx, "order-1"); err != nil {
				t.Fatal(err)
			}
			if err := e.r.Remove(ctx, "agents", "ada"); err != nil { // ada leaves, assigned
				t.Fatal(err)
			}
			e.add(t, "agents", "ada") // and comes back
			if _, err := e.try(t, "order-2", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Cancel(ctx, "order-1"); err != nil {
				t.Fatal(err)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceHeld, "order-2")
			if _, err := e.r.Confirm(ctx, "order-2"); err != nil {
				t.Fatalf("order-2's Confirm after order-1's Cancel: %v", err)
			}
			if _, err := e.r.Release(ctx, "order-1"); !errors.Is(err, reserve.ErrNotConfirmed) {
				t.Fatalf("Release of cancelled order-1: %v, want ErrNotConfirmed", err)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceAssigned, "order-2")
		})
	}
}

// On PostgreSQL, a Try for any packet does not queue behind a
// transaction taking another: while order-x's Try is uncommitted, holding
// p1, order-y gets p2 at once. (SQLite's write transactions take turns.)
func TestTry_ConcurrentTryTakesAnotherFreePacketWithoutWaiting(t *testing.T) {
	e := newEnv(t, "postgres", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e.add(t, "pizza", "p1", "p2")
	xHolds, release := make(chan struct{}), make(chan struct{})
	xDone := make(chan error, 1)
	go func() {
		xDone <- e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if _, err := e.r.TryTx(ctx, tx, reserve.Try{ID: "order-x", Pool: "pizza", Owner: "order-x", ExpiresAt: t0.Add(time.Minute)}); err != nil {
				return err
			}
			close(xHolds)
			select {
			case <-release:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	select {
	case <-xHolds:
	case err := <-xDone:
		t.Fatalf("order-x: %v", err)
	}
	y, err := e.try(t, "order-y", "pizza", time.Minute) // order-x still holds p1, uncommitted
	close(release)
	if xerr := <-xDone; xerr != nil {
		t.Fatalf("order-x: %v", xerr)
	}
	if err != nil || y.Resource != "p2" {
		t.Fatalf("order-y: %+v, %v; want p2 while order-x was taking p1", y, err)
	}
}
