package timer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// IdempotencyKeyHeader is the request header that carries an HTTP task's id
// on every attempt, so the receiver can recognize a repeated call.
const IdempotencyKeyHeader = "Idempotency-Key"

// AttemptHeader is the request header that carries the attempt number,
// from 1.
const AttemptHeader = "Troupe-Attempt"

// HTTPTask is a call to make at a time, for services in any language
// (remote execution). It is made at least once: the scheduler records the
// outcome after the response, so a crash between the two repeats the call,
// with the same Idempotency-Key.
//
// A 2xx response completes the task. A network error, a timeout, 408, 425,
// 429 and 5xx are retried after Config.Backoff (or the response's
// Retry-After, when later), up to MaxAttempts tries. Any other status (a
// 3xx, which is not followed, or a 4xx) fails the task at once. A failed
// task is kept with its last error for an operator (Failed, RetryTx).
type HTTPTask struct {
	// ID identifies the task and is sent as the Idempotency-Key header.
	// Default: a new message.NewID().
	ID string `json:"id"`
	// Method is the request method. Default POST.
	Method string `json:"method,omitempty"`
	// URL is the absolute http or https URL to call. Required.
	URL string `json:"url"`
	// Header is added to the request.
	Header http.Header `json:"header,omitempty"`
	// Body is the request body.
	Body []byte `json:"body,omitempty"`
	// Timeout bounds one attempt. Default Config.HTTPTimeout. It must be
	// shorter than Config.LeaseTTL.
	Timeout time.Duration `json:"timeout,omitempty"`
	// MaxAttempts caps the tries. Default Config.MaxAttempts.
	MaxAttempts int `json:"max_attempts,omitempty"`
}

// checkTask fills the task's defaults and validates it.
func (s *Scheduler) checkTask(t *HTTPTask) error {
	if t.ID == "" {
		t.ID = message.NewID()
	}
	if t.Method == "" {
		t.Method = http.MethodPost
	}
	var errs []error
	if strings.ContainsAny(t.Method, " \t\r\n") || strings.ToUpper(t.Method) != t.Method {
		errs = append(errs, fmt.Errorf("method %q: want an upper-case token such as POST", t.Method))
	}
	u, err := url.Parse(t.URL)
	switch {
	case t.URL == "":
		errs = append(errs, errors.New("empty URL"))
	case err != nil:
		errs = append(errs, fmt.Errorf("URL: %w", err))
	case u.Scheme != "http" && u.Scheme != "https":
		errs = append(errs, fmt.Errorf("URL %q: want an absolute http or https URL", t.URL))
	case u.Host == "":
		errs = append(errs, fmt.Errorf("URL %q has no host", t.URL))
	}
	if t.Timeout < 0 {
		errs = append(errs, fmt.Errorf("timeout %v is negative", t.Timeout))
	}
	if t.Timeout >= s.cfg.LeaseTTL {
		errs = append(errs, fmt.Errorf("timeout %v must be shorter than the lease (Config.LeaseTTL %v)", t.Timeout, s.cfg.LeaseTTL))
	}
	if t.MaxAttempts < 0 {
		errs = append(errs, fmt.Errorf("MaxAttempts %d is negative", t.MaxAttempts))
	}
	for k := range t.Header {
		if strings.EqualFold(k, IdempotencyKeyHeader) {
			errs = append(errs, fmt.Errorf("header %s is set by the scheduler from the task's ID", IdempotencyKeyHeader))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: HTTP task %q: %w", ErrInvalidTimer, t.ID, err)
	}
	return nil
}

// ScheduleHTTPTx stores in tx a task that calls task.URL at at, and returns
// the task's id. A pending task with the same id makes it return ErrExists.
func (s *Scheduler) ScheduleHTTPTx(ctx context.Context, tx sqldb.Tx, at time.Time, task HTTPTask) (string, error) {
	if err := s.checkTask(&task); err != nil {
		return "", err
	}
	if err := s.checkDue(at); err != nil {
		return "", err
	}
	payload, err := json.Marshal(task)
	if err != nil {
		return "", fmt.Errorf("%w: HTTP task %q: %w", ErrInvalidTimer, task.ID, err)
	}
	return task.ID, s.insert(ctx, tx, task.ID, KindHTTP, "", at, payload, "")
}

// ScheduleHTTP is ScheduleHTTPTx in a transaction of its own.
func (s *Scheduler) ScheduleHTTP(ctx context.Context, at time.Time, task HTTPTask) (string, error) {
	var id string
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		id, err = s.ScheduleHTTPTx(ctx, tx, at, task)
		return err
	})
	return id, err
}

// claimedTask is an HTTP task leased for one attempt.
type claimedTask struct {
	row     dueRow // attempts: the claimed attempt's number
	task    HTTPTask
	payload error // the stored task cannot be decoded
}

// httpLoop claims due HTTP tasks, up to HTTPConcurrency at a time, and runs
// their calls.
func (s *Scheduler) httpLoop(ctx context.Context) {
	clock := s.cfg.Clock
	sem := make(chan struct{}, s.cfg.HTTPConcurrency)
	done := make(chan struct{}, s.cfg.HTTPConcurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	failures := 0
	for ctx.Err() == nil {
		free := cap(sem) - len(sem)
		claimed := 0
		if free > 0 {
			tasks, err := s.claimHTTP(ctx, free)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				failures++
				b := s.loopBackoff(failures)
				s.log.Warn("timer: claiming HTTP tasks failed; backing off", "err", err, "failures", failures, "backoff", b)
				select {
				case <-ctx.Done():
				case <-clock.After(b):
				}
				continue
			}
			failures = 0
			claimed = len(tasks)
			for _, t := range tasks {
				sem <- struct{}{}
				wg.Go(func() {
					defer func() {
						<-sem
						select {
						case done <- struct{}{}:
						default:
						}
					}()
					s.runTask(ctx, t)
				})
			}
			if claimed == free {
				continue // more may be due; the semaphore is full now anyway
			}
		}
		wait := s.cfg.PollInterval
		next, ok, err := s.nextDue(ctx, true)
		switch {
		case err != nil:
			if ctx.Err() == nil {
				s.log.Warn("timer: reading the next HTTP task's due time failed", "err", err)
			}
		case ok:
			d := next.Sub(clock.Now())
			if d <= 0 {
				if claimed > 0 && free > claimed {
					continue
				}
				d = idleWait
			}
			wait = min(wait, d)
		}
		select {
		case <-ctx.Done():
		case <-s.wakeHTTP:
		case <-done:
		case <-clock.After(wait):
		}
	}
}

// claimHTTP leases up to n due HTTP tasks: each one's due time moves to
// now + LeaseTTL and its attempt count goes up by one, in one transaction.
// The attempt count fences the lease: if the holder dies and another
// scheduler claims the task after the lease, the first holder's late
// outcome no longer matches and is ignored.
func (s *Scheduler) claimHTTP(ctx context.Context, n int) ([]claimedTask, error) {
	now := s.cfg.Clock.Now().UTC()
	var out []claimedTask
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		out = nil
		q := `SELECT id, kind, target, due_at, payload, schedule, attempts FROM troupe_timers
			WHERE failed_at IS NULL AND kind = 3 AND due_at <= $1 ORDER BY due_at, id LIMIT $2`
		if tx.Dialect() == sqldb.Postgres {
			q += ` FOR UPDATE SKIP LOCKED`
		}
		rs, err := tx.Query(ctx, q, now, n)
		if err != nil {
			return fmt.Errorf("read due HTTP tasks: %w", err)
		}
		var rows []dueRow
		for rs.Next() {
			var r dueRow
			var kind int
			if err := rs.Scan(&r.id, &kind, &r.target, &r.due, &r.payload, &r.schedule, &r.attempts); err != nil {
				rs.Close()
				return fmt.Errorf("read due HTTP tasks: %w", err)
			}
			r.kind = Kind(kind)
			rows = append(rows, r)
		}
		if err := rs.Close(); err != nil {
			return fmt.Errorf("read due HTTP tasks: %w", err)
		}
		if len(rows) == 0 {
			return nil
		}
		skip, err := s.planNext(ctx, tx, now, rows)
		if err != nil {
			return err
		}
		var dropped []string
		leaseEnd := now.Add(s.cfg.LeaseTTL)
		for _, r := range rows {
			if skip[r.id] {
				dropped = append(dropped, r.id)
				continue
			}
			if _, err := tx.Exec(ctx, `UPDATE troupe_timers SET due_at = $1, attempts = attempts + 1 WHERE id = $2`, leaseEnd, r.id); err != nil {
				return fmt.Errorf("lease HTTP task %q: %w", r.id, err)
			}
			r.attempts++
			c := claimedTask{row: r}
			if err := json.Unmarshal(r.payload, &c.task); err != nil {
				c.payload = fmt.Errorf("stored HTTP task cannot be decoded: %w", err)
			}
			out = append(out, c)
		}
		return deleteIDs(ctx, tx, dropped)
	})
	return out, err
}

// runTask makes one attempt of a claimed task and records its outcome.
func (s *Scheduler) runTask(ctx context.Context, c claimedTask) {
	var (
		callErr    error
		retryAfter time.Duration
	)
	if c.payload != nil {
		callErr = Permanent(c.payload)
	} else {
		retryAfter, callErr = s.call1(ctx, c)
	}
	if ctx.Err() != nil {
		// Stopping: hand the task back (it runs again at once, elsewhere or
		// at the next start), unless another scheduler took it meanwhile.
		bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if _, err := s.db.Exec(bg, `UPDATE troupe_timers SET due_at = $1 WHERE id = $2 AND attempts = $3`, s.cfg.Clock.Now().UTC(), c.row.id, c.row.attempts); err != nil {
			s.log.Warn("timer: handing back an HTTP task failed; it runs again after its lease", "id", c.row.id, "err", err)
		}
		return
	}
	now := s.cfg.Clock.Now().UTC()
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if callErr == nil {
			_, err := tx.Exec(ctx, `DELETE FROM troupe_timers WHERE id = $1 AND attempts = $2`, c.row.id, c.row.attempts)
			return err
		}
		maxAttempts := c.task.MaxAttempts
		if maxAttempts == 0 {
			maxAttempts = s.cfg.MaxAttempts
		}
		attempt := c.row.attempts
		reason := callErr.Error()
		if errors.Is(callErr, ErrPermanent) || attempt >= maxAttempts {
			s.log.Error("timer: HTTP task failed; kept for an operator", "id", c.row.id, "url", c.task.URL, "attempts", attempt, "err", callErr)
			_, err := tx.Exec(ctx, `UPDATE troupe_timers SET last_error = $1, failed_at = $2 WHERE id = $3 AND attempts = $4`, reason, now, c.row.id, attempt)
			return err
		}
		retryAt := now.Add(max(s.cfg.Backoff(attempt), retryAfter))
		s.log.Warn("timer: HTTP task attempt failed; will retry", "id", c.row.id, "url", c.task.URL, "attempt", attempt, "retry_at", retryAt, "err", callErr)
		_, err := tx.Exec(ctx, `UPDATE troupe_timers SET last_error = $1, due_at = $2 WHERE id = $3 AND attempts = $4`, reason, retryAt, c.row.id, attempt)
		return err
	})
	if err != nil {
		s.log.Warn("timer: recording an HTTP task's outcome failed; it runs again after its lease", "id", c.row.id, "err", err)
		return
	}
	if callErr == nil && s.cfg.OnFired != nil {
		s.cfg.OnFired([]Fired{{ID: c.row.id, Kind: KindHTTP, Due: c.row.due, At: now, Attempt: c.row.attempts, Schedule: c.row.schedule}})
	}
}

// maxRetryAfter caps a Retry-After the scheduler honors.
const maxRetryAfter = time.Hour

// call1 makes the HTTP call. It returns nil for a 2xx response, a
// Permanent error for a status that retrying cannot mend, and the delay a
// Retry-After header asked for.
func (s *Scheduler) call1(ctx context.Context, c claimedTask) (retryAfter time.Duration, err error) {
	timeout := c.task.Timeout
	if timeout == 0 {
		timeout = s.cfg.HTTPTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, c.task.Method, c.task.URL, bytes.NewReader(c.task.Body))
	if err != nil {
		return 0, Permanent(fmt.Errorf("build request: %w", err))
	}
	for k, vs := range c.task.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	req.Header.Set(IdempotencyKeyHeader, c.task.ID)
	req.Header.Set(AttemptHeader, strconv.Itoa(c.row.attempts))
	if req.Header.Get("User-Agent") == "" {
		req.Header.Set("User-Agent", "troupe-timer")
	}
	resp, err := s.cfg.HTTPClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", c.task.Method, c.task.URL, err)
	}
	defer resp.Body.Close()
	excerpt, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)) // let the connection be reused
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return 0, nil
	}
	err = fmt.Errorf("%s %s: %s: %s", c.task.Method, c.task.URL, resp.Status, strings.TrimSpace(string(excerpt)))
	switch code := resp.StatusCode; {
	case code == http.StatusRequestTimeout, code == http.StatusTooEarly, code == http.StatusTooManyRequests, code >= 500:
		return retryAfterDelay(resp.Header.Get("Retry-After"), s.cfg.Clock.Now()), err
	default:
		return 0, Permanent(err)
	}
}

// retryAfterDelay reads a Retry-After header: seconds or an HTTP date.
func retryAfterDelay(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(v); err == nil && n > 0 {
		return min(time.Duration(n)*time.Second, maxRetryAfter)
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return min(t.Sub(now), maxRetryAfter)
	}
	return 0
}
