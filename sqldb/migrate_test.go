package sqldb_test

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

// loadTestdata returns the example migrations of testdata/migrations for d.
func loadTestdata(t testing.TB, d sqldb.Dialect) []sqldb.Migration {
	t.Helper()
	migs, err := sqldb.LoadMigrations(migrationFS, "testdata/migrations/"+d.String())
	if err != nil {
		t.Fatal(err)
	}
	return migs
}

// appliedVersions returns component's recorded versions and names.
func appliedVersions(t testing.TB, db *sqldb.DB, component string) []string {
	t.Helper()
	rows, err := db.Query(testCtx(t), "SELECT version, name FROM troupe_migrations WHERE component = $1 ORDER BY version", component)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var v int
		var name string
		if err := rows.Scan(&v, &name); err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%d_%s", v, name))
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestMigrate_AppliesEveryStatementOnceAndAgainNothing(t *testing.T) {
	indexQuery := map[sqldb.Dialect]string{
		sqldb.SQLite:   "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'transfers_from_id'",
		sqldb.Postgres: "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'transfers_from_id'",
	}
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		migs := loadTestdata(t, dc.dialect)
		for range 2 {
			if err := db.Migrate(testCtx(t), "bank", migs); err != nil {
				t.Fatal(err)
			}
		}
		if got := fmt.Sprint(appliedVersions(t, db, "bank")); got != "[1_create_accounts 2_create_transfers]" {
			t.Errorf("recorded %s, want [1_create_accounts 2_create_transfers]", got)
		}
		// Migration 2 holds three statements: a table, an index, a row.
		var indexes int
		if err := db.QueryRow(testCtx(t), indexQuery[dc.dialect]).Scan(&indexes); err != nil {
			t.Fatal(err)
		}
		if indexes != 1 {
			t.Errorf("index transfers_from_id: found %d, want 1", indexes)
		}
		if n := count(t, db, "accounts"); n != 1 {
			t.Errorf("accounts holds %d rows, want the 1 row that migration 2 inserts, once", n)
		}
		if n := count(t, db, "transfers"); n != 0 {
			t.Errorf("transfers holds %d rows, want 0", n)
		}
	})
}

func TestMigrate_ComponentsAreVersionedApart(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		one := []sqldb.Migration{{Version: 1, Name: "a1", SQL: "CREATE TABLE a1 (id INTEGER)"}}
		two := []sqldb.Migration{
			{Version: 1, Name: "b1", SQL: "CREATE TABLE b1 (id INTEGER)"},
			{Version: 2, Name: "b2", SQL: "CREATE TABLE b2 (id INTEGER)"},
		}
		if err := db.Migrate(testCtx(t), "a", one); err != nil {
			t.Fatal(err)
		}
		if err := db.Migrate(testCtx(t), "b", two); err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprint(appliedVersions(t, db, "a"), appliedVersions(t, db, "b")); got != "[1_a1] [1_b1 2_b2]" {
			t.Errorf("recorded %s, want [1_a1] [1_b1 2_b2]", got)
		}
	})
}

// Several processes starting at once on one database each migrate it: every
// migration must run exactly once, and none of them may fail.
func TestMigrate_ConcurrentProcessesApplyEachMigrationExactlyOnce(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		const processes = 6
		components := []string{"alpha", "beta"}
		migrations := func(component string) []sqldb.Migration {
			migs := []sqldb.Migration{{Version: 1, Name: "create_log",
				SQL: "CREATE TABLE log_" + component + " (version INTEGER NOT NULL)"}}
			for v := 2; v <= 5; v++ {
				migs = append(migs, sqldb.Migration{Version: v, Name: fmt.Sprint("step", v),
					SQL: fmt.Sprintf("INSERT INTO log_%s (version) VALUES (%d)", component, v)})
			}
			return migs
		}

		url := dc.newURL(t)
		dbs := make([]*sqldb.DB, processes)
		for i := range dbs {
			dbs[i] = open(t, url, nil) // its own pool, like another process
		}
		ctx := testCtx(t)
		errs := make(chan error, processes)
		start := make(chan struct{})
		for i, db := range dbs {
			component := components[i%len(components)]
			go func() {
				<-start
				errs <- db.Migrate(ctx, component, migrations(component))
			}()
		}
		close(start)
		for range processes {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}

		for _, c := range components {
			rows, err := dbs[0].Query(ctx, "SELECT version, COUNT(*) FROM log_"+c+" GROUP BY version ORDER BY version")
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for rows.Next() {
				var v, n int
				if err := rows.Scan(&v, &n); err != nil {
					t.Fatal(err)
				}
				got = append(got, fmt.Sprintf("v%d×%d", v, n))
			}
			if err := rows.Close(); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != "[v2×1 v3×1 v4×1 v5×1]" {
				t.Errorf("%s: migrations ran %v, want each once: [v2×1 v3×1 v4×1 v5×1]", c, got)
			}
			if n := len(appliedVersions(t, dbs[0], c)); n != 5 {
				t.Errorf("%s: %d versions recorded, want 5", c, n)
			}
		}
	})
}

func TestMigrate_SchemaNewerThanTheBinaryIsAnErrorThatSaysUpgrade(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		migs := loadTestdata(t, dc.dialect)
		if err := db.Migrate(testCtx(t), "bank", migs); err != nil {
			t.Fatal(err)
		}
		err := db.Migrate(testCtx(t), "bank", migs[:1]) // an older build
		if !errors.Is(err, sqldb.ErrSchemaTooNew) {
			t.Fatalf("err = %v, want ErrSchemaTooNew", err)
		}
		var tooNew *sqldb.SchemaTooNewError
		if !errors.As(err, &tooNew) {
			t.Fatalf("err = %T, want *SchemaTooNewError", err)
		}
		if *tooNew != (sqldb.SchemaTooNewError{Component: "bank", DatabaseVersion: 2, KnownVersion: 1}) {
			t.Errorf("error fields %+v", *tooNew)
		}
		if msg := err.Error(); !strings.Contains(msg, "upgrade troupe") || !strings.Contains(msg, `"bank"`) {
			t.Errorf("message %q does not tell to upgrade troupe for component bank", msg)
		}
	})
}

func TestMigrate_FailedMigrationLeavesNoTraceAndIsNamed(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		good := sqldb.Migration{Version: 1, Name: "create_a", SQL: "CREATE TABLE a (id INTEGER)"}
		bad := sqldb.Migration{Version: 2, Name: "create_b", SQL: "CREATE TABLE b (id INTEGER); INSERT INTO no_such_table VALUES (1)"}
		err := db.Migrate(testCtx(t), "shop", []sqldb.Migration{good, bad})
		if err == nil {
			t.Fatal("no error for a failing migration")
		}
		for _, want := range []string{"shop", "version 2", "create_b", "no_such_table"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not mention %q", err, want)
			}
		}
		if got := fmt.Sprint(appliedVersions(t, db, "shop")); got != "[1_create_a]" {
			t.Errorf("recorded %s, want [1_create_a]", got)
		}
		// The first statement of the failed migration was rolled back too.
		if _, err := db.Exec(testCtx(t), "SELECT * FROM b"); err == nil {
			t.Error("table b exists: the failed migration was half applied")
		}

		fixed := bad
		fixed.SQL = "CREATE TABLE b (id INTEGER)"
		if err := db.Migrate(testCtx(t), "shop", []sqldb.Migration{good, fixed}); err != nil {
			t.Fatalf("after fixing the migration: %v", err)
		}
		if got := fmt.Sprint(appliedVersions(t, db, "shop")); got != "[1_create_a 2_create_b]" {
			t.Errorf("recorded %s, want [1_create_a 2_create_b]", got)
		}
	})
}

func TestMigrate_InvalidMigrationsApplyNothing(t *testing.T) {
	m := func(v int, name, sql string) sqldb.Migration {
		return sqldb.Migration{Version: v, Name: name, SQL: sql}
	}
	tests := []struct {
		name      string
		component string
		migs      []sqldb.Migration
		wantMsg   string
	}{
		{"gap", "c", []sqldb.Migration{m(1, "a", "CREATE TABLE a (id INTEGER)"), m(3, "c", "SELECT 1")}, "version 2 was expected"},
		{"not from 1", "c", []sqldb.Migration{m(2, "a", "CREATE TABLE a (id INTEGER)")}, "version 1 was expected"},
		{"duplicate", "c", []sqldb.Migration{m(1, "a", "CREATE TABLE a (id INTEGER)"), m(1, "b", "SELECT 1")}, "appears twice"},
		{"unsorted", "c", []sqldb.Migration{m(2, "b", "SELECT 1"), m(1, "a", "CREATE TABLE a (id INTEGER)")}, "expected"},
		{"no name", "c", []sqldb.Migration{m(1, "", "CREATE TABLE a (id INTEGER)")}, "no name"},
		{"no SQL", "c", []sqldb.Migration{m(1, "a", "CREATE TABLE a (id INTEGER)"), m(2, "b", "  \n")}, "no SQL"},
		{"no component", "", []sqldb.Migration{m(1, "a", "CREATE TABLE a (id INTEGER)")}, "component"},
	}
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		db := dc.openFresh(t)
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				err := db.Migrate(testCtx(t), tt.component, tt.migs)
				if !errors.Is(err, sqldb.ErrInvalidMigrations) {
					t.Fatalf("err = %v, want ErrInvalidMigrations", err)
				}
				if !strings.Contains(err.Error(), tt.wantMsg) {
					t.Errorf("error %q does not say %q", err, tt.wantMsg)
				}
				if _, err := db.Exec(testCtx(t), "SELECT * FROM a"); err == nil {
					t.Error("table a was created from an invalid list")
				}
			})
		}
	})
}

func TestLoadMigrations_ValidatesNumbering(t *testing.T) {
	file := func(sql string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(sql)} }
	tests := []struct {
		name    string
		files   fstest.MapFS
		want    string // versions and names loaded
		wantErr error
		wantMsg string
	}{
		{
			name: "gap",
			files: fstest.MapFS{
				"m/0010_ten.sql": file("SELECT 10"),
				"m/0002_two.sql": file("SELECT 2"),
				"m/1_one.sql":    file("SELECT 1"),
			},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "version 3 was expected",
		},
		{
			name: "sorted by number, other files and directories ignored",
			files: fstest.MapFS{
				"m/0002_add_index.sql":    file("CREATE INDEX i ON t (a)"),
				"m/0001_create_table.sql": file("CREATE TABLE t (a INTEGER)"),
				"m/README.md":             file("not a migration"),
				"m/old/0003_skip.sql":     file("SELECT 3"),
			},
			want: "[1 create_table CREATE TABLE t (a INTEGER); 2 add_index CREATE INDEX i ON t (a)]",
		},
		{
			name:    "duplicate version",
			files:   fstest.MapFS{"m/0001_a.sql": file("SELECT 1"), "m/001_b.sql": file("SELECT 1")},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "version 1 appears twice",
		},
		{
			name:    "first is not 1",
			files:   fstest.MapFS{"m/0002_a.sql": file("SELECT 1")},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "version 1 was expected",
		},
		{
			name:    "badly named file",
			files:   fstest.MapFS{"m/0001_a.sql": file("SELECT 1"), "m/0002-b.sql": file("SELECT 1")},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "0002-b.sql is not named",
		},
		{
			name:    "empty migration",
			files:   fstest.MapFS{"m/0001_a.sql": file("\n")},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "no SQL",
		},
		{
			name:    "no migrations",
			files:   fstest.MapFS{"m/README.md": file("")},
			wantErr: sqldb.ErrInvalidMigrations,
			wantMsg: "no <version>_<name>.sql file",
		},
		{
			name:    "no directory",
			files:   fstest.MapFS{"other/0001_a.sql": file("SELECT 1")},
			wantErr: fs.ErrNotExist,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			migs, err := sqldb.LoadMigrations(tt.files, "m")
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tt.wantMsg) {
					t.Errorf("error %q does not say %q", err, tt.wantMsg)
				}
				return
			}
			var got []string
			for _, m := range migs {
				got = append(got, fmt.Sprint(m.Version, " ", m.Name, " ", m.SQL))
			}
			if s := "[" + strings.Join(got, "; ") + "]"; s != tt.want {
				t.Errorf("loaded %s, want %s", s, tt.want)
			}
		})
	}
}

func TestLoadMigrations_DialectsHaveTheSameVersions(t *testing.T) {
	// The shipped test migrations, like a package's, exist for every
	// dialect with the same numbering and names.
	sqlite, postgres := loadTestdata(t, sqldb.SQLite), loadTestdata(t, sqldb.Postgres)
	names := func(migs []sqldb.Migration) string {
		var s []string
		for _, m := range migs {
			s = append(s, fmt.Sprint(m.Version, m.Name))
		}
		return strings.Join(s, ",")
	}
	if names(sqlite) != names(postgres) {
		t.Errorf("sqlite %s, postgres %s", names(sqlite), names(postgres))
	}
}

// TestMigrate_ConcurrentUnderRepeatableReadDefault: a server (or database)
// whose default isolation is REPEATABLE READ must not make concurrent
// migrations fail: each migration still reads, after taking its lock, what
// the holder before it committed.
func TestMigrate_ConcurrentUnderRepeatableReadDefault_Postgres(t *testing.T) {
	u := pgtest.URL(t)
	if strings.Contains(u, "?") {
		u += "&"
	} else {
		u += "?"
	}
	u += "default_transaction_isolation=repeatable%20read"
	migs := []sqldb.Migration{
		{Version: 1, Name: "a", SQL: "CREATE TABLE a (x int)"},
		{Version: 2, Name: "b", SQL: "CREATE TABLE b (x int)"},
	}
	const processes = 6
	ctx := testCtx(t)
	dbs := make([]*sqldb.DB, processes)
	for i := range dbs {
		dbs[i] = open(t, u, nil)
	}
	var iso string
	if err := dbs[0].QueryRow(ctx, "SHOW default_transaction_isolation").Scan(&iso); err != nil {
		t.Fatal(err)
	}
	if iso != "repeatable read" {
		t.Fatalf("default_transaction_isolation = %q, the test needs repeatable read", iso)
	}
	errs := make(chan error, processes)
	start := make(chan struct{})
	for _, db := range dbs {
		go func() {
			<-start
			errs <- db.Migrate(ctx, "iso", migs)
		}()
	}
	close(start)
	for range processes {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if n := len(appliedVersions(t, dbs[0], "iso")); n != 2 {
		t.Errorf("%d versions recorded, want 2", n)
	}
}
