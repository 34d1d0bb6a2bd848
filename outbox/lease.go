package outbox

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

// ensureLeaseRows creates the lease row of every partition, unheld.
func (r *Relay) ensureLeaseRows(ctx context.Context) error {
	args := make([]any, 0, 2*Partitions)
	for p := range Partitions {
		args = append(args, p, epoch)
	}
	q := "INSERT INTO troupe_outbox_leases (partition, expires_at) VALUES " + sqldb.ValuesList(1, Partitions, 2) + " ON CONFLICT (partition) DO NOTHING"
	if _, err := r.db.Exec(ctx, q, args...); err != nil {
		return fmt.Errorf("outbox: create lease rows (has Migrate run?): %w", err)
	}
	return nil
}

// manageLeases registers the relay as alive, renews its leases, gives back
// those above its fair share, and claims expired ones up to it. On a database
// error it keeps the leases it had until they expire.
func (r *Relay) manageLeases(ctx context.Context) {
	owned, until, err := r.leases(ctx)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("outbox relay: lease upkeep failed", "err", err)
		}
		return
	}
	r.mu.Lock()
	r.owned, r.leaseUntil = owned, until
	r.mu.Unlock()
}

func (r *Relay) leases(ctx context.Context) ([]int, time.Time, error) {
	me := r.cfg.Owner
	now := r.cfg.Clock.Now().UTC()
	until := now.Add(r.cfg.LeaseTTL)
	db := r.db

	if _, err := db.Exec(ctx, "INSERT INTO troupe_outbox_relays (owner, expires_at) VALUES ($1, $2) ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at", me, until); err != nil {
		return nil, time.Time{}, fmt.Errorf("register relay: %w", err)
	}
	if _, err := db.Exec(ctx, "DELETE FROM troupe_outbox_relays WHERE expires_at < $1", now); err != nil {
		return nil, time.Time{}, fmt.Errorf("forget expired relays: %w", err)
	}
	var alive int
	if err := db.QueryRow(ctx, "SELECT count(*) FROM troupe_outbox_relays").Scan(&alive); err != nil {
		return nil, time.Time{}, fmt.Errorf("count relays: %w", err)
	}
	share := (Partitions + max(alive, 1) - 1) / max(alive, 1)

	// Renew what is still ours (a lease that expired but was not taken
	// over is still ours).
	owned, err := r.queryInts(ctx, "UPDATE troupe_outbox_leases SET expires_at = $1 WHERE owner = $2 RETURNING partition", until, me)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("renew leases: %w", err)
	}
	slices.Sort(owned)
	if len(owned) > share {
		extra := owned[share:]
		args := []any{epoch, me}
		for _, p := range extra {
			args = append(args, p)
		}
		if _, err := db.Exec(ctx, "UPDATE troupe_outbox_leases SET owner = '', expires_at = $1 WHERE owner = $2 AND partition IN ("+sqldb.List(3, len(extra))+")", args...); err != nil {
			return nil, time.Time{}, fmt.Errorf("release leases: %w", err)
		}
		owned = owned[:share]
	}
	if len(owned) < share {
		free, err := r.queryInts(ctx, "SELECT partition FROM troupe_outbox_leases WHERE expires_at < $1 ORDER BY partition", now)
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("find free partitions: %w", err)
		}
		for _, p := range free {
			if len(owned) >= share {
				break
			}
			n, err := db.Exec(ctx, "UPDATE troupe_outbox_leases SET owner = $1, expires_at = $2 WHERE partition = $3 AND expires_at < $4", me, until, p, now)
			if err != nil {
				return nil, time.Time{}, fmt.Errorf("claim partition %d: %w", p, err)
			}
			if n == 1 {
				owned = append(owned, p)
			}
		}
		slices.Sort(owned)
	}
	return owned, until, nil
}

func (r *Relay) queryInts(ctx context.Context, q string, args ...any) ([]int, error) {
	rows, err := r.db.Query(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	var out []int
	for rows.Next() {
		var p int
		if err := rows.Scan(&p); err != nil {
			rows.Close()
			return nil, err
		}
		out = append(out, p)
	}
	return out, rows.Close()
}

// release gives up the relay's leases and registration, so other relays
// take its partitions at once.
func (r *Relay) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err1 := r.db.Exec(ctx, "UPDATE troupe_outbox_leases SET owner = '', expires_at = $1 WHERE owner = $2", epoch, r.cfg.Owner)
	_, err2 := r.db.Exec(ctx, "DELETE FROM troupe_outbox_relays WHERE owner = $1", r.cfg.Owner)
	if err1 != nil || err2 != nil {
		r.log.Warn("outbox relay: release leases failed; they expire after LeaseTTL", "err", fmt.Sprint(err1, err2))
	}
	r.mu.Lock()
	r.owned, r.leaseUntil = nil, time.Time{}
	r.mu.Unlock()
}
