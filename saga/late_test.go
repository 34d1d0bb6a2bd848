package saga_test

import (
	"context"
	"testing"
	"time"

	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// The participant was down past every deadline of the action, then refuses
// it (over the limit): the compensation the saga sent meanwhile must not
// release credit that was never reserved.
func TestOrchestrator_CompensationOfALateRefusedActionReleasesNothing(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newShop(t, kind)
			s.placeOrder(orderData{OrderID: "r1", Customer: "alice", Total: 500})
			waitHistory(t, s, "r1", "reserve-credit action 1 sent")
			s.clock.Advance(time.Minute)
			waitHistory(t, s, "r1", "reserve-credit action 2 sent")
			s.clock.Advance(time.Minute)
			waitHistory(t, s, "r1", "reserve-credit compensation 1 sent")
			s.startCustomer() // queue: action 1 (refused), action 2, compensation 1
			s.waitStatus("r1", saga.Compensated)
			if got := s.customer.reserved(t); got != 0 {
				t.Fatalf("customer reserved %d, want 0: the compensation undid a refused action", got)
			}
		})
	}
}

// The participant was down past the compensation's CompensationTimeout:
// the saga parks. It comes back and compensates (the saga, parked, ignores
// the answer); the operator retries: the saga must end compensated.
func TestOrchestrator_AnOperatorRetryAfterALateCompensationEnds(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			// Two sends of a minute each (Deadline is a minute, and so is
			// the cap of a compensation's wait), then the saga parks.
			s := newShop(t, kind, compensationTimeout("reserve-credit", 2*time.Minute))
			s.placeOrder(orderData{OrderID: "r2", Customer: "alice", Total: 20})
			waitHistory(t, s, "r2", "reserve-credit action 1 sent")
			s.clock.Advance(time.Minute)
			waitHistory(t, s, "r2", "reserve-credit action 2 sent")
			s.clock.Advance(time.Minute)
			waitHistory(t, s, "r2", "reserve-credit compensation 1 sent")
			s.clock.Advance(time.Minute)
			waitHistory(t, s, "r2", "reserve-credit compensation 2 sent")
			s.clock.Advance(time.Minute)
			s.waitStatus("r2", saga.Parked)
			s.startCustomer()
			deadline := time.Now().Add(20 * time.Second)
			for n := 0; n < 2; {
				n = 0
				for _, h := range s.history("r2") {
					if h == "reserve-credit compensation 0 ignored-reply" || h == "reserve-credit action 0 ignored-reply" {
						n++
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("the late replies never came: %q", s.history("r2"))
				}
				time.Sleep(5 * time.Millisecond)
			}
			if err := s.orderDB.InTx(s.ctx, func(ctx context.Context, tx sqldb.Tx) error { return s.o.RetryTx(ctx, tx, "saga-r2") }); err != nil {
				t.Fatal(err)
			}
			s.waitStatus("r2", saga.Compensated)
			if got := s.customer.reserved(t); got != 0 {
				t.Fatalf("customer reserved %d, want 0", got)
			}
		})
	}
}

// An operator's retry of a compensation the participant refused runs it
// again, and its answer comes back.
func TestOrchestrator_ARefusedCompensationRunsAgainWhenRetried(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			c := newCustomerService(t, kind)
			refuse := true
			undo := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
				if refuse {
					return saga.Failure("ledger closed"), nil
				}
				_, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved - 30 WHERE id = 'alice'`)
				return saga.Success(nil), err
			}
			reserve := func(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
				_, err := tx.Exec(ctx, `UPDATE customers SET reserved = reserved + 30 WHERE id = 'alice'`)
				return saga.Success(nil), err
			}
			if err := c.p.Handle("shop.customer.reserve-credit", reserve, undo); err != nil {
				t.Fatal(err)
			}
			for _, op := range []saga.Op{saga.Action, saga.Compensation} {
				if err := c.deliver(t, c.command(t, "s", op, 30)); err != nil {
					t.Fatal(err)
				}
			}
			refuse = false
			if err := c.deliver(t, c.command(t, "s", saga.Compensation, 30)); err != nil { // RetryTx's new command
				t.Fatal(err)
			}
			rs := c.replies(t)
			if got := c.reserved(t); got != 0 || len(rs) != 3 || rs[2].Outcome != saga.Succeeded {
				t.Fatalf("reserved %d, %d replies: want 0 and the retried compensation answered success", got, len(rs))
			}
		})
	}
}
