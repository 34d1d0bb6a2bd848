package reserve_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/troupedev/troupe/reserve"
)

// An agent back from a delivery is free for the next order: Release frees
// a confirmed reservation's resource, once. A repeated Release, and a late
// Cancel of the delivered order, never free the agent from the order that
// took it since.
func TestRelease_FreesAConfirmedResourceOnceAndNeverAnotherReservations(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, kind, 0)
			e.add(t, "agents", "a1")
			if _, err := e.try(t, "o1", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Confirm(ctx, "o1"); err != nil {
				t.Fatal(err)
			}
			res, err := e.r.Release(ctx, "o1")
			if err != nil {
				t.Fatal(err)
			}
			if res.State != reserve.Released || res.Resource != "a1" {
				t.Fatalf("released %+v: want state released, resource a1 kept as the record", res)
			}
			e.wantResource(t, "agents", "a1", reserve.ResourceFree, "")

			if _, err := e.try(t, "o2", "agents", time.Minute); err != nil {
				t.Fatalf("the next order's Try after the release: %v", err)
			}
			if _, err := e.r.Confirm(ctx, "o2"); err != nil {
				t.Fatal(err)
			}
			if res, err := e.r.Release(ctx, "o1"); err != nil || res.State != reserve.Released {
				t.Fatalf("repeated Release: %+v, %v; want released, no error", res, err)
			}
			if res, err := e.r.Cancel(ctx, "o1"); err != nil || res.State != reserve.Released {
				t.Fatalf("Cancel after Release: %+v, %v; want it left released", res, err)
			}
			// A Try or Confirm of o1 redelivered after its release is
			// answered as the first was, not retried forever.
			if res, err := e.r.Confirm(ctx, "o1"); err != nil || res.State != reserve.Released {
				t.Fatalf("Confirm repeated after Release: %+v, %v; want the first answer (no error), left released", res, err)
			}
			if _, err := e.try(t, "o1", "agents", time.Minute); err != nil {
				t.Fatalf("Try repeated after Release: %v; want the first answer (no error)", err)
			}
			e.wantResource(t, "agents", "a1", reserve.ResourceAssigned, "o2")
			e.wantResource(t, "agents", "a1", reserve.ResourceAssigned, "o2")
			if got := e.get(t, "o1").State; got != reserve.Released {
				t.Fatalf("o1 is %s, want released", got)
			}
		})
	}
}

// Only what was assigned can be given back: a held, cancelled or unknown
// reservation is refused, and nothing changes.
func TestRelease_RefusesAReservationNotConfirmed(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, kind, 0)
			e.add(t, "agents", "a1", "a2")
			if _, err := e.try(t, "held", "agents", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Cancel(ctx, "cancelled"); err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				id      string
				wantErr error
			}{
				{"held", reserve.ErrNotConfirmed},
				{"cancelled", reserve.ErrNotConfirmed},
				{"unknown", reserve.ErrNotFound},
				{"", reserve.ErrInvalid},
			} {
				if _, err := e.r.Release(ctx, tc.id); !errors.Is(err, tc.wantErr) {
					t.Errorf("Release(%q): %v, want %v", tc.id, err, tc.wantErr)
				}
			}
			e.wantResource(t, "agents", "a1", reserve.ResourceHeld, "held")
			if got := e.get(t, "held").State; got != reserve.Held {
				t.Fatalf("the held reservation is %s after a refused Release, want held", got)
			}
		})
	}
}
