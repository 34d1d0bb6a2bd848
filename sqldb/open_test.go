package sqldb_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

func TestOpen_RefusesURLsItCannotServe(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		url     string
		wantMsg string
	}{
		{"unknown scheme", "mysql://root:secret@localhost/db", "want postgres://"},
		{"bare path", filepath.Join(dir, "x.db"), "sqlite:///absolute/path.db"},
		{"empty", "", "file:path.db"},
		{"sqlite without path", "sqlite://", "no file path"},
		{"in-memory", "sqlite::memory:", "in-memory SQLite is not supported"},
		{"in-memory URI", "file:x?mode=memory", "in-memory SQLite is not supported"},
		{"own txlock", "sqlite://" + filepath.Join(dir, "y.db") + "?_txlock=deferred", "_txlock"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, err := sqldb.Open(context.Background(), tt.url, nil)
			if err == nil {
				db.Close()
			}
			if !errors.Is(err, sqldb.ErrUnsupportedURL) {
				t.Fatalf("err = %v, want ErrUnsupportedURL", err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not say %q", err, tt.wantMsg)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("error %q shows the password", err)
			}
		})
	}
}

func TestOpen_AcceptsEverySQLiteURLForm(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	for _, url := range []string{
		"sqlite://" + filepath.Join(dir, "abs.db"),
		"sqlite:rel.db",
		"sqlite://rel2.db",
		"file:uri.db",
		"file:" + filepath.Join(dir, "uri2.db") + "?cache=private",
		"sqlite:opts.db?_pragma=cache_size(-4000)",
	} {
		db := open(t, url, nil)
		if _, err := db.Exec(testCtx(t), "CREATE TABLE t (a INTEGER)"); err != nil {
			t.Errorf("%s: %v", url, err)
		}
	}
}

func TestOpen_SQLiteMissingDirectoryIsNamed(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no", "such")
	_, err := sqldb.Open(context.Background(), "sqlite://"+filepath.Join(missing, "x.db"), nil)
	if err == nil || !strings.Contains(err.Error(), "directory "+missing+" does not exist") {
		t.Fatalf("err = %v, want one naming the missing directory", err)
	}
}

func TestOpen_SQLiteConnectionsAreSetUpForConcurrentWriters(t *testing.T) {
	for _, tt := range []struct {
		cfg      *sqldb.Config
		wantSync int
		wantBusy int
	}{
		{nil, 1, 10000}, // NORMAL
		{&sqldb.Config{SQLiteFullSync: true, BusyTimeout: 3 * time.Second}, 2, 3000}, // FULL
	} {
		db := open(t, "sqlite://"+filepath.Join(t.TempDir(), "x.db"), tt.cfg)
		// Ask every pooled connection, not just the first one.
		ctx := testCtx(t)
		conns := make([]interface{ Close() error }, 0, 4)
		for range 4 {
			conn, err := db.SQL().Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, conn)
			var journal string
			var sync, fk, busy int
			for pragma, dest := range map[string]any{"journal_mode": &journal, "synchronous": &sync, "foreign_keys": &fk, "busy_timeout": &busy} {
				if err := conn.QueryRowContext(ctx, "PRAGMA "+pragma).Scan(dest); err != nil {
					t.Fatal(err)
				}
			}
			if journal != "wal" || sync != tt.wantSync || fk != 1 || busy != tt.wantBusy {
				t.Errorf("journal_mode=%s synchronous=%d foreign_keys=%d busy_timeout=%d, want wal %d 1 %d",
					journal, sync, fk, busy, tt.wantSync, tt.wantBusy)
			}
		}
		for _, c := range conns {
			c.Close()
		}
	}
}

func TestOpen_InvalidConfigListsEveryProblem(t *testing.T) {
	_, err := sqldb.Open(context.Background(), "sqlite:x.db", &sqldb.Config{ConnectTimeout: -1, MaxConns: -1, BusyTimeout: -1})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"ConnectTimeout", "MaxConns", "BusyTimeout"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

func TestOpen_UnreachablePostgresFailsWithinTheTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close() // nothing listens there now

	const timeout = 3 * time.Second
	start := time.Now()
	db, err := sqldb.Open(context.Background(), "postgres://postgres@127.0.0.1:"+strconv.Itoa(port)+"/app", &sqldb.Config{ConnectTimeout: timeout})
	if err == nil {
		db.Close()
		t.Fatal("Open succeeded on a closed port")
	}
	if elapsed := time.Since(start); elapsed > timeout+2*time.Second {
		t.Errorf("Open took %v, beyond the %v timeout", elapsed, timeout)
	}
	if want := "127.0.0.1:" + strconv.Itoa(port); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name %s", err, want)
	}
}

// A server that accepts the connection but never answers must not hang
// Open.
func TestOpen_SilentPostgresTimesOut(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var accepted []net.Conn
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			accepted = append(accepted, c) // held open, never answered
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
		for _, c := range accepted {
			c.Close()
		}
	})

	const timeout = 500 * time.Millisecond
	start := time.Now()
	db, err := sqldb.Open(context.Background(), "postgres://postgres@"+l.Addr().String()+"/app", &sqldb.Config{ConnectTimeout: timeout})
	if err == nil {
		db.Close()
		t.Fatal("Open succeeded against a silent server")
	}
	if elapsed := time.Since(start); elapsed > timeout+3*time.Second {
		t.Errorf("Open took %v, beyond the %v timeout", elapsed, timeout)
	}
	if !strings.Contains(err.Error(), "no answer within 500ms") {
		t.Errorf("error %q does not say the server did not answer in time", err)
	}
}

func TestOpen_CanceledContextStopsTheWait(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := sqldb.Open(ctx, "postgres://postgres@"+l.Addr().String()+"/app", nil) // default 10 s timeout
		done <- err
	}()
	conn, err := l.Accept() // Open is waiting for the server's answer now
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Open still waiting 5 s after its context was canceled")
	}
}

func TestDialect_String(t *testing.T) {
	for d, want := range map[sqldb.Dialect]string{sqldb.SQLite: "sqlite", sqldb.Postgres: "postgres", 0: "Dialect(0)"} {
		if got := d.String(); got != want {
			t.Errorf("%d.String() = %q, want %q", int(d), got, want)
		}
	}
}

func TestFromSQL_PanicsOnUnknownDialect(t *testing.T) {
	db := open(t, "sqlite://"+filepath.Join(t.TempDir(), "x.db"), nil)
	tx, err := db.SQL().Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	defer func() {
		if p := recover(); p == nil || !strings.Contains(p.(string), "unknown dialect") {
			t.Errorf("recovered %v, want a panic naming the unknown dialect", p)
		}
	}()
	sqldb.FromSQL(tx, 0)
}
