// Package servicedb opens one database per service of an example, a demo or
// a benchmark: SQLite files in a directory by default, or databases created
// for the run on a PostgreSQL server. Each service owning its database is
// the premise of everything Troupe does, so the examples keep it even when
// they run in one process.
package servicedb

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/troupedev/troupe/sqldb"
)

// Config says where the databases live.
type Config struct {
	// Dir holds the SQLite files, one per service (<name>.db), when
	// Postgres is empty. Required then.
	Dir string
	// Postgres, when set, is the URL of a database on a PostgreSQL server
	// on which the role may create databases (e.g.
	// postgres://user@127.0.0.1:5432/postgres). Each service gets a
	// database of its own on that server, named Prefix + service name.
	Postgres string
	// Prefix starts the PostgreSQL databases' names. Default "troupe_".
	Prefix string
	// Fresh gives every service a new, empty database: on PostgreSQL the
	// names get a unique suffix and the databases are dropped by Close; on
	// SQLite the files must not exist yet. Without Fresh, existing
	// databases are opened (created when missing) and kept.
	Fresh bool
	// MaxConns caps each PostgreSQL database's connection pool, by service
	// name. Default: sqldb's default.
	MaxConns map[string]int
	// SQLiteFullSync runs the SQLite files with synchronous=FULL (see
	// sqldb.Config).
	SQLiteFullSync bool
}

// SQLiteSync describes the SQLite durability that full selects.
func SQLiteSync(full bool) string {
	if full {
		return "WAL, synchronous=FULL: each commit waits for its fsync"
	}
	return "WAL, synchronous=NORMAL: a commit survives a crash of the process, not a power loss; no fsync per commit"
}

// Set is the opened databases, by service name.
type Set struct {
	// DBs maps each service name to its database.
	DBs map[string]*sqldb.DB
	// Description says where they are, for a report.
	Description string
	// Names maps each service name to its PostgreSQL database's name
	// (empty on SQLite).
	Names map[string]string

	closers []func()
}

// Close closes every database and, for Fresh PostgreSQL ones, drops them.
func (s *Set) Close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
	s.closers = nil
}

// Open opens a database for each of names.
func Open(ctx context.Context, cfg Config, names ...string) (*Set, error) {
	if len(names) == 0 {
		return nil, errors.New("servicedb: no service names")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "troupe_"
	}
	s := &Set{DBs: map[string]*sqldb.DB{}, Names: map[string]string{}}
	if cfg.Postgres == "" {
		if cfg.Dir == "" {
			return nil, errors.New("servicedb: Dir is required for SQLite databases")
		}
		if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("servicedb: %w", err)
		}
		for _, n := range names {
			path := filepath.Join(cfg.Dir, n+".db")
			if cfg.Fresh {
				if _, err := os.Stat(path); err == nil {
					s.Close()
					return nil, fmt.Errorf("servicedb: %s exists; a fresh run needs a new directory", path)
				}
			}
			db, err := sqldb.Open(ctx, "sqlite://"+path, &sqldb.Config{SQLiteFullSync: cfg.SQLiteFullSync})
			if err != nil {
				s.Close()
				return nil, err
			}
			s.DBs[n] = db
			s.closers = append(s.closers, func() { db.Close() })
		}
		s.Description = fmt.Sprintf("SQLite files in %s, one per service (%s)", cfg.Dir, SQLiteSync(cfg.SQLiteFullSync))
		return s, nil
	}

	u, err := url.Parse(cfg.Postgres)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return nil, fmt.Errorf("servicedb: the PostgreSQL server needs a URL (postgres://...): %q", redact(cfg.Postgres))
	}
	admin, err := sqldb.Open(ctx, cfg.Postgres, &sqldb.Config{MaxConns: 2})
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, func() { admin.Close() })
	suffix := ""
	if cfg.Fresh {
		suffix = fmt.Sprintf("_%d", time.Now().UnixNano())
	}
	for _, n := range names {
		dbName := cfg.Prefix + n + suffix
		ident := pgx.Identifier{dbName}.Sanitize()
		var exists bool
		if err := admin.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)`, dbName).Scan(&exists); err != nil {
			s.Close()
			return nil, fmt.Errorf("servicedb: %w", err)
		}
		if !exists {
			if _, err := admin.Exec(ctx, "CREATE DATABASE "+ident); err != nil {
				s.Close()
				return nil, fmt.Errorf("servicedb: create database %s: %w", dbName, err)
			}
		}
		if cfg.Fresh {
			s.closers = append(s.closers, func() {
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
				defer cancel()
				admin.Exec(dctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)")
			})
		}
		du := *u
		du.Path, du.RawPath = "/"+dbName, ""
		var dcfg *sqldb.Config
		if c := cfg.MaxConns[n]; c > 0 {
			dcfg = &sqldb.Config{MaxConns: c}
		}
		db, err := sqldb.Open(ctx, du.String(), dcfg)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.DBs[n], s.Names[n] = db, dbName
		s.closers = append(s.closers, func() { db.Close() })
	}
	what := "databases"
	if cfg.Fresh {
		what = "fresh databases (dropped at the end)"
	}
	s.Description = fmt.Sprintf("PostgreSQL %s %s<service>%s on %s, one per service", what, cfg.Prefix, suffix, u.Host)
	return s, nil
}

// redact hides a URL's password.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}
