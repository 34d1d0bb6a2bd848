package chaos

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is one node process of a run and its successive incarnations: it
// is started again whenever it exits, after the downtime the harness
// chose when it killed it, or after restartAfter when it exited on its
// own.
type proc struct {
	name    string
	args    []string
	command func(args ...string) *exec.Cmd
	logPath string // every incarnation's standard error, appended

	mu       sync.Mutex
	cur      *incarnation
	next     chan struct{} // closed when the next incarnation is launched
	ended    NodeStats     // summed over the incarnations that ended
	launches int
	exits    []string // why incarnations exited on their own
	stopping bool
	stopped  chan struct{} // closed by stop
	done     chan struct{} // closed when supervise returns
}

// incarnation is one run of a proc's process.
type incarnation struct {
	cmd   *exec.Cmd
	ready chan struct{} // closed once it printed readyLine
	done  chan struct{} // closed once it exited and its output is read
	err   error         // how it exited, once done

	// Guarded by proc.mu.
	stats    NodeStats
	killed   bool          // by the harness
	downtime time.Duration // before the next incarnation, when killed
	counted  bool          // stats added to proc.ended
}

// restartAfter is how long a process that exited on its own stays down.
const restartAfter = time.Second

func newProc(name string, args []string, command func(args ...string) *exec.Cmd, logPath string) *proc {
	return &proc{name: name, args: args, command: command, logPath: logPath, next: make(chan struct{}), stopped: make(chan struct{}), done: make(chan struct{})}
}

// supervise runs the process until ctx ends or stop is called, starting
// it again each time it exits.
func (p *proc) supervise(ctx context.Context) {
	defer close(p.done)
	for {
		inc, err := p.launch()
		if err != nil {
			p.mu.Lock()
			p.exits = append(p.exits, "start: "+err.Error())
			p.mu.Unlock()
			if !p.pause(ctx, restartAfter) {
				return
			}
			continue
		}
		select {
		case <-inc.done:
		case <-ctx.Done():
			p.terminate(inc)
			return
		case <-p.stopped:
			p.terminate(inc)
			return
		}
		p.mu.Lock()
		p.ended = p.ended.add(inc.stats)
		inc.counted = true
		down := inc.downtime
		if !inc.killed {
			p.exits = append(p.exits, p.exitReason(inc))
			down = restartAfter
		}
		p.mu.Unlock()
		if !p.pause(ctx, down) {
			return
		}
	}
}

// launch starts an incarnation and returns without waiting for it to be
// ready.
func (p *proc) launch() (*incarnation, error) {
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "--- %s: start %s\n", time.Now().Format(time.RFC3339Nano), p.name)
	cmd := p.command(p.args...)
	cmd.Stderr = logf
	// A node never outlives the harness, however the harness ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	inc := &incarnation{cmd: cmd, ready: make(chan struct{}), done: make(chan struct{})}
	p.mu.Lock()
	p.cur = inc
	p.launches++
	close(p.next)
	p.next = make(chan struct{})
	p.mu.Unlock()
	go func() {
		sc := bufio.NewScanner(out)
		ready := false
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == readyLine && !ready:
				ready = true
				close(inc.ready)
			case strings.HasPrefix(line, statsPrefix):
				var st NodeStats
				if json.Unmarshal([]byte(line[len(statsPrefix):]), &st) == nil {
					p.mu.Lock()
					inc.stats = st
					p.mu.Unlock()
				}
			}
		}
		inc.err = cmd.Wait()
		close(inc.done)
	}()
	return inc, nil
}

// exitReason says how inc exited, with the last lines it wrote on
// standard error.
func (p *proc) exitReason(inc *incarnation) string {
	reason := fmt.Sprintf("%s exited on its own (%v)", p.name, inc.err)
	if b, err := os.ReadFile(p.logPath); err == nil {
		lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
		if n := len(lines); n > 0 {
			reason += ": " + string(lines[n-1])
		}
	}
	return reason
}

// current returns the running incarnation and the channel closed when
// the next one is launched.
func (p *proc) current() (*incarnation, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur, p.next
}

// waitReady waits until an incarnation of the process serves.
func (p *proc) waitReady(ctx context.Context) error {
	for {
		inc, next := p.current()
		if inc == nil {
			select {
			case <-next:
				continue
			case <-p.done:
				return fmt.Errorf("%s: stopped", p.name)
			case <-ctx.Done():
				return fmt.Errorf("%s did not start: %w", p.name, ctx.Err())
			}
		}
		select {
		case <-inc.ready:
			return nil
		case <-inc.done:
			// It exited before it served; supervise starts the next.
			select {
			case <-next:
			case <-p.done:
				return fmt.Errorf("%s: stopped", p.name)
			case <-ctx.Done():
				return fmt.Errorf("%s did not start: %w", p.name, ctx.Err())
			}
		case <-ctx.Done():
			return fmt.Errorf("%s did not start: %w", p.name, ctx.Err())
		}
	}
}

// kill kills the process with SIGKILL, waits downtime, and returns once
// its next incarnation serves.
func (p *proc) kill(ctx context.Context, downtime time.Duration) error {
	p.mu.Lock()
	inc, next := p.cur, p.next
	if inc == nil {
		p.mu.Unlock()
		return fmt.Errorf("%s is not running", p.name)
	}
	inc.killed, inc.downtime = true, downtime
	p.mu.Unlock()
	if err := inc.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	<-inc.done
	select {
	case <-next:
	case <-ctx.Done():
		return ctx.Err()
	}
	return p.waitReady(ctx)
}

// stop ends the process with SIGTERM (SIGKILL after 30 s) and does not
// start it again.
func (p *proc) stop() {
	p.mu.Lock()
	if !p.stopping {
		p.stopping = true
		close(p.stopped)
	}
	p.mu.Unlock()
	<-p.done
}

// pause waits d before the next incarnation: false when the process is to
// stay down (ctx ended, or stop was called).
func (p *proc) pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	case <-p.stopped:
		return false
	}
}

// terminate ends inc: SIGTERM, then SIGKILL if it is still running after
// 30 s.
func (p *proc) terminate(inc *incarnation) {
	inc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-inc.done:
	case <-time.After(30 * time.Second):
		inc.cmd.Process.Kill()
		<-inc.done
	}
}

// summary returns the process's stats over all its incarnations, how many
// times it was started, and why it exited when it did on its own.
func (p *proc) summary() (NodeStats, int, []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.ended
	if p.cur != nil && !p.cur.counted {
		st = st.add(p.cur.stats)
	}
	return st, p.launches, append([]string(nil), p.exits...)
}

// wait waits d, or until ctx ends: false then.
func wait(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
