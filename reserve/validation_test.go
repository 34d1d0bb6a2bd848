package reserve_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/troupedev/troupe/reserve"
)

// Requests that cannot be served are refused with ErrInvalid and write
// nothing.
func TestValidation_BadRequestsAreInvalidAndWriteNothing(t *testing.T) {
	ok := reserve.Try{ID: "order-1", Pool: "pizza", Owner: "order-1", ExpiresAt: t0.Add(time.Minute)}
	with := func(change func(*reserve.Try)) reserve.Try { t := ok; change(&t); return t }
	tries := []struct {
		name string
		try  reserve.Try
	}{
		{"empty id", with(func(t *reserve.Try) { t.ID = "" })},
		{"empty pool", with(func(t *reserve.Try) { t.Pool = "" })},
		{"empty owner", with(func(t *reserve.Try) { t.Owner = "" })},
		{"no expiry", with(func(t *reserve.Try) { t.ExpiresAt = time.Time{} })},
		{"expiry in the past", with(func(t *reserve.Try) { t.ExpiresAt = t0.Add(-time.Second) })},
		{"expiry now", with(func(t *reserve.Try) { t.ExpiresAt = t0 })},
	}
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "pizza", "p1")
			for _, tc := range tries {
				if _, err := e.r.Try(ctx, tc.try); !errors.Is(err, reserve.ErrInvalid) {
					t.Errorf("Try with %s: %v, want ErrInvalid", tc.name, err)
				}
			}
			calls := []struct {
				name string
				call func() error
			}{
				{"Confirm of an empty id", func() error { _, err := e.r.Confirm(ctx, ""); return err }},
				{"Cancel of an empty id", func() error { _, err := e.r.Cancel(ctx, ""); return err }},
				{"Add to an empty pool", func() error { return e.r.Add(ctx, "", "p9") }},
				{"Add of no resource", func() error { return e.r.Add(ctx, "pizza") }},
				{"Add of an empty id", func() error { return e.r.Add(ctx, "pizza", "p9", "") }},
				{"Remove of an empty id", func() error { return e.r.Remove(ctx, "pizza", "") }},
			}
			for _, c := range calls {
				if err := c.call(); !errors.Is(err, reserve.ErrInvalid) {
					t.Errorf("%s: %v, want ErrInvalid", c.name, err)
				}
			}
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_reservations`); n != 0 {
				t.Errorf("%d reservations recorded, want 0", n)
			}
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_resources`); n != 1 {
				t.Errorf("%d resources, want p1 alone", n)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceFree, "")
		})
	}
}

// Remove takes free and assigned packets out of a pool, but not one an
// order holds: that order may still confirm it.
func TestRemove_RefusesAHeldPacketAndRemovesNone(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "pizza", "p1", "p2", "p3")
			e.add(t, "pizza", "p1") // again: harmless
			if _, err := e.r.Try(ctx, reserve.Try{ID: "order-1", Pool: "pizza", Resource: "p2", Owner: "order-1", ExpiresAt: t0.Add(time.Minute)}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Try(ctx, reserve.Try{ID: "order-2", Pool: "pizza", Resource: "p3", Owner: "order-2", ExpiresAt: t0.Add(time.Minute)}); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Confirm(ctx, "order-2"); err != nil {
				t.Fatal(err)
			}
			if err := e.r.Remove(ctx, "pizza", "p1", "p2"); !errors.Is(err, reserve.ErrInUse) {
				t.Fatalf("Remove of a held packet: %v, want ErrInUse", err)
			}
			if got := len(e.resources(t, "pizza")); got != 3 {
				t.Fatalf("%d packets after a refused Remove, want 3", got)
			}
			if err := e.r.Remove(ctx, "pizza", "p1", "p3", "p404"); err != nil {
				t.Fatalf("Remove of a free and an assigned packet: %v", err)
			}
			left := e.resources(t, "pizza")
			if len(left) != 1 || left["p2"].State != reserve.ResourceHeld {
				t.Fatalf("packets left: %+v, want p2 held", left)
			}
			if got := e.get(t, "order-2"); got.State != reserve.Confirmed {
				t.Fatalf("order-2 is %s after its packet was removed, want confirmed", got.State)
			}
		})
	}
}
