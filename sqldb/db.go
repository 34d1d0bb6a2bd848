package sqldb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// ErrUnsupportedURL reports a database URL that Open does not understand.
var ErrUnsupportedURL = errors.New("sqldb: unsupported database URL")

// acceptedURLs is shown with every ErrUnsupportedURL.
const acceptedURLs = "postgres://user@host:port/db, postgresql://..., sqlite:///absolute/path.db, sqlite:relative/path.db, or file:path.db"

// Config tunes a DB. The zero value (or a nil *Config) gives the defaults.
type Config struct {
	// ConnectTimeout bounds Open's first connection and, on PostgreSQL,
	// every later connection attempt unless the URL sets connect_timeout.
	// Default 10 s.
	ConnectTimeout time.Duration

	// MaxConns caps the number of open connections. Default: on
	// PostgreSQL, the URL's pool_max_conns or else the greater of 4 and the
	// number of CPUs; on SQLite, the greater of 4 and the number of CPUs.
	MaxConns int

	// BusyTimeout is how long a SQLite statement waits for the write lock
	// held by another connection or process before failing with
	// SQLITE_BUSY. Default 10 s. Not used on PostgreSQL.
	BusyTimeout time.Duration

	// SQLiteFullSync sets PRAGMA synchronous=FULL: every commit is flushed
	// to disk before it returns. Default false, which means
	// synchronous=NORMAL: in WAL mode a commit survives a crash of the
	// process, but the last commits before a power loss or OS crash may be
	// lost (never corrupted). Not used on PostgreSQL.
	SQLiteFullSync bool
}

func (c *Config) validate() error {
	var errs []error
	if c.ConnectTimeout < 0 {
		errs = append(errs, fmt.Errorf("ConnectTimeout %v is negative", c.ConnectTimeout))
	}
	if c.MaxConns < 0 {
		errs = append(errs, fmt.Errorf("MaxConns %d is negative", c.MaxConns))
	}
	if c.BusyTimeout < 0 {
		errs = append(errs, fmt.Errorf("BusyTimeout %v is negative", c.BusyTimeout))
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 10 * time.Second
	}
	if c.BusyTimeout == 0 {
		c.BusyTimeout = 10 * time.Second
	}
	return c
}

// DB is a pool of connections to one database, SQLite or PostgreSQL. It is
// safe for concurrent use. Close it when done.
type DB struct {
	dialect Dialect
	sqlDB   *sql.DB       // SQLite
	pool    *pgxpool.Pool // PostgreSQL
	q       Tx            // runs statements outside a transaction

	// writer is held by this DB's SQLite transaction in progress, if any.
	// SQLite runs one write transaction at a time; the others wait in its
	// busy handler, which polls with sleeps growing to 100 ms, so under
	// heavy contention an unlucky writer can wait out the busy timeout
	// while others keep winning. Queueing here instead hands the lock on
	// in order, the moment it is free, and leaves the busy handler to
	// arbitrate only with other processes (and other DBs on the file).
	writer chan struct{}

	stmts *stmtCache // SQLite

	groupState // SQLite: InGroupTx
}

// Open connects to the database named by url and checks that it answers,
// within ctx and Config.ConnectTimeout. cfg may be nil.
//
// Accepted URLs:
//
//   - postgres://user:password@host:port/dbname?sslmode=disable (or
//     postgresql://), with the parameters pgx understands, pool_max_conns
//     among them.
//   - sqlite:///absolute/path.db, sqlite:relative/path.db, or
//     file:path.db (a SQLite URI). The file is created if missing; its
//     directory must exist. Parameters of modernc.org/sqlite may follow a
//     '?', for instance _pragma=cache_size(-20000); they apply after
//     Troupe's own, except _txlock, which Troupe sets.
//
// Every SQLite connection is set up with journal_mode=WAL,
// busy_timeout=Config.BusyTimeout, synchronous=NORMAL (FULL with
// Config.SQLiteFullSync), foreign_keys=ON, and transactions that take the
// write lock at BEGIN (BEGIN IMMEDIATE), so concurrent writers queue for the
// lock instead of failing with SQLITE_BUSY when a read turns into a write.
// Times are written in UTC in the layout "2006-01-02 15:04:05.999999999-07:00",
// so that they sort as text in time order, and read back in UTC.
//
// SQLite's in-memory databases are refused: each pooled connection would see
// a database of its own.
func Open(ctx context.Context, url string, cfg *Config) (*DB, error) {
	if cfg == nil {
		cfg = &Config{}
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("sqldb: invalid config: %w", err)
	}
	c := cfg.withDefaults()

	scheme, rest, _ := strings.Cut(url, ":")
	switch strings.ToLower(scheme) {
	case "postgres", "postgresql":
		return openPostgres(ctx, url, c)
	case "sqlite":
		path, query, _ := strings.Cut(strings.TrimPrefix(rest, "//"), "?")
		return openSQLite(ctx, url, path, path, query, c)
	case "file":
		uri, query, _ := strings.Cut(url, "?")
		path := strings.TrimPrefix(strings.TrimPrefix(rest, "//"), "localhost")
		path, _, _ = strings.Cut(path, "?")
		return openSQLite(ctx, url, uri, path, query, c)
	}
	return nil, fmt.Errorf("%w %q: want %s", ErrUnsupportedURL, redact(url), acceptedURLs)
}

func openPostgres(ctx context.Context, rawURL string, c Config) (*DB, error) {
	pcfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		return nil, fmt.Errorf("sqldb: %w", err) // pgx hides the password
	}
	if c.MaxConns > 0 {
		pcfg.MaxConns = int32(min(c.MaxConns, 1<<30))
	}
	if pcfg.ConnConfig.ConnectTimeout == 0 {
		pcfg.ConnConfig.ConnectTimeout = c.ConnectTimeout
	}
	where := fmt.Sprintf("PostgreSQL at %s (database %q, user %q)",
		net.JoinHostPort(pcfg.ConnConfig.Host, strconv.Itoa(int(pcfg.ConnConfig.Port))),
		pcfg.ConnConfig.Database, pcfg.ConnConfig.User)

	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("sqldb: connect to %s: %w", where, err)
	}
	pingCtx, cancel := context.WithTimeout(ctx, c.ConnectTimeout)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		// The deadline may be met first by pgx's own per-connection timeout.
		if ctx.Err() == nil && (pingCtx.Err() != nil || pgconn.Timeout(err)) {
			return nil, fmt.Errorf("sqldb: connect to %s: no answer within %v (Config.ConnectTimeout): %w", where, c.ConnectTimeout, err)
		}
		return nil, fmt.Errorf("sqldb: connect to %s: %w", where, err)
	}
	return &DB{dialect: Postgres, pool: pool, q: pgxTx{q: pool}}, nil
}

// openSQLite opens the SQLite database at dsnBase (a file path or a file:
// URI) with the driver parameters in userQuery after Troupe's. path is the
// file path, for error messages.
func openSQLite(ctx context.Context, rawURL, dsnBase, path, userQuery string, c Config) (*DB, error) {
	if path == "" {
		return nil, fmt.Errorf("%w %q: no file path: want %s", ErrUnsupportedURL, rawURL, acceptedURLs)
	}
	if path == ":memory:" || strings.Contains(userQuery, "mode=memory") {
		return nil, fmt.Errorf("%w %q: in-memory SQLite is not supported, since each pooled connection would see its own database: use a file (in a temporary directory for tests)", ErrUnsupportedURL, rawURL)
	}
	user, err := url.ParseQuery(userQuery)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %w", ErrUnsupportedURL, rawURL, err)
	}
	if user.Has("_txlock") {
		return nil, fmt.Errorf("%w %q: sqldb sets _txlock=immediate itself; remove _txlock", ErrUnsupportedURL, rawURL)
	}

	sync := "NORMAL"
	if c.SQLiteFullSync {
		sync = "FULL"
	}
	// busy_timeout first: the switch to WAL needs the lock too.
	q := url.Values{}
	q.Add("_pragma", fmt.Sprintf("busy_timeout(%d)", c.BusyTimeout.Milliseconds()))
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous("+sync+")")
	q.Add("_pragma", "foreign_keys(1)")
	q.Set("_txlock", "immediate")
	q.Set("_time_format", "sqlite")
	q.Set("_timezone", "UTC")
	dsn := dsnBase + "?" + q.Encode()
	if userQuery != "" {
		dsn += "&" + userQuery
	}

	sqlDB, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("sqldb: open SQLite database %s: %w", path, err)
	}
	maxConns := c.MaxConns
	if maxConns == 0 {
		maxConns = max(4, runtime.NumCPU())
	}
	sqlDB.SetMaxOpenConns(maxConns)
	sqlDB.SetMaxIdleConns(maxConns) // reopening a connection reruns the PRAGMAs

	pingCtx, cancel := context.WithTimeout(ctx, c.ConnectTimeout)
	defer cancel()
	if err := sqlDB.PingContext(pingCtx); err != nil {
		sqlDB.Close()
		if dir := filepath.Dir(path); dir != "" {
			if _, statErr := os.Stat(dir); errors.Is(statErr, os.ErrNotExist) {
				return nil, fmt.Errorf("sqldb: open SQLite database %s: directory %s does not exist: %w", path, dir, err)
			}
		}
		return nil, fmt.Errorf("sqldb: open SQLite database %s: %w", path, err)
	}
	stmts := newStmtCache(sqlDB)
	return &DB{dialect: SQLite, sqlDB: sqlDB, q: sqlTx{q: sqlDB, d: SQLite, c: stmts}, stmts: stmts, writer: make(chan struct{}, 1)}, nil
}

// Dialect returns the database's SQL dialect.
func (db *DB) Dialect() Dialect { return db.dialect }

// SQL returns the underlying *sql.DB of a SQLite database, or nil on
// PostgreSQL. Use it for what this package does not offer; a transaction
// begun on it joins Troupe's writes through FromSQL.
func (db *DB) SQL() *sql.DB { return db.sqlDB }

// Pool returns the underlying pgx pool of a PostgreSQL database, or nil on
// SQLite. A transaction begun on it joins Troupe's writes through FromPgx.
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// Close closes every connection. Rows still open keep theirs until closed.
func (db *DB) Close() error {
	if db.pool != nil {
		db.pool.Close()
		return nil
	}
	db.stmts.close()
	return db.sqlDB.Close()
}

// Exec runs a statement outside any transaction (in its own, on commit)
// and returns the number of rows it affected.
//
// On SQLite it takes its turn among the DB's write transactions (see
// InTx), as a write must: left to SQLite's busy handler, a statement that
// met a transaction in progress would sleep a millisecond or more, and a
// transaction that met the statement would sleep while holding its turn,
// stalling every writer behind it. So, like InTx, it fails at once inside
// an InTx of the same DB, whose lock it would wait for forever.
func (db *DB) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	if db.writer != nil {
		if ctx.Value(inTxKey{db}) != nil {
			return 0, errors.New("sqldb: DB.Exec called inside an InTx of the same SQLite DB: use the Tx you were given")
		}
		select {
		case db.writer <- struct{}{}:
		case <-ctx.Done():
			return 0, fmt.Errorf("sqldb: waiting for this DB's write transactions: %w", ctx.Err())
		}
		defer func() { <-db.writer }()
	}
	return db.q.Exec(ctx, query, args...)
}

// Query runs a query outside any transaction. Close the rows when done.
func (db *DB) Query(ctx context.Context, query string, args ...any) (Rows, error) {
	return db.q.Query(ctx, query, args...)
}

// QueryRow runs a query that returns at most one row outside any
// transaction. Its Scan returns an error matching ErrNoRows when there is
// none.
func (db *DB) QueryRow(ctx context.Context, query string, args ...any) Row {
	return db.q.QueryRow(ctx, query, args...)
}

// redact returns u with any password hidden, for error messages.
func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		scheme, _, _ := strings.Cut(u, ":")
		return scheme + ":..."
	}
	return p.Redacted()
}
