package reserve_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/troupedev/troupe/reserve"
)

// A Try repeated (a redelivery, a retry after a lost answer) holds nothing
// more and answers with the same resource.
func TestTry_RepeatedHoldsOnePacketAndAnswersTheSame(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			e.add(t, "pizza", "p1", "p2")
			first, err := e.try(t, "order-1", "pizza", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			again, err := e.try(t, "order-1", "pizza", 2*time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if again != first {
				t.Fatalf("repeated Try answered %+v, first %+v", again, first)
			}
			if got := e.get(t, "order-1"); got != first {
				t.Fatalf("Get: %+v, want what Try answered, %+v", got, first)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceHeld, "order-1")
			e.wantResource(t, "pizza", "p2", reserve.ResourceFree, "")
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_timers`); n != 1 {
				t.Fatalf("%d expiry timers, want 1", n)
			}
		})
	}
}

// A reservation id reused by another order must not pass for its own.
func TestTry_ReservationIDOfAnotherOwnerIsInvalid(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			e.add(t, "pizza", "p1", "p2")
			if _, err := e.try(t, "r-1", "pizza", time.Minute); err != nil {
				t.Fatal(err)
			}
			_, err := e.r.Try(context.Background(), reserve.Try{ID: "r-1", Pool: "pizza", Owner: "order-9", ExpiresAt: t0.Add(time.Minute)})
			if !errors.Is(err, reserve.ErrInvalid) {
				t.Fatalf("Try of a taken id by another owner: %v, want ErrInvalid", err)
			}
			e.wantResource(t, "pizza", "p2", reserve.ResourceFree, "")
		})
	}
}

// A Cancel that overtakes its Try (the saga gave up before the Try
// arrived) succeeds with nothing to release, and the late Try is refused:
// otherwise it would hold a packet that no Cancel would ever release.
func TestCancel_BeforeTryRefusesTheLateTry(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			e.add(t, "pizza", "p1")
			res, err := e.r.Cancel(context.Background(), "order-1")
			if err != nil || res.State != reserve.Cancelled {
				t.Fatalf("Cancel before Try: %+v, %v; want cancelled", res, err)
			}
			if _, err := e.try(t, "order-1", "pizza", time.Minute); !errors.Is(err, reserve.ErrCancelled) {
				t.Fatalf("late Try: %v, want ErrCancelled", err)
			}
			if _, err := e.r.Confirm(context.Background(), "order-1"); !errors.Is(err, reserve.ErrCancelled) {
				t.Fatalf("Confirm after the Cancel: %v, want ErrCancelled", err)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceFree, "")
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d timers left by a refused Try, want 0", n)
			}
		})
	}
}

// Confirm twice assigns once; Cancel after Confirm un-assigns, and a
// Confirm after that is refused.
func TestConfirm_RepeatedAssignsOnceAndCancelUnassigns(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "agents", "ada")
			if _, err := e.try(t, "order-1", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			first, err := e.r.Confirm(ctx, "order-1")
			if err != nil || first.State != reserve.Confirmed || first.Resource != "ada" {
				t.Fatalf("Confirm: %+v, %v", first, err)
			}
			e.clock.Advance(30 * time.Second)
			again, err := e.r.Confirm(ctx, "order-1")
			if err != nil || again != first {
				t.Fatalf("repeated Confirm: %+v, %v; want %+v", again, err, first)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceAssigned, "order-1")
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d expiry timers left after Confirm, want 0", n)
			}
			// Past the expiry, a confirmed reservation stays assigned.
			e.clock.Advance(time.Hour)
			if _, err := e.r.Confirm(ctx, "order-1"); err != nil {
				t.Fatalf("Confirm of a confirmed reservation past its expiry: %v", err)
			}

			res, err := e.r.Cancel(ctx, "order-1")
			if err != nil || res.State != reserve.Cancelled {
				t.Fatalf("Cancel after Confirm: %+v, %v", res, err)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceFree, "")
			if _, err := e.r.Confirm(ctx, "order-1"); !errors.Is(err, reserve.ErrCancelled) {
				t.Fatalf("Confirm after Cancel: %v, want ErrCancelled", err)
			}
			if _, err := e.r.Confirm(ctx, "order-404"); !errors.Is(err, reserve.ErrNotFound) {
				t.Fatalf("Confirm of an unknown reservation: %v, want ErrNotFound", err)
			}
		})
	}
}

// A Cancel repeated after another order took the freed packet leaves that
// order's hold alone.
func TestCancel_RepeatedNeverReleasesAnotherOrdersPacket(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "pizza", "p1")
			if _, err := e.try(t, "order-1", "pizza", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Cancel(ctx, "order-1"); err != nil {
				t.Fatal(err)
			}
			if _, err := e.try(t, "order-2", "pizza", time.Minute); err != nil {
				t.Fatalf("Try after the Cancel freed p1: %v", err)
			}
			res, err := e.r.Cancel(ctx, "order-1")
			if err != nil || res.State != reserve.Cancelled {
				t.Fatalf("repeated Cancel: %+v, %v", res, err)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceHeld, "order-2")
			if _, err := e.try(t, "order-1", "pizza", time.Minute); !errors.Is(err, reserve.ErrCancelled) {
				t.Fatalf("Try repeated after its Cancel: %v, want ErrCancelled", err)
			}

			held, err := e.r.List(ctx, reserve.Filter{Pool: "pizza", State: reserve.Held})
			if err != nil || len(held) != 1 || held[0].ID != "order-2" {
				t.Fatalf("List of held reservations: %+v, %v; want order-2 only", held, err)
			}
		})
	}
}
