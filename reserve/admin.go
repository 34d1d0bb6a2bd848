package reserve

import (
	"context"
	"errors"
	"fmt"

	"github.com/troupedev/troupe/sqldb"
)

// Get returns reservation id as recorded, or an error matching
// ErrNotFound. A held reservation past its ExpiresAt is still shown held
// until its timer (or a Confirm) releases it; it can no longer be
// confirmed.
func (r *Reserver) Get(ctx context.Context, id string) (Reservation, error) {
	res, err := scanReservation(r.db.QueryRow(ctx, selectReservation+` WHERE id = $1`, id))
	if errors.Is(err, sqldb.ErrNoRows) {
		return Reservation{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err != nil {
		return Reservation{}, fmt.Errorf("reserve: get %q: %w", id, err)
	}
	return res, nil
}

// DefaultListLimit is Filter.Limit's default.
const DefaultListLimit = 100

// Filter selects the reservations List returns. Empty fields match all.
type Filter struct {
	// Pool, Owner and State, when set, must match.
	Pool, Owner string
	State       State
	// Limit caps the number listed. Default 100.
	Limit int
}

// List returns the reservations that match f, oldest first.
func (r *Reserver) List(ctx context.Context, f Filter) ([]Reservation, error) {
	if f.Limit <= 0 {
		f.Limit = DefaultListLimit
	}
	rows, err := r.db.Query(ctx, selectReservation+`
		WHERE ($1 = '' OR pool = $1) AND ($2 = '' OR owner = $2) AND ($3 = '' OR state = $3)
		ORDER BY created_at, id LIMIT $4`, f.Pool, f.Owner, string(f.State), f.Limit)
	if err != nil {
		return nil, fmt.Errorf("reserve: list reservations: %w", err)
	}
	var out []Reservation
	for rows.Next() {
		res, err := scanReservation(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("reserve: list reservations: %w", err)
		}
		out = append(out, res)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("reserve: list reservations: %w", err)
	}
	return out, nil
}
