package pgtest_test

import (
	"context"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestURL_GivesEachTestAFreshDatabaseOfItsOwn(t *testing.T) {
	a, b := pgtest.Pool(t), pgtest.Pool(t)
	if _, err := a.Exec(ctx(t), "CREATE TABLE only_in_a (id INTEGER)"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := b.QueryRow(ctx(t), "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'only_in_a'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Error("a table created in one test database is visible in another")
	}
	var nameA, nameB string
	a.QueryRow(ctx(t), "SELECT current_database()").Scan(&nameA)
	b.QueryRow(ctx(t), "SELECT current_database()").Scan(&nameB)
	if nameA == nameB || !strings.HasPrefix(nameA, "troupe_test_") {
		t.Errorf("databases %q and %q, want two distinct troupe_test_ databases", nameA, nameB)
	}
}

func TestURL_DropsTheDatabaseWhenTheTestEnds(t *testing.T) {
	var name string
	t.Run("user", func(t *testing.T) {
		u, err := url.Parse(pgtest.URL(t))
		if err != nil {
			t.Fatal(err)
		}
		name = strings.TrimPrefix(u.Path, "/")
		// A connection still open at the end does not keep it alive.
		conn, err := pgx.Connect(ctx(t), u.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
	})
	watcher := pgtest.Pool(t)
	var n int
	if err := watcher.QueryRow(ctx(t), "SELECT COUNT(*) FROM pg_database WHERE datname = $1", name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("database %s still exists after its test ended", name)
	}
}

func TestURL_ParallelTestsGetDatabasesAtOnce(t *testing.T) {
	for i := range 4 {
		t.Run(string(rune('a'+i)), func(t *testing.T) {
			t.Parallel()
			var one int
			if err := pgtest.Pool(t).QueryRow(ctx(t), "SELECT 1").Scan(&one); err != nil {
				t.Fatal(err)
			}
		})
	}
}

const childEnv = "PGTEST_TEST_CHILD"

// TestHelperChildProcess runs only in a child process started by the tests
// below: it prints the URL pgtest gives it.
func TestHelperChildProcess(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		return // not in a child
	}
	u := pgtest.URL(t)
	os.Stdout.WriteString("\nURL " + u + "\n")
}

func runChild(t *testing.T, serverURL string) (string, error) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperChildProcess$", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"=1", pgtest.EnvURL+"="+serverURL)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestEnvURL_UsesTheGivenServerInsteadOfStartingOne(t *testing.T) {
	mine, err := url.Parse(pgtest.URL(t))
	if err != nil {
		t.Fatal(err)
	}
	server := *mine
	server.Path = "/postgres"
	out, err := runChild(t, server.String())
	if err != nil {
		t.Fatalf("child failed: %v\n%s", err, out)
	}
	_, line, ok := strings.Cut(out, "\nURL ")
	if !ok {
		t.Fatalf("child printed no URL:\n%s", out)
	}
	got, err := url.Parse(strings.TrimSpace(strings.SplitN(line, "\n", 2)[0]))
	if err != nil {
		t.Fatal(err)
	}
	if got.Host != mine.Host {
		t.Errorf("child used server %s, want the one named by %s: %s", got.Host, pgtest.EnvURL, mine.Host)
	}
	if got.Path == "/postgres" || !strings.HasPrefix(got.Path, "/troupe_test_") {
		t.Errorf("child got database %s, want an isolated troupe_test_ database", got.Path)
	}
}

func TestEnvURL_UnreachableServerFailsTheTestAndNeverSkips(t *testing.T) {
	out, err := runChild(t, "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2")
	if err == nil {
		t.Fatalf("child passed without a server:\n%s", out)
	}
	if !strings.Contains(out, "--- FAIL: TestHelperChildProcess") || strings.Contains(out, "SKIP") {
		t.Errorf("child did not fail the test:\n%s", out)
	}
	if !strings.Contains(out, "127.0.0.1:1") {
		t.Errorf("failure does not name the server:\n%s", out)
	}
}
