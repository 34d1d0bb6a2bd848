// Package sqldb is the database layer under Troupe's packages: it opens a
// service's database (SQLite or PostgreSQL), runs transactions, joins the
// application's own transactions, and migrates each component's tables.
//
// # Opening
//
// [Open] takes a URL: postgres://... for PostgreSQL (through pgx's pool), or
// sqlite:///path/to/file.db for a SQLite file (through modernc.org/sqlite,
// in WAL mode, with write transactions that take the lock at BEGIN so
// concurrent writers queue instead of failing). Open checks that the
// database answers within [Config.ConnectTimeout], so a wrong address fails
// at start-up with the address in the message, never as a hang.
//
// # Transactions, and joining the caller's
//
// Troupe's packages write through the small [Tx] interface. Every write has
// a transactional twin that takes a Tx, so the application's change and
// Troupe's rows (an outbox message, an inbox mark, a saga step) commit
// together or not at all:
//
//	// Troupe begins the transaction:
//	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
//		... tx.Exec(ctx, "UPDATE orders SET ...", ...)
//		return outbox.AddTx(ctx, tx, msg)
//	})
//
//	// The application began it, with database/sql or pgx:
//	outbox.AddTx(ctx, sqldb.FromSQL(sqlTx, sqldb.SQLite), msg)
//	outbox.AddTx(ctx, sqldb.FromPgx(pgxTx), msg)
//
// [FromSQL] accepts any *sql.Tx, so data layers built on database/sql (sqlc,
// sqlx, ent, bun, gorm through its *sql.Tx) join the same way.
//
// # Speed
//
// On PostgreSQL, a transaction's BEGIN travels with its first statement,
// and [ExecLater] queues a write whose result is not needed, to travel with
// the transaction's next statement or its commit in one round trip. On
// SQLite, where write transactions run one at a time, statements stay
// prepared per connection (parsing is otherwise a large share of the time
// the write lock is held), and [DB.InGroupTx] serves the small transactions
// of concurrent callers in one, with one commit (group commit), each call
// still rolled back alone when its fn fails. [Batcher] goes further, on
// both dialects: the items of concurrent callers go to one set-wise
// function, written with one statement each and one commit, each caller
// still getting its own result or error.
//
// # One SQL text where the dialects agree
//
// Placeholders are $1, $2, ... on both dialects: SQLite reads $N as the N-th
// argument, in any order and as often as it appears. Both dialects also
// accept INSERT ... ON CONFLICT DO NOTHING and RETURNING. Where they differ
// (column types, locking reads, now()), a package switches on
// [Tx.Dialect]. Times are stored in UTC on SQLite, in a text layout that
// sorts in time order; declare such columns TIMESTAMP there (TIMESTAMPTZ on
// PostgreSQL) so they scan into time.Time.
//
// # Migrations
//
// Each component keeps numbered SQL files per dialect, embedded in its
// binary, and migrates at start-up:
//
//	//go:embed migrations
//	var migrationFS embed.FS
//
//	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
//	err = db.Migrate(ctx, "outbox", migs)
//
// [DB.Migrate] records applied versions in the table troupe_migrations,
// applies each missing migration in its own transaction, is safe to run from
// several processes at once, and refuses (with a [*SchemaTooNewError]) a
// database that a newer Troupe has already migrated further.
package sqldb
