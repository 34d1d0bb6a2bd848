package reserve

import (
	"context"
	"errors"
	"fmt"

	"github.com/troupedev/troupe/sqldb"
)

// Released: a confirmed reservation whose owner is done with its resource
// (an agent back from a delivery), freed by Release.
const Released State = "released"

// ErrNotConfirmed is returned by Release for a reservation that is not
// confirmed: a held resource is let go with Cancel, and one never assigned
// cannot have been used. Nothing is written.
var ErrNotConfirmed = errors.New("reserve: reservation not confirmed")

// ReleaseTx frees the resource of confirmed reservation id once its owner
// is done with it, for resources that come back after use (an agent back
// from a delivery; a packet eaten never does): the resource is free for
// other Trys, and the reservation is recorded released, keeping the
// resource's id as a record of the use.
//
// A released reservation is released again with no second effect, so a
// repeated call never frees the resource from a reservation that took it
// since. Any other state gives an error matching ErrNotConfirmed (ErrNotFound
// for an unknown id), and nothing is written. A later Cancel of a released
// reservation does nothing: what was used cannot be undone.
func (r *Reserver) ReleaseTx(ctx context.Context, tx sqldb.Tx, id string) (Reservation, error) {
	if id == "" {
		return Reservation{}, fmt.Errorf("%w: release: empty id", ErrInvalid)
	}
	res, err := lock(ctx, tx, id)
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: release %q: %w", id, err)
	}
	switch res.State {
	case Released:
		return res, nil
	case Confirmed:
	default:
		return res, fmt.Errorf("%w: release %q: it is %s", ErrNotConfirmed, id, res.State)
	}
	if err := r.release(ctx, tx, &res, Released, stamp(r.now()), false); err != nil {
		return Reservation{}, fmt.Errorf("reserve: release %q: %w", id, err)
	}
	return res, nil
}

// Release is ReleaseTx in a transaction of its own.
func (r *Reserver) Release(ctx context.Context, id string) (Reservation, error) {
	var res Reservation
	err := r.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		res, err = r.ReleaseTx(ctx, tx, id)
		return err
	})
	return res, err
}
