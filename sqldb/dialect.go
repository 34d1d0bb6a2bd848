package sqldb

import "fmt"

// Dialect is the SQL dialect of a database. Packages that write SQL pick
// their statements by it.
type Dialect int

const (
	// SQLite is SQLite 3 (through modernc.org/sqlite, in WAL mode).
	SQLite Dialect = iota + 1
	// Postgres is PostgreSQL 13 or later.
	Postgres
)

// String returns "sqlite" or "postgres".
func (d Dialect) String() string {
	switch d {
	case SQLite:
		return "sqlite"
	case Postgres:
		return "postgres"
	default:
		return fmt.Sprintf("Dialect(%d)", int(d))
	}
}

func (d Dialect) valid() bool { return d == SQLite || d == Postgres }
