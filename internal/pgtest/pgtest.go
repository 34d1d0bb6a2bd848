package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/troupedev/troupe/internal/pgcluster"
)

// EnvURL names the environment variable that points the tests at an
// existing PostgreSQL server instead of a throwaway cluster.
const EnvURL = "TROUPE_TEST_DATABASE_URL"

// The server is shared by the whole test binary, which is what a test kit
// for one process has to do: this is the one place in Troupe with
// package-level state, and it is never imported outside tests.
var shared struct {
	mu      sync.Mutex
	tried   bool
	err     error
	cluster *pgcluster.Cluster // nil when EnvURL is used
	admin   *pgxpool.Pool      // on the server's maintenance database
	base    *url.URL           // the server's URL; Path is replaced per test
	n       int
}

// M runs a test binary's tests, then stops the shared cluster. Make one with
// WithCluster.
type M struct{ m *testing.M }

// WithCluster wraps m so that M.Run stops the shared cluster (if the tests
// started it) after the tests have run. It has the shape goleak's
// VerifyTestMain takes, which then checks for leaks after the cluster's
// connections are closed.
func WithCluster(m *testing.M) M { return M{m: m} }

// Run runs the tests, stops the shared cluster, and returns the exit code;
// a failed stop turns a passing run into a failing one.
func (w M) Run() int {
	code := w.m.Run()
	if err := shutdown(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// URL creates a fresh, empty database for t and returns its URL. The
// database is dropped when t ends. It fails t if no server can be had.
func URL(t testing.TB) string {
	t.Helper()
	admin, base, err := server()
	if err != nil {
		t.Fatal(err)
	}

	shared.mu.Lock()
	shared.n++
	name := fmt.Sprintf("troupe_test_%d_%d", os.Getpid(), shared.n)
	shared.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ident := pgx.Identifier{name}.Sanitize()
	// A database of this name can only be left over from a killed run of a
	// process that had the same pid, against an external server.
	if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)"); err != nil {
		t.Fatalf("pgtest: drop leftover database %s: %v", name, err)
	}
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+ident); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.Exec(ctx, "DROP DATABASE "+ident+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})

	u := *base
	u.Path = "/" + name
	u.RawPath = ""
	return u.String()
}

// Pool creates a fresh database for t, as URL does, and returns a pool
// connected to it. The pool is closed, then the database dropped, when t
// ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	dbURL := URL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(pool.Close)
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("pgtest: connect to the test database: %v", err)
	}
	return pool
}

// server returns the admin pool and base URL of the shared server, starting
// it on first use. A failure is remembered, so every test fails fast with
// the same reason.
func server() (*pgxpool.Pool, *url.URL, error) {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if !shared.tried {
		shared.tried = true
		shared.err = startServer()
	}
	if shared.err != nil {
		return nil, nil, shared.err
	}
	if shared.admin == nil {
		return nil, nil, errors.New("pgtest: the shared server was already stopped (URL called after M.Run returned?)")
	}
	return shared.admin, shared.base, nil
}

// startServer is called with shared.mu held.
func startServer() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	adminURL := os.Getenv(EnvURL)
	if adminURL == "" {
		c, err := pgcluster.Start(ctx, pgcluster.Config{Fast: true})
		if err != nil {
			return fmt.Errorf("pgtest: start a throwaway PostgreSQL (or set %s to an existing server's URL): %w", EnvURL, err)
		}
		shared.cluster = c
		adminURL = c.URL("postgres")
	}
	base, err := url.Parse(adminURL)
	if err != nil || (base.Scheme != "postgres" && base.Scheme != "postgresql") {
		return errors.Join(fmt.Errorf("pgtest: %s must be a postgres:// URL, not %q", EnvURL, redactedOrScheme(adminURL)), err)
	}
	cfg, err := pgxpool.ParseConfig(adminURL)
	if err != nil {
		return errors.Join(fmt.Errorf("pgtest: %s", base.Redacted()), err, stopCluster(ctx))
	}
	cfg.MaxConns = 4
	admin, err := pgxpool.NewWithConfig(ctx, cfg)
	if err == nil {
		pingCtx, cancelPing := context.WithTimeout(ctx, 10*time.Second)
		err = admin.Ping(pingCtx)
		cancelPing()
		if err != nil {
			admin.Close()
		}
	}
	if err != nil {
		return errors.Join(fmt.Errorf("pgtest: connect to %s: %w", base.Redacted(), err), stopCluster(ctx))
	}
	shared.admin, shared.base = admin, base
	return nil
}

// redactedOrScheme returns u without its password, for error messages.
func redactedOrScheme(u string) string {
	if p, err := url.Parse(u); err == nil {
		return p.Redacted()
	}
	scheme, _, _ := strings.Cut(u, ":")
	return scheme + ":..."
}

func stopCluster(ctx context.Context) error {
	if shared.cluster == nil {
		return nil
	}
	err := shared.cluster.Stop(ctx)
	shared.cluster = nil
	return err
}

func shutdown() error {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.admin != nil {
		shared.admin.Close()
		shared.admin = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := stopCluster(ctx); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	return nil
}
