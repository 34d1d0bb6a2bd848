package pgcluster_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgcluster"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		runChild()
		return
	}
	goleak.VerifyTestMain(m)
}

func TestStart_ServesLogicalReplicationReadyCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := c.Stop(ctx); err != nil {
			t.Error(err)
		}
	}()

	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	want := map[string]string{
		"wal_level":             "logical",
		"fsync":                 "on", // real costs by default
		"max_connections":       "200",
		"listen_addresses":      "127.0.0.1",
		"max_replication_slots": "16",
		"max_wal_senders":       "16",
	}
	for name, value := range want {
		var got string
		if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != value {
			t.Errorf("%s = %q, want %q", name, got, value)
		}
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE other"); err != nil {
		t.Fatal(err)
	}

	// A replication connection is let in (trust), so the WAL can be tailed.
	repl, err := pgx.Connect(ctx, c.URL("other")+"&replication=database")
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	defer repl.Close(ctx)
	res := repl.PgConn().Exec(ctx, "IDENTIFY_SYSTEM")
	if _, err := res.ReadAll(); err != nil {
		t.Fatalf("IDENTIFY_SYSTEM: %v", err)
	}
}

func TestStart_FastTurnsOffFsync(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Config{Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop(ctx)
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	for _, name := range []string{"fsync", "synchronous_commit", "full_page_writes"} {
		var got string
		if err := conn.QueryRow(ctx, "SELECT current_setting($1)", name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != "off" {
			t.Errorf("%s = %q, want off", name, got)
		}
	}
}

func TestStop_StopsServerAndRemovesItsFiles(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Config{Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	dir := clusterDir(t, c)
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("directory %s still there after Stop: %v", dir, err)
	}
	if conn, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(c.Port()))); err == nil {
		conn.Close()
		t.Errorf("port %d still accepts connections after Stop", c.Port())
	}
	if err := c.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestStart_InvalidConfigListsEveryProblem(t *testing.T) {
	_, err := pgcluster.Start(context.Background(), pgcluster.Config{StartTimeout: -1, MaxConnections: -1})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"StartTimeout", "MaxConnections"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

func TestStart_BinDirWithoutBinariesIsAnError(t *testing.T) {
	_, err := pgcluster.Start(context.Background(), pgcluster.Config{BinDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "does not hold initdb") {
		t.Fatalf("err = %v, want one saying the directory does not hold initdb", err)
	}
}

// The watchdog is what keeps a killed test binary from leaving a server
// running forever: a child process starts a cluster and is killed with
// SIGKILL, so no code of its own runs after that.
func TestWatchdog_StopsClusterWhenOwnerIsKilled(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe() // keeps the child blocked until killed
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child did not report its cluster: %v", err)
	}
	var dir string
	var port int
	if _, err := fmt.Sscanf(line, "%s %d", &dir, &port); err != nil {
		t.Fatalf("child said %q: %v", line, err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("cluster directory: %v", err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()

	deadline := time.Now().Add(60 * time.Second)
	for {
		_, statErr := os.Stat(dir)
		conn, dialErr := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if dialErr == nil {
			conn.Close()
		}
		if errors.Is(statErr, os.ErrNotExist) && dialErr != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("60 s after the owner was killed: directory stat err=%v, port %d dial err=%v", statErr, port, dialErr)
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, not ordering events
	}
}

const childEnv = "PGCLUSTER_TEST_CHILD"

// runChild starts a cluster, reports its directory and port, and blocks
// until it is killed.
func runChild() {
	c, err := pgcluster.Start(context.Background(), pgcluster.Config{Fast: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%s %d\n", pgcluster.DirOf(c), c.Port())
	bufio.NewReader(os.Stdin).ReadString('\n')
	os.Exit(0)
}

func clusterDir(t *testing.T, c *pgcluster.Cluster) string {
	t.Helper()
	dir := pgcluster.DirOf(c)
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestStart_FailureShowsServerLog(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Above the server's limit of 262143: the server refuses to start.
	c, err := pgcluster.Start(ctx, pgcluster.Config{Fast: true, MaxConnections: 1 << 20})
	if err == nil {
		c.Stop(ctx)
		t.Fatal("started with an invalid max_connections")
	}
	if !strings.Contains(err.Error(), `"max_connections"`) {
		t.Errorf("error does not quote the server log's reason:\n%v", err)
	}
	t.Log(err)
}

func TestCrash_KeepsCommittedRowsLosesOpenTransactionsAndServesOnTheSamePort(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := pgcluster.Start(ctx, pgcluster.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop(ctx)
	port := c.Port()
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE t (v int); INSERT INTO t VALUES (1)`); err != nil {
		t.Fatal(err)
	}
	open, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	tx, err := open.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (2)`); err != nil {
		t.Fatal(err)
	}

	if err := c.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Port() != port {
		t.Errorf("port %d after Crash, was %d", c.Port(), port)
	}
	if _, err := conn.Exec(ctx, `SELECT 1`); err == nil {
		t.Error("a connection opened before Crash still works: the server was not restarted")
	}
	conn.Close(ctx)
	open.Close(ctx)
	after, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer after.Close(ctx)
	var got []int32
	rows, _ := after.Query(ctx, `SELECT v FROM t ORDER BY v`)
	got, err = pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[1]" {
		t.Errorf("rows after Crash = %v, want [1]: the committed row kept, the open transaction's lost", got)
	}
}
