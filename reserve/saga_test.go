package reserve_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// sagaCmd is a command of a reservations saga for the glue's step
// functions.
func sagaCmd(t *testing.T, sagaID string, op saga.Op, input any) *saga.Command {
	t.Helper()
	raw, err := json.Marshal(input)
	if err != nil {
		t.Fatal(err)
	}
	m, err := saga.NewCommand("/test", "delivery.agent", sagaID, "delivery.try.agent", op, "replies",
		saga.ReservationCommand{Reservation: "delivery.agent", ExpiryMS: 60_000, Input: raw})
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := saga.ParseCommand(m)
	if err != nil {
		t.Fatal(err)
	}
	return cmd
}

// The glue answers business refusals and unknown reservations with a
// Failure (committed: the saga compensates), but a Cancel that could not
// be applied is an error (rolled back and retried), never a Success that
// would leave a resource assigned to an order not placed.
func TestSagaSteps_RefusalsAreFailuresAndAFailedCancelIsAnError(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, kind, 0)
			e.add(t, "agents", "a1")
			step := func(f saga.StepFunc, ctx context.Context, cmd *saga.Command) (saga.Reply, error) {
				var rep saga.Reply
				err := e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					var err error
					rep, err = f(ctx, tx, cmd)
					return err
				})
				return rep, err
			}
			try := sagaCmd(t, "order-1", saga.Action, reserve.SagaRequest{Pool: "agents"})
			if rep, err := step(e.r.TryStep, ctx, try); err != nil || rep.Outcome != saga.Succeeded {
				t.Fatalf("Try: %+v, %v; want success", rep, err)
			}
			if rep, err := step(e.r.TryStep, ctx, sagaCmd(t, "order-2", saga.Action, reserve.SagaRequest{Pool: "agents"})); err != nil || rep.Outcome == saga.Succeeded {
				t.Fatalf("Try with nothing free: %+v, %v; want a failure reply, no error", rep, err)
			}
			if rep, err := step(e.r.TryStep, ctx, sagaCmd(t, "order-3", saga.Action, reserve.SagaRequest{})); err != nil || rep.Outcome == saga.Succeeded {
				t.Fatalf("Try without a pool: %+v, %v; want a failure reply (invalid), not a retry", rep, err)
			}
			if rep, err := step(e.r.ConfirmStep, ctx, sagaCmd(t, "order-4", saga.Action, reserve.SagaRequest{Pool: "agents"})); err != nil || rep.Outcome == saga.Succeeded {
				t.Fatalf("Confirm of a reservation never tried: %+v, %v; want a failure reply, not a retry", rep, err)
			}

			cancelled, cancel := context.WithCancel(ctx)
			cancel()
			cancelCmd := sagaCmd(t, "order-1", saga.Compensation, reserve.SagaRequest{Pool: "agents"})
			err := e.db.InTx(ctx, func(_ context.Context, tx sqldb.Tx) error {
				rep, err := e.r.CancelStep(cancelled, tx, cancelCmd)
				if err == nil {
					t.Errorf("Cancel that could not run: reply %+v, no error; want an error", rep)
				}
				return errors.New("roll back")
			})
			if err == nil {
				t.Fatal("the transaction committed")
			}
			if got := e.get(t, reserve.SagaReservationID("order-1", "delivery.agent")).State; got != reserve.Held {
				t.Fatalf("after the failed Cancel the reservation is %s, want still held", got)
			}
		})
	}
}
