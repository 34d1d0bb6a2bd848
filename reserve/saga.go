package reserve

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// SagaRequest is what a saga asks a Reserver to hold: the Input of a
// saga.Reserve whose participant is served by HandleSaga. Its JSON names
// are part of the protocol: they never change.
type SagaRequest struct {
	// Pool is the pool to reserve in. Required.
	Pool string `json:"pool"`
	// Resource is the resource wanted. Default "": any free one.
	Resource string `json:"resource,omitempty"`
	// Owner is who the resource is for. Default: the saga id.
	Owner string `json:"owner,omitempty"`
}

// SagaReply is the data of the reply to a saga's Try and Confirm: the
// reservation as it stands. A saga.Reserve's OnReserved reads it from the
// Try's reply.
type SagaReply struct {
	// Reservation is the reservation's id (SagaReservationID).
	Reservation string `json:"reservation"`
	// Pool, Resource and Owner say what is held (or assigned), and for whom.
	Pool     string `json:"pool"`
	Resource string `json:"resource"`
	Owner    string `json:"owner"`
	// State is held after a Try, confirmed after a Confirm.
	State State `json:"state"`
	// ExpiresAt is when the hold ends unless confirmed: the first Try's.
	ExpiresAt time.Time `json:"expires_at"`
}

// SagaReservationID returns the id under which HandleSaga records the
// reservation named reservation (saga.ReservationCommand.Reservation) of
// saga sagaID: the Try, the Confirm and their Cancels all name it.
func SagaReservationID(sagaID, reservation string) string { return sagaID + "/" + reservation }

// HandleSaga registers with p the two phases of a saga.Reserve whose
// participant this Reserver is: tryCommand (the Reserve's TryCommand) with
// TryStep as its action and CancelStep as its compensation, confirmCommand
// (its ConfirmCommand) with ConfirmStep and CancelStep. Subscribe
// p.Handler to the Reserve's Topic to serve them over the broker; serve
// p.HTTPHandler(db, tryCommand) at its TryURL and p.HTTPHandler(db,
// confirmCommand) at its ConfirmURL to serve them over HTTP. p's inbox,
// and db, must be the Reserver's database (with saga.Migrate's tables for
// HTTP), so that each call's writes, its barrier and its reply commit
// together.
func (r *Reserver) HandleSaga(p *saga.Participant, tryCommand, confirmCommand string) error {
	if tryCommand == confirmCommand {
		return fmt.Errorf("%w: HandleSaga: the try and confirm commands are both %q: a participant tells the phases apart by them", ErrInvalid, tryCommand)
	}
	if err := p.Handle(tryCommand, r.TryStep, r.CancelStep); err != nil {
		return err
	}
	return p.Handle(confirmCommand, r.ConfirmStep, r.CancelStep)
}

// TryStep is the action of phase 1 (a saga.StepFunc): TryTx for the
// command's reservation, holding a resource of its SagaRequest's pool for
// the command's expiry, counted from now. A Try already recorded keeps its
// first expiry and answers from the record. It replies a SagaReply; a
// refusal (ErrRefused: none free, cancelled before this Try) or a request
// that cannot be served as given (ErrInvalid) is a failure reply, recorded
// with the transaction; any other error rolls it back, to be retried.
func (r *Reserver) TryStep(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	c, err := sagaCommand(cmd)
	if err != nil {
		return saga.Failure(err.Error()), nil
	}
	var req SagaRequest
	if len(c.Input) > 0 {
		if err := json.Unmarshal(c.Input, &req); err != nil {
			return saga.Failure(fmt.Sprintf("reserve: the input of %s is no reserve.SagaRequest: %v", c.Reservation, err)), nil
		}
	}
	if req.Owner == "" {
		req.Owner = cmd.SagaID
	}
	res, err := r.TryTx(ctx, tx, Try{ID: SagaReservationID(cmd.SagaID, c.Reservation), Pool: req.Pool, Resource: req.Resource,
		Owner: req.Owner, ExpiresAt: r.now().Add(c.Expiry())})
	return sagaAnswer(res, err)
}

// ConfirmStep is the action of phase 2 (a saga.StepFunc): ConfirmTx for
// the command's reservation. It replies a SagaReply; a refusal (the
// reservation expired or was cancelled) is a failure reply, and so is an
// unknown reservation; any other error rolls back, to be retried.
func (r *Reserver) ConfirmStep(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	c, err := sagaCommand(cmd)
	if err != nil {
		return saga.Failure(err.Error()), nil
	}
	res, err := r.ConfirmTx(ctx, tx, SagaReservationID(cmd.SagaID, c.Reservation))
	return sagaAnswer(res, err)
}

// CancelStep is the compensation of both phases (a saga.StepFunc):
// CancelTx for the command's reservation, which releases a held resource,
// un-assigns a confirmed one, and does nothing the second time. It never
// refuses a well-formed command; an error rolls back, to be retried.
func (r *Reserver) CancelStep(ctx context.Context, tx sqldb.Tx, cmd *saga.Command) (saga.Reply, error) {
	c, err := sagaCommand(cmd)
	if err != nil {
		return saga.Failure(err.Error()), nil
	}
	if _, err := r.CancelTx(ctx, tx, SagaReservationID(cmd.SagaID, c.Reservation)); err != nil {
		return saga.Reply{}, err
	}
	return saga.Success(nil), nil
}

// sagaCommand reads a reservation's command.
func sagaCommand(cmd *saga.Command) (saga.ReservationCommand, error) {
	var c saga.ReservationCommand
	if err := json.Unmarshal(cmd.Msg.Data, &c); err != nil {
		return c, fmt.Errorf("reserve: %s of step %q is no saga.ReservationCommand: %w", cmd.Op, cmd.Step, err)
	}
	if c.Reservation == "" || c.ExpiryMS <= 0 {
		return c, fmt.Errorf("reserve: %s of step %q: want a reservation and a positive expiry_ms, have %q and %d", cmd.Op, cmd.Step, c.Reservation, c.ExpiryMS)
	}
	return c, nil
}

// sagaAnswer is the reply to a Try or Confirm that returned res and err.
func sagaAnswer(res Reservation, err error) (saga.Reply, error) {
	switch {
	case err == nil:
		return saga.Success(SagaReply{Reservation: res.ID, Pool: res.Pool, Resource: res.Resource, Owner: res.Owner,
			State: res.State, ExpiresAt: res.ExpiresAt}), nil
	case errors.Is(err, ErrRefused), errors.Is(err, ErrInvalid), errors.Is(err, ErrNotFound):
		return saga.Failure(err.Error()), nil
	}
	return saga.Reply{}, err
}
