package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/troupedev/troupe/internal/pgcluster"
	"github.com/troupedev/troupe/internal/servicedb"
	"github.com/troupedev/troupe/sqldb"
)

// benchDB is the database a benchmark runs on and how to describe it.
type benchDB struct {
	db          *sqldb.DB
	description string
	close       func()
}

// openDB opens the database cfg names: a SQLite file in dir, the server at
// cfg.PostgresURL, or a throwaway PostgreSQL cluster (fsync on) started from
// the installed binaries.
func openDB(ctx context.Context, cfg Config, dir string) (*benchDB, error) {
	if cfg.DB == "sqlite" {
		path := filepath.Join(dir, "bench.db")
		db, err := sqldb.Open(ctx, "sqlite://"+path, &sqldb.Config{SQLiteFullSync: cfg.SQLiteFullSync})
		if err != nil {
			return nil, err
		}
		return &benchDB{db: db, description: "SQLite file " + path + " (" + servicedb.SQLiteSync(cfg.SQLiteFullSync) + ")", close: func() { db.Close() }}, nil
	}
	if cfg.PostgresURL != "" {
		db, err := sqldb.Open(ctx, cfg.PostgresURL, nil)
		if err != nil {
			return nil, err
		}
		return &benchDB{db: db, description: "PostgreSQL at the given URL (its own fsync and synchronous_commit settings)", close: func() { db.Close() }}, nil
	}
	fmt.Fprintln(cfg.Progress, "starting a throwaway PostgreSQL cluster (fsync on) ...")
	cl, err := pgcluster.Start(ctx, pgcluster.Config{})
	if err != nil {
		return nil, err
	}
	db, err := sqldb.Open(ctx, cl.URL("postgres"), nil)
	if err != nil {
		cl.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	return &benchDB{
		db:          db,
		description: fmt.Sprintf("throwaway PostgreSQL cluster on 127.0.0.1:%d (fsync on, synchronous_commit on: each commit waits for its WAL flush)", cl.Port()),
		close: func() {
			db.Close()
			cl.Stop(context.WithoutCancel(ctx))
		},
	}, nil
}

// workDir returns cfg.DataDir, or a new temporary directory and a function
// that removes it.
func workDir(cfg Config) (string, func(), error) {
	if cfg.DataDir != "" {
		return cfg.DataDir, func() {}, os.MkdirAll(cfg.DataDir, 0o755)
	}
	d, err := os.MkdirTemp("", "troupe-bench-*")
	if err != nil {
		return "", nil, err
	}
	return d, func() { os.RemoveAll(d) }, nil
}
