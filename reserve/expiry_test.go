package reserve_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/timer"
)

// The expiry timer releases a held packet, and only a held one: the
// confirmed order keeps its packet, the expired one cannot confirm, and
// its packet goes to the next order.
func TestExpiry_TimerReleasesHeldPacketsOnly(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "pizza", "p1", "p2")
			a, err := e.try(t, "order-a", "pizza", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := e.try(t, "order-b", "pizza", time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Confirm(ctx, "order-b"); err != nil {
				t.Fatal(err)
			}
			e.run(t)

			e.clock.Advance(time.Minute)
			waitFor(t, "order-a to expire", func() bool { return e.get(t, "order-a").State == reserve.Expired })
			e.wantResource(t, "pizza", a.Resource, reserve.ResourceFree, "")
			if got := e.get(t, "order-b"); got.State != reserve.Confirmed {
				t.Fatalf("confirmed order-b is %s after the expiry", got.State)
			}
			e.wantResource(t, "pizza", e.get(t, "order-b").Resource, reserve.ResourceAssigned, "order-b")

			if _, err := e.r.Confirm(ctx, "order-a"); !errors.Is(err, reserve.ErrReservationExpired) {
				t.Fatalf("Confirm after the timer fired: %v, want ErrReservationExpired", err)
			}
			e.wantResource(t, "pizza", a.Resource, reserve.ResourceFree, "")
			c, err := e.try(t, "order-c", "pizza", time.Minute)
			if err != nil || c.Resource != a.Resource {
				t.Fatalf("Try after the expiry: %+v, %v; want %s", c, err, a.Resource)
			}
		})
	}
}

// Confirm at the expiry, before the timer fires, is refused and frees the
// packet at once; the packet is never assigned to the expired order, and
// the timer, when the scheduler runs, does not touch the next holder.
func TestConfirm_AtExpiryBeforeTheTimerFailsAndFreesThePacket(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "pizza", "p1")
			if _, err := e.try(t, "order-a", "pizza", time.Minute); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(time.Minute) // exactly the expiry; no scheduler runs
			if _, err := e.r.Confirm(ctx, "order-a"); !errors.Is(err, reserve.ErrReservationExpired) {
				t.Fatalf("Confirm at the expiry: %v, want ErrReservationExpired", err)
			}
			if got := e.get(t, "order-a"); got.State != reserve.Expired {
				t.Fatalf("order-a is %s, want expired", got.State)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceFree, "")
			if _, err := e.try(t, "order-a", "pizza", time.Minute); !errors.Is(err, reserve.ErrReservationExpired) {
				t.Fatalf("Try repeated after the expiry: %v, want ErrReservationExpired", err)
			}

			if _, err := e.try(t, "order-b", "pizza", time.Hour); err != nil {
				t.Fatalf("Try of the released packet: %v", err)
			}
			e.run(t)
			e.fireStaleExpiry(t, "order-a")
			e.wantResource(t, "pizza", "p1", reserve.ResourceHeld, "order-b")
			if _, err := e.r.Confirm(ctx, "order-b"); err != nil {
				t.Fatalf("Confirm of order-b: %v", err)
			}
		})
	}
}

// A stale expiry timer (one a Confirm could not delete because a scheduler
// was firing it) leaves the confirmed reservation assigned.
func TestExpiry_StaleTimerLeavesConfirmedReservationAssigned(t *testing.T) {
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
			e.run(t)
			e.fireStaleExpiry(t, "order-1")
			if got := e.get(t, "order-1"); got.State != reserve.Confirmed {
				t.Fatalf("order-1 is %s after a stale expiry timer, want confirmed", got.State)
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceAssigned, "order-1")
		})
	}
}

// fireStaleExpiry fires, on the running scheduler, an expiry timer for
// reservation id as its own would be (but for its timer id), and waits
// until it has fired.
func (e *env) fireStaleExpiry(t *testing.T, id string) {
	t.Helper()
	stale := message.New("/test", "dev.troupe.reserve.expire", nil)
	stale.Subject = id
	if err := e.sched.Schedule(context.Background(), e.clock.Now(), timer.ToHandler(reserve.ExpireHandler), stale); err != nil {
		t.Fatal(err)
	}
	e.sched.Notify()
	waitFor(t, "the stale expiry timer to fire", func() bool {
		return e.count(t, `SELECT COUNT(*) FROM troupe_timers WHERE id = $1`, stale.ID) == 0
	})
}

// A Cancel takes the reservation's expiry timer with it, and a stale
// expiry timer (one left from before, or a copy) changes nothing of a
// cancelled or released reservation: it stays as it was, its resource with
// whoever holds it now.
func TestExpiry_CancelTakesItsTimerAndStaleTimersLeaveEndedReservationsAlone(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx := context.Background()
			e.add(t, "agents", "ada", "bob")
			for _, id := range []string{"order-1", "order-2"} {
				if _, err := e.try(t, id, "agents", time.Minute); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := e.r.Cancel(ctx, "order-1"); err != nil {
				t.Fatal(err)
			}
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_timers WHERE target = $1`, reserve.ExpireHandler); n != 1 {
				t.Fatalf("%d expiry timers after one of two holds was cancelled, want 1 (the other's)", n)
			}
			if _, err := e.r.Confirm(ctx, "order-2"); err != nil {
				t.Fatal(err)
			}
			if _, err := e.r.Release(ctx, "order-2"); err != nil {
				t.Fatal(err)
			}
			if _, err := e.try(t, "order-3", "agents", time.Minute); err != nil { // takes a freed agent
				t.Fatal(err)
			}
			held := e.get(t, "order-3").Resource
			e.run(t)
			e.fireStaleExpiry(t, "order-1")
			e.fireStaleExpiry(t, "order-2")
			if got := e.get(t, "order-1").State; got != reserve.Cancelled {
				t.Errorf("order-1 is %s after a stale expiry timer, want cancelled", got)
			}
			if got := e.get(t, "order-2").State; got != reserve.Released {
				t.Errorf("order-2 is %s after a stale expiry timer, want released", got)
			}
			e.wantResource(t, "agents", held, reserve.ResourceHeld, "order-3")
		})
	}
}
