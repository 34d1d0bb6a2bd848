package inbox

import (
	"context"
	"fmt"
	"time"
)

// Prune deletes the inbox rows of every consumer handled more than
// Config.Retention ago, in DELETE statements of at most
// Config.PruneBatchSize rows each, each in its own transaction, until none
// is left. It returns how many rows it deleted.
func (ib *Inbox) Prune(ctx context.Context) (int64, error) {
	cutoff := ib.cfg.Now().Add(-ib.cfg.Retention).UTC()
	var total int64
	for {
		// A row-value IN works on both dialects and uses the primary key;
		// the subquery uses the handled_at index.
		n, err := ib.db.Exec(ctx, `DELETE FROM troupe_inbox WHERE (consumer, message_id, source) IN (
			SELECT consumer, message_id, source FROM troupe_inbox WHERE handled_at < $1 LIMIT $2)`,
			cutoff, ib.cfg.PruneBatchSize)
		total += n
		if err != nil {
			return total, fmt.Errorf("inbox: prune rows handled before %v: %w", cutoff, err)
		}
		if n < int64(ib.cfg.PruneBatchSize) {
			return total, nil
		}
	}
}

// Run prunes old inbox rows (see Prune) at once and then every
// Config.PruneInterval, until ctx ends; it then returns nil. A failed prune
// is logged and tried again at the next interval. Run one per database, or
// several: concurrent prunes only delete the same rows once.
func (ib *Inbox) Run(ctx context.Context) error {
	t := time.NewTicker(ib.cfg.PruneInterval)
	defer t.Stop()
	for {
		n, err := ib.Prune(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			ib.cfg.Logger.Error("inbox: pruning failed; trying again at the next interval", "err", err)
		case n > 0:
			ib.cfg.Logger.Debug("inbox: pruned old rows", "rows", n)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
