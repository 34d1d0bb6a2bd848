package reserve

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/troupedev/troupe/sqldb"
)

// AddTx adds resources ids, free, to pool. An id already in the pool is
// left as it is, so adding again is harmless.
func (r *Reserver) AddTx(ctx context.Context, tx sqldb.Tx, pool string, ids ...string) error {
	if err := checkResources("add", pool, ids); err != nil {
		return err
	}
	now := stamp(r.now())
	for _, id := range ids {
		if err := sqldb.ExecLater(ctx, tx, `INSERT INTO troupe_resources (pool, id, updated_at) VALUES ($1, $2, $3)
			ON CONFLICT (pool, id) DO NOTHING`, pool, id, now); err != nil {
			return fmt.Errorf("reserve: add %q to pool %q: %w", id, pool, err)
		}
	}
	return nil
}

// Add is AddTx in a transaction of its own.
func (r *Reserver) Add(ctx context.Context, pool string, ids ...string) error {
	return r.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return r.AddTx(ctx, tx, pool, ids...) })
}

// RemoveTx takes resources ids out of pool: a free one, or an assigned
// one (a packet delivered to its owner, whose reservation stays
// confirmed). An id not in the pool is ignored. A resource that a
// reservation holds is not removed, since its holder may still confirm
// it: RemoveTx then returns an error matching ErrInUse that names every
// such resource, after removing the others in tx; roll tx back to remove
// none (Remove does).
func (r *Reserver) RemoveTx(ctx context.Context, tx sqldb.Tx, pool string, ids ...string) error {
	if err := checkResources("remove", pool, ids); err != nil {
		return err
	}
	var held []string
	for _, id := range ids {
		n, err := tx.Exec(ctx, `DELETE FROM troupe_resources WHERE pool = $1 AND id = $2 AND state <> 'held'`, pool, id)
		if err != nil {
			return fmt.Errorf("reserve: remove %q from pool %q: %w", id, pool, err)
		}
		if n == 1 {
			continue
		}
		var reservation string
		err = tx.QueryRow(ctx, `SELECT reservation FROM troupe_resources WHERE pool = $1 AND id = $2`, pool, id).Scan(&reservation)
		switch {
		case errors.Is(err, sqldb.ErrNoRows):
		case err != nil:
			return fmt.Errorf("reserve: remove %q from pool %q: %w", id, pool, err)
		default:
			held = append(held, fmt.Sprintf("%q (by reservation %q)", id, reservation))
		}
	}
	if len(held) > 0 {
		return fmt.Errorf("%w: pool %q: %s", ErrInUse, pool, strings.Join(held, ", "))
	}
	return nil
}

// Remove is RemoveTx in a transaction of its own: if any resource is held,
// it removes none.
func (r *Reserver) Remove(ctx context.Context, pool string, ids ...string) error {
	return r.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return r.RemoveTx(ctx, tx, pool, ids...) })
}

func checkResources(op, pool string, ids []string) error {
	var errs []error
	if pool == "" {
		errs = append(errs, errors.New("empty pool"))
	}
	if len(ids) == 0 {
		errs = append(errs, errors.New("no resource ids"))
	}
	for i, id := range ids {
		if id == "" {
			errs = append(errs, fmt.Errorf("resource id %d is empty", i))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %s resources: %w", ErrInvalid, op, err)
	}
	return nil
}

// Resources lists the resources of pool, by id, with who holds each.
func (r *Reserver) Resources(ctx context.Context, pool string) ([]Resource, error) {
	rows, err := r.db.Query(ctx, `SELECT pool, id, state, reservation, owner, updated_at FROM troupe_resources
		WHERE pool = $1 ORDER BY id`, pool)
	if err != nil {
		return nil, fmt.Errorf("reserve: list the resources of pool %q: %w", pool, err)
	}
	var out []Resource
	for rows.Next() {
		var res Resource
		var state string
		if err := rows.Scan(&res.Pool, &res.ID, &state, &res.Reservation, &res.Owner, &res.UpdatedAt); err != nil {
			rows.Close()
			return nil, fmt.Errorf("reserve: list the resources of pool %q: %w", pool, err)
		}
		res.State, res.UpdatedAt = ResourceState(state), res.UpdatedAt.UTC()
		out = append(out, res)
	}
	if err := rows.Close(); err != nil {
		return nil, fmt.Errorf("reserve: list the resources of pool %q: %w", pool, err)
	}
	return out, nil
}
