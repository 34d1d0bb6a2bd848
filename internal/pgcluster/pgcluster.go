package pgcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrBinariesNotFound reports that no PostgreSQL installation was found.
var ErrBinariesNotFound = errors.New(`PostgreSQL binaries not found (looked on PATH and under /usr/lib/postgresql/*/bin): install them with "apt-get install postgresql"`)

// Config tunes a throwaway cluster. The zero value is ready to use.
type Config struct {
	// Fast turns off fsync, synchronous_commit and full_page_writes: commits
	// cost no disk flush, and a crash of the machine loses the cluster.
	// Default false: fsync stays on, so timings are those of a real server.
	Fast bool

	// BinDir is the directory holding initdb, pg_ctl and postgres.
	// Default: the directory of initdb on PATH, or else the highest-version
	// /usr/lib/postgresql/*/bin.
	BinDir string

	// StartTimeout bounds initdb and the server start each. Default 60 s.
	StartTimeout time.Duration

	// MaxConnections is the server's max_connections. Default 200.
	MaxConnections int
}

func (c *Config) validate() error {
	var errs []error
	if c.StartTimeout < 0 {
		errs = append(errs, fmt.Errorf("StartTimeout %v is negative", c.StartTimeout))
	}
	if c.MaxConnections < 0 {
		errs = append(errs, fmt.Errorf("MaxConnections %d is negative", c.MaxConnections))
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.StartTimeout == 0 {
		c.StartTimeout = 60 * time.Second
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = 200
	}
	return c
}

// Cluster is a running throwaway PostgreSQL server. Stop it with Stop.
type Cluster struct {
	dir     string // temporary directory: data/, the socket, the log
	dataDir string
	logFile string
	port    int
	pgCtl   string

	startTimeout time.Duration
	runAs        string // "postgres" when this process is root, else ""
	runuser      string // path of runuser, when runAs is set

	watchdog     *exec.Cmd
	watchdogPipe *os.File // write end; closing it (or exiting) fires the watchdog

	mu      sync.Mutex
	stopped bool
}

// Start creates and starts a new cluster. It returns once the server
// accepts connections, or with an error that includes the tail of the
// server's log. Neither initdb nor the start can outlast ctx or
// Config.StartTimeout.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("pgcluster: invalid config: %w", err)
	}
	cfg = cfg.withDefaults()

	binDir, err := findBinDir(cfg.BinDir, "/usr/lib/postgresql/*/bin")
	if err != nil {
		return nil, fmt.Errorf("pgcluster: %w", err)
	}

	c := &Cluster{pgCtl: filepath.Join(binDir, "pg_ctl")}
	var owner *user.User
	if os.Geteuid() == 0 {
		owner, err = user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("pgcluster: running as root, PostgreSQL must run as the user postgres, which was not found (%w): create it or run as another user", err)
		}
		c.runAs = "postgres"
		if c.runuser, err = findRunuser(); err != nil {
			return nil, fmt.Errorf("pgcluster: running as root, PostgreSQL must run as the user postgres: %w", err)
		}
	}

	c.dir, err = os.MkdirTemp("", "troupe-pg-")
	if err != nil {
		return nil, fmt.Errorf("pgcluster: %w", err)
	}
	c.dataDir = filepath.Join(c.dir, "data")
	c.logFile = filepath.Join(c.dir, "postgres.log")
	if owner != nil {
		if err := chownTo(c.dir, owner); err != nil {
			os.RemoveAll(c.dir)
			return nil, fmt.Errorf("pgcluster: %w", err)
		}
	}

	if err := c.initdb(ctx, binDir, cfg); err != nil {
		os.RemoveAll(c.dir)
		return nil, err
	}
	if err := c.startWatchdog(); err != nil {
		os.RemoveAll(c.dir)
		return nil, fmt.Errorf("pgcluster: start watchdog: %w", err)
	}

	// The free port is found by binding and releasing it, so another process
	// may take it before the server binds it; try again with a new port.
	const attempts = 3
	for attempt := 1; ; attempt++ {
		err = c.start(ctx, cfg)
		if err == nil {
			return c, nil
		}
		if attempt == attempts || ctx.Err() != nil || !strings.Contains(c.logTail(), "could not bind") {
			break
		}
	}
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	_ = c.Stop(stopCtx)
	return nil, err
}

// URL returns the connection URL of database dbname on the cluster, as the
// superuser postgres.
func (c *Cluster) URL(dbname string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port)),
		Path:     "/" + dbname,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// Port returns the TCP port the server listens on, on 127.0.0.1.
func (c *Cluster) Port() int { return c.port }

// Stop stops the server (pg_ctl stop -m fast, escalating to -m immediate
// when ctx ends first) and removes its directory. Calling Stop again does
// nothing.
func (c *Cluster) Stop(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil
	}
	c.stopped = true

	// The watchdog would race with this stop; end it first.
	if c.watchdog != nil {
		_ = syscall.Kill(-c.watchdog.Process.Pid, syscall.SIGKILL)
		_ = c.watchdog.Wait()
		c.watchdogPipe.Close()
	}

	var errs []error
	if _, err := os.Stat(filepath.Join(c.dataDir, "postmaster.pid")); err == nil {
		if out, err := c.pgctl(ctx, "stop", "-D", c.dataDir, "-m", "fast", "-w", "-t", "60"); err != nil {
			// Do not leave the server behind because ctx ended.
			immCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			out2, err2 := c.pgctl(immCtx, "stop", "-D", c.dataDir, "-m", "immediate", "-w", "-t", "30")
			cancel()
			if err2 != nil {
				errs = append(errs, fmt.Errorf("pg_ctl stop: %w\n%s\n%s", err, out, out2))
			}
		}
	}
	if err := os.RemoveAll(c.dir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pgcluster: stop %s: %w", c.dir, err)
	}
	return nil
}

func (c *Cluster) initdb(ctx context.Context, binDir string, cfg Config) error {
	ctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	// --no-sync: the cluster is thrown away; durability of the initial files
	// is not what anyone measures.
	out, err := c.run(ctx, filepath.Join(binDir, "initdb"),
		"-D", c.dataDir, "--auth=trust", "--username=postgres",
		"--encoding=UTF8", "--locale=C", "--no-sync")
	if err != nil {
		return fmt.Errorf("pgcluster: initdb: %w\n%s", err, tail(out, 20))
	}

	hba := "local all all trust\n" +
		"host all all 127.0.0.1/32 trust\n" +
		"local replication all trust\n" +
		"host replication all 127.0.0.1/32 trust\n"
	if err := os.WriteFile(filepath.Join(c.dataDir, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}

	onOff := "on"
	if cfg.Fast {
		onOff = "off"
	}
	conf := fmt.Sprintf(`
# Added by troupe's pgcluster.
listen_addresses = '127.0.0.1'
unix_socket_directories = '%s'
max_connections = %d
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
fsync = %s
synchronous_commit = %s
full_page_writes = %s
logging_collector = off
`, c.dir, cfg.MaxConnections, onOff, onOff, onOff)
	f, err := os.OpenFile(filepath.Join(c.dataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	if _, err := f.WriteString(conf); err != nil {
		f.Close()
		return fmt.Errorf("pgcluster: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("pgcluster: %w", err)
	}
	return nil
}

func (c *Cluster) start(ctx context.Context, cfg Config) error {
	port, err := freePort()
	if err != nil {
		return fmt.Errorf("pgcluster: find a free port: %w", err)
	}
	c.port = port
	c.startTimeout = cfg.StartTimeout
	return c.startServer(ctx)
}

// startServer starts the server on c.port and waits until it accepts
// connections.
func (c *Cluster) startServer(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.startTimeout+5*time.Second)
	defer cancel()
	secs := strconv.Itoa(int(c.startTimeout.Round(time.Second) / time.Second))
	out, err := c.pgctl(ctx, "start", "-D", c.dataDir, "-l", c.logFile, "-w", "-t", secs,
		"-o", "-p "+strconv.Itoa(c.port))
	if err != nil {
		return fmt.Errorf("pgcluster: start server on 127.0.0.1:%d: %w\n%s\nlast lines of the server log:\n%s",
			c.port, err, tail(out, 5), c.logTail())
	}
	return nil
}

// Crash stops the server the way a crash would (pg_ctl stop -m immediate:
// every server process quits at once, nothing is flushed, open connections
// break) and starts it again on the same port and data, as after a crash:
// the server replays its write-ahead log before it accepts connections
// again. What was committed survives; transactions in flight are gone.
// Crash returns once the server accepts connections again.
func (c *Cluster) Crash(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return errors.New("pgcluster: Crash of a stopped cluster")
	}
	stopCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	out, err := c.pgctl(stopCtx, "stop", "-D", c.dataDir, "-m", "immediate", "-w", "-t", "60")
	cancel()
	if err != nil {
		return fmt.Errorf("pgcluster: stop -m immediate: %w\n%s", err, tail(out, 5))
	}
	return c.startServer(ctx)
}

// startWatchdog launches the shell that stops the cluster once this process
// exits, whatever the way: its standard input is a pipe whose write end only
// this process holds, so read returns at exit. It runs in its own process
// group and ignores the terminal's signals, so a ^C that kills this process
// does not kill the watchdog before it has done its work.
func (c *Cluster) startWatchdog() error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	pgctl := shellQuote(c.pgCtl)
	if c.runAs != "" {
		pgctl = shellQuote(c.runuser) + " -u " + c.runAs + " -- " + pgctl
	}
	script := "trap '' INT TERM HUP QUIT; read _; " +
		pgctl + ` stop -D "$1" -m immediate -w -t 30 >/dev/null 2>&1; rm -rf "$2"`
	cmd := exec.Command("/bin/sh", "-c", script, "troupe-pg-watchdog", c.dataDir, c.dir)
	cmd.Stdin = r
	// rm must be found even if this process runs with a narrow PATH.
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return err
	}
	c.watchdog, c.watchdogPipe = cmd, w
	return nil
}

func (c *Cluster) pgctl(ctx context.Context, args ...string) ([]byte, error) {
	return c.run(ctx, c.pgCtl, args...)
}

// run runs a PostgreSQL program, as the postgres user when this process is
// root, and returns its combined output.
func (c *Cluster) run(ctx context.Context, prog string, args ...string) ([]byte, error) {
	if c.runAs != "" {
		args = append([]string{"-u", c.runAs, "--", prog}, args...)
		prog = c.runuser
	}
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Dir = c.dir // readable by the postgres user, unlike the caller's directory may be
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	// pg_ctl start leaves the server holding no pipe of ours (it redirects
	// to the log), but WaitDelay guarantees Wait returns anyway.
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return out.Bytes(), err
}

func (c *Cluster) logTail() string {
	b, err := os.ReadFile(c.logFile)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	return tail(b, 20)
}

// findBinDir returns the directory holding initdb, pg_ctl and postgres:
// explicit if set, else found on PATH, else the highest version among the
// directories matching pattern.
func findBinDir(explicit, pattern string) (string, error) {
	if explicit != "" {
		if !hasBinaries(explicit) {
			return "", fmt.Errorf("BinDir %s does not hold initdb, pg_ctl and postgres", explicit)
		}
		return explicit, nil
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		// Debian's /usr/bin holds wrappers, not the binaries; follow links
		// to the real directory, where postgres sits beside initdb.
		if real, err := filepath.EvalSymlinks(p); err == nil && hasBinaries(filepath.Dir(real)) {
			return filepath.Dir(real), nil
		}
		if hasBinaries(filepath.Dir(p)) {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob(pattern)
	slices.SortFunc(dirs, func(a, b string) int { return versionOf(b) - versionOf(a) })
	for _, d := range dirs {
		if hasBinaries(d) {
			return d, nil
		}
	}
	return "", ErrBinariesNotFound
}

// findRunuser finds util-linux's runuser, which lives in sbin directories
// that a user's PATH may lack.
func findRunuser() (string, error) {
	if p, err := exec.LookPath("runuser"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"} {
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, nil
		}
	}
	return "", errors.New("runuser not found on PATH nor in /usr/sbin or /sbin: install util-linux")
}

func hasBinaries(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return false
		}
	}
	return true
}

// versionOf returns the major version in /usr/lib/postgresql/<v>/bin, or -1.
func versionOf(binDir string) int {
	v, err := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	if err != nil {
		return -1
	}
	return v
}

func chownTo(path string, u *user.User) error {
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return err
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return err
	}
	return os.Chown(path, uid, gid)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
