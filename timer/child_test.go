package timer_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// The fault tests re-execute the test binary as a service process: it opens
// the database by URL and runs a Scheduler, with the system clock, until it
// is killed with SIGKILL, by the parent or by itself. These environment
// variables tell the child what to do; it tells the parent where it is by
// writing a line to stdout. Its "work" handler records an effect with owner
// "child".
const (
	envChild      = "TROUPE_TIMER_FAULT_CHILD" // the child's part: partBatch, partStream or partHTTP
	envChildDB    = "TROUPE_TIMER_FAULT_DB"    // the database's URL
	envChildAfter = "TROUPE_TIMER_FAULT_AFTER" // see the parts
	envChildWhere = "TROUPE_TIMER_FAULT_WHERE" // partStream: whereInBatch or whereAfterCommit
)

// The parts a child plays.
const (
	// partBatch fires one batch holding every due timer; after the AFTER-th
	// effect it writes lineClaimed and blocks, the batch's transaction
	// open, until the parent kills it.
	partBatch = "batch"
	// partStream fires due timers in batches of childStreamBatch and kills
	// itself at the point WHERE says, of the AFTER-th timer.
	partStream = "stream"
	// partHTTP runs HTTP tasks, childHTTPConcurrency at a time, with a
	// lease of childHTTPLease.
	partHTTP = "http"
)

// lineClaimed is what a partBatch child writes to stdout once it holds the
// batch.
const lineClaimed = "claimed"

// Where a partStream child kills itself.
const (
	// whereInBatch: in the handler, right after recording the AFTER-th
	// timer's effect, its batch's transaction open.
	whereInBatch = "in-batch"
	// whereAfterCommit: in OnFired, right after the commit of the batch
	// that holds the AFTER-th timer, before the next batch begins.
	whereAfterCommit = "after-commit"
)

// The child's configuration.
const (
	childStreamBatch     = 20          // partStream's BatchSize
	childHTTPConcurrency = 4           // partHTTP's HTTPConcurrency
	childHTTPLease       = time.Minute // LeaseTTL, and so HTTP tasks' lease
)

// childMain runs the child's part when the test binary was started by a
// fault test, and reports whether it did. The child never returns normally:
// it is killed, or exits with a code that names what went wrong.
func childMain() bool {
	part := os.Getenv(envChild)
	if part == "" {
		return false
	}
	fail := func(code int, err error) {
		fmt.Fprintln(os.Stderr, "fault child:", err)
		os.Exit(code)
	}
	// A child whose parent died without killing it ends on its own.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	after, err := strconv.Atoi(os.Getenv(envChildAfter))
	if err != nil {
		fail(10, fmt.Errorf("%s: %w", envChildAfter, err))
	}
	db, err := sqldb.Open(ctx, os.Getenv(envChildDB), nil)
	if err != nil {
		fail(11, err)
	}
	cfg := timer.Config{Owner: "child", PollInterval: 10 * time.Millisecond, LeaseTTL: childHTTPLease}
	// The "work" handler records an effect and, at its after-th call, runs
	// atAfter with the batch's transaction open.
	var atAfter func()
	calls := 0
	handler := func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
		if err := recordEffect("child")(ctx, tx, f); err != nil {
			return err
		}
		if calls++; calls == after && atAfter != nil {
			atAfter()
		}
		return nil
	}
	switch part {
	case partBatch:
		atAfter = func() {
			fmt.Println(lineClaimed)
			<-ctx.Done()
			fail(12, fmt.Errorf("blocked in the batch's transaction and not killed: %w", ctx.Err()))
		}
	case partStream:
		cfg.BatchSize = childStreamBatch
		switch where := os.Getenv(envChildWhere); where {
		case whereInBatch:
			atAfter = killSelf
		case whereAfterCommit:
			fired := 0
			cfg.OnFired = func(f []timer.Fired) {
				if fired += len(f); fired >= after {
					killSelf()
				}
			}
		default:
			fail(13, fmt.Errorf("%s: unknown point %q", envChildWhere, where))
		}
	case partHTTP:
		cfg.HTTPConcurrency = childHTTPConcurrency
	default:
		fail(14, fmt.Errorf("unknown part %q", part))
	}
	s, err := timer.New(db, cfg)
	if err != nil {
		fail(15, err)
	}
	if err := s.Handle("work", handler); err != nil {
		fail(16, err)
	}
	err = s.Run(ctx)
	fail(17, fmt.Errorf("scheduler returned without being killed: %v", err))
	return true
}

// killSelf kills the process with SIGKILL: no deferred call, no cleanup,
// no rollback but the database's own.
func killSelf() {
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // the signal is on its way
}

// child is a service process started by a fault test.
type child struct {
	t      testing.TB
	cmd    *exec.Cmd
	lines  chan string     // what it writes to stdout; closed at EOF
	stderr strings.Builder // read only once it ended
	ended  bool
}

// startChild starts a child playing part on the database at dbURL, with
// the extra environment variables env ("NAME=value"). It is killed, if
// still running, when the test ends.
func startChild(t testing.TB, part, dbURL string, after int, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		envChild+"="+part,
		envChildDB+"="+dbURL,
		envChildAfter+"="+strconv.Itoa(after),
	)
	cmd.Env = append(cmd.Env, env...)
	c := &child{t: t, cmd: cmd, lines: make(chan string, 16)}
	cmd.Stderr = &c.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		if !c.ended {
			_ = cmd.Process.Kill()
			c.wait()
		}
	})
	return c
}

// wait reaps the child, which has ended or is about to.
func (c *child) wait() {
	for range c.lines { // the reader ends at EOF, before Wait closes the pipe
	}
	_ = c.cmd.Wait()
	c.ended = true
}

// waitLine waits until the child writes want, failing the test if it ends
// first or takes more than 20 s.
func (c *child) waitLine(want string) {
	c.t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line, ok := <-c.lines:
			if !ok {
				c.wait()
				c.t.Fatalf("the child ended (%v) before writing %q; stderr:\n%s", c.cmd.ProcessState, want, c.stderr.String())
			}
			if line == want {
				return
			}
			c.t.Logf("child: %s", line)
		case <-timeout:
			_ = c.cmd.Process.Kill()
			c.wait()
			c.t.Fatalf("the child wrote no %q within 20 s; stderr:\n%s", want, c.stderr.String())
		}
	}
}

// kill kills the child with SIGKILL, waits for it to end, and checks that
// the signal is what ended it.
func (c *child) kill() {
	c.t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		c.t.Fatalf("kill the child: %v", err)
	}
	c.waitKilled()
}

// waitKilled waits for the child to end, at most 20 s, and checks that
// SIGKILL ended it.
func (c *child) waitKilled() {
	c.t.Helper()
	timeout := time.After(20 * time.Second)
	for open := true; open; {
		select {
		case line, ok := <-c.lines:
			if open = ok; ok {
				c.t.Logf("child: %s", line)
			}
		case <-timeout:
			_ = c.cmd.Process.Kill()
			c.wait()
			c.t.Fatalf("the child did not end within 20 s; stderr:\n%s", c.stderr.String())
		}
	}
	c.wait()
	ws, ok := c.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		c.t.Fatalf("the child ended with %v, not by our SIGKILL; stderr:\n%s", c.cmd.ProcessState, c.stderr.String())
	}
}
