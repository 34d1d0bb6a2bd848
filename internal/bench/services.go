package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/troupedev/troupe/internal/servicedb"
)

// openServices opens a fresh database for each of an example's services:
// SQLite files under dir, or databases created on the PostgreSQL server of
// cfg (named prefix + service). maxConns caps the PostgreSQL pools by
// service. close closes them (and drops the PostgreSQL ones).
func openServices(ctx context.Context, cfg Config, dir, prefix string, maxConns map[string]int, names ...string) (dbs *servicedb.Set, close func(), err error) {
	dbCfg := servicedb.Config{Dir: fmt.Sprintf("%s/%s%d", dir, prefix, time.Now().UnixNano()), Prefix: prefix, Fresh: true,
		SQLiteFullSync: cfg.SQLiteFullSync, MaxConns: maxConns}
	closeAdmin := func() {}
	if cfg.DB != "sqlite" {
		admin, err := openDB(ctx, cfg, dir)
		if err != nil {
			return nil, nil, err
		}
		closeAdmin = admin.close
		dbCfg.Postgres = admin.db.Pool().Config().ConnString()
		if !strings.Contains(dbCfg.Postgres, "://") {
			admin.close()
			return nil, nil, errors.New("--postgres: this benchmark needs a URL (postgres://...) to create its services' databases")
		}
	}
	dbs, err = servicedb.Open(ctx, dbCfg, names...)
	if err != nil {
		closeAdmin()
		return nil, nil, err
	}
	return dbs, func() { dbs.Close(); closeAdmin() }, nil
}

// waitInvariants checks an example's invariants until they hold, waiting
// up to sagaWaitLimit for what a failed client left in flight, and returns
// the violations left then as an error.
func waitInvariants[V fmt.Stringer](ctx context.Context, check func(context.Context) ([]V, error)) error {
	deadline := time.Now().Add(sagaWaitLimit)
	for {
		v, err := check(ctx)
		if err != nil {
			return err
		}
		if len(v) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			msgs := make([]string, len(v))
			for i, x := range v {
				msgs[i] = x.String()
			}
			return fmt.Errorf("invariant broken: %s", strings.Join(msgs, "; "))
		}
		time.Sleep(100 * time.Millisecond)
	}
}
