package sqldb

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
)

// ErrInvalidMigrations reports a list of migrations that cannot be applied
// as given: numbering that does not run 1, 2, 3... without gaps or
// duplicates, a file name not of the form 0001_name.sql, or an empty
// migration.
var ErrInvalidMigrations = errors.New("sqldb: invalid migrations")

// ErrSchemaTooNew is matched (errors.Is) by a *SchemaTooNewError.
var ErrSchemaTooNew = errors.New("sqldb: database schema is newer than this build of troupe")

// SchemaTooNewError reports that a database was migrated by a newer build
// of Troupe than the running one: the running code does not know the schema
// and must not use it.
type SchemaTooNewError struct {
	// Component is the migrated component, e.g. "outbox".
	Component string
	// DatabaseVersion is the highest version recorded in the database.
	DatabaseVersion int
	// KnownVersion is the highest version this build has.
	KnownVersion int
}

func (e *SchemaTooNewError) Error() string {
	return fmt.Sprintf("sqldb: the database schema of %q is at version %d, but this build of troupe knows versions up to %d: upgrade troupe to a release that knows version %d",
		e.Component, e.DatabaseVersion, e.KnownVersion, e.DatabaseVersion)
}

// Is makes errors.Is(err, ErrSchemaTooNew) hold.
func (e *SchemaTooNewError) Is(target error) bool { return target == ErrSchemaTooNew }

// Migration is one numbered step of a component's schema.
type Migration struct {
	// Version numbers the migration: 1, 2, 3... in the order they apply.
	Version int
	// Name says what the migration does, e.g. "create_outbox". It is
	// recorded with the version.
	Name string
	// SQL is the migration's statements, separated by semicolons. They run
	// in one transaction, so statements that refuse to run in a
	// transaction (CREATE INDEX CONCURRENTLY) do not belong here.
	SQL string
}

// LoadMigrations reads the migrations in directory dir of fsys, typically an
// embed.FS holding one directory per dialect:
//
//	//go:embed migrations
//	var migrationFS embed.FS
//	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
//
// Each file is named <version>_<name>.sql, the version in decimal digits
// (leading zeros welcome: 0001_create_outbox.sql). Files not ending in .sql
// are ignored. The versions must run 1, 2, 3... without gaps or duplicates;
// the result is sorted by version. An error matching ErrInvalidMigrations
// names every file at fault.
func LoadMigrations(fsys fs.FS, dir string) ([]Migration, error) {
	entries, err := fs.ReadDir(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("sqldb: load migrations: %w", err)
	}
	var migs []Migration
	var problems []error
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".sql") {
			continue
		}
		digits, name, ok := strings.Cut(strings.TrimSuffix(e.Name(), ".sql"), "_")
		version, err := strconv.Atoi(digits)
		if !ok || name == "" || err != nil || version < 0 || strings.TrimLeft(digits, "0123456789") != "" {
			problems = append(problems, fmt.Errorf("file %s is not named <version>_<name>.sql, e.g. 0001_create_table.sql", e.Name()))
			continue
		}
		body, err := fs.ReadFile(fsys, path.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("sqldb: load migrations: %w", err)
		}
		migs = append(migs, Migration{Version: version, Name: name, SQL: string(body)})
	}
	if len(migs) == 0 && len(problems) == 0 {
		problems = append(problems, errors.New("no <version>_<name>.sql file"))
	}
	slices.SortStableFunc(migs, func(a, b Migration) int { return a.Version - b.Version })
	if err := errors.Join(append(problems, checkMigrations(migs))...); err != nil {
		return nil, fmt.Errorf("%w in %s: %w", ErrInvalidMigrations, dir, err)
	}
	return migs, nil
}

// checkMigrations reports every way migs differs from versions 1..n in
// order, each named and non-empty.
func checkMigrations(migs []Migration) error {
	var problems []error
	for i, m := range migs {
		switch {
		case i > 0 && m.Version == migs[i-1].Version:
			problems = append(problems, fmt.Errorf("version %d appears twice (%s and %s)", m.Version, migs[i-1].Name, m.Name))
		case m.Version != i+1:
			problems = append(problems, fmt.Errorf("migration %s has version %d where version %d was expected (versions run 1, 2, 3... without gaps)", m.Name, m.Version, i+1))
		}
		if m.Name == "" {
			problems = append(problems, fmt.Errorf("migration %d has no name", m.Version))
		}
		if strings.TrimSpace(m.SQL) == "" {
			problems = append(problems, fmt.Errorf("migration %d (%s) has no SQL", m.Version, m.Name))
		}
	}
	return errors.Join(problems...)
}

// Migrate brings component's tables up to date: it applies, in order, the
// migrations of migs that the database has not recorded yet. Each migration
// runs in its own transaction together with its row in the table
// troupe_migrations(component, version, name, applied_at), so a migration
// is either applied and recorded or neither. Calling Migrate again applies
// nothing.
//
// Several processes may call Migrate on the same database at once; each
// migration is applied exactly once. On PostgreSQL each transaction takes a
// transaction-level advisory lock for the component, then reads the
// recorded version; on SQLite the transaction holds the write lock from its
// start.
//
// migs must hold versions 1..n in order (as LoadMigrations returns them);
// otherwise the error matches ErrInvalidMigrations and nothing is applied.
// If the database records a version above n, written by a newer Troupe,
// Migrate returns a *SchemaTooNewError and applies nothing. A failing
// migration's error names the component, version and name; the migrations
// before it stay applied.
func (db *DB) Migrate(ctx context.Context, component string, migs []Migration) error {
	if component == "" {
		return fmt.Errorf("%w: empty component name", ErrInvalidMigrations)
	}
	if err := checkMigrations(migs); err != nil {
		return fmt.Errorf("%w for %s: %w", ErrInvalidMigrations, component, err)
	}
	if err := db.createMigrationsTable(ctx); err != nil {
		return fmt.Errorf("sqldb: migrate %s: create table troupe_migrations: %w", component, err)
	}
	for {
		done, err := db.migrateOne(ctx, component, migs)
		if err != nil || done {
			return err
		}
	}
}

// migrateOne applies the first migration the database lacks, or reports
// that there is none.
func (db *DB) migrateOne(ctx context.Context, component string, migs []Migration) (done bool, err error) {
	err = db.InTx(ctx, func(ctx context.Context, tx Tx) error {
		if db.dialect == Postgres {
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", lockKey("component:"+component)); err != nil {
				return fmt.Errorf("sqldb: migrate %s: take the migration lock: %w", component, err)
			}
		}
		// Read after taking the lock: another process may have just
		// applied what this one was about to.
		var current int
		if err := tx.QueryRow(ctx, "SELECT COALESCE(MAX(version), 0) FROM troupe_migrations WHERE component = $1", component).Scan(&current); err != nil {
			return fmt.Errorf("sqldb: migrate %s: read the applied version: %w", component, err)
		}
		if current > len(migs) {
			return &SchemaTooNewError{Component: component, DatabaseVersion: current, KnownVersion: len(migs)}
		}
		if current == len(migs) {
			done = true
			return nil
		}
		m := migs[current]
		if _, err := tx.Exec(ctx, m.SQL); err != nil {
			return fmt.Errorf("sqldb: migrate %s to version %d (%s): %w", component, m.Version, m.Name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO troupe_migrations (component, version, name) VALUES ($1, $2, $3)",
			component, m.Version, m.Name); err != nil {
			return fmt.Errorf("sqldb: migrate %s to version %d (%s): record the version: %w", component, m.Version, m.Name, err)
		}
		return nil
	})
	return done, err
}

func (db *DB) createMigrationsTable(ctx context.Context) error {
	return db.InTx(ctx, func(ctx context.Context, tx Tx) error {
		switch db.dialect {
		case Postgres:
			// Two sessions running CREATE TABLE IF NOT EXISTS at once can
			// both try to create it; the lock makes the second one see the
			// first one's table.
			if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", lockKey("table")); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS troupe_migrations (
	component  TEXT        NOT NULL,
	version    INTEGER     NOT NULL,
	name       TEXT        NOT NULL,
	applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
	PRIMARY KEY (component, version)
)`)
			return err
		default:
			_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS troupe_migrations (
	component  TEXT      NOT NULL,
	version    INTEGER   NOT NULL,
	name       TEXT      NOT NULL,
	applied_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f+00:00', 'now')),
	PRIMARY KEY (component, version)
)`)
			return err
		}
	})
}

// lockKey returns the PostgreSQL advisory lock key for a migration lock.
func lockKey(name string) int64 {
	h := fnv.New64a()
	h.Write([]byte("troupe_migrations:" + name))
	return int64(h.Sum64())
}
