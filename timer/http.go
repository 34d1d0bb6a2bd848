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
// task is kept with its last error for an operator (Failed, RetryTx),
// unless it has an OnDone handler, which is then told of the failure.
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
	// OnDone names a handler (registered with Handle on every scheduler
	// that runs HTTP tasks) to run when the task ends: answered 2xx,
	// answered with a status that is not retried, or failed on its last
	// attempt. It runs in the transaction that deletes the task, so the
	// call's outcome is applied exactly once: a crash before that commit
	// makes the call again, with the same Idempotency-Key, and nothing
	// repeats after it. Its Fired.Msg describes the outcome (read it with
	// HTTPOutcomeOf). A handler error counts as a failed attempt: its
	// writes roll back and the call is made again after the backoff (the
	// receiver's idempotency makes that safe), until MaxAttempts; then the
	// task is kept failed for an operator. Default: none.
	OnDone string `json:"on_done,omitempty"`
	// Meta is handed back to OnDone as extension attributes of the outcome
	// message, so its handler knows what the call was for. Its names are
	// lower-case letters a-z and digits, other than httpstatus and
	// httperror.
	Meta map[string]string `json:"meta,omitempty"`
}

// HTTPDoneType is the CloudEvents type of the message an OnDone handler
// gets in Fired.Msg: its data is the response body (up to MaxDoneBody
// bytes), its DataContentType the response's Content-Type, its subject the
// task's id, and its extension attributes the task's Meta, ExtHTTPStatus
// and, for a failed task, ExtHTTPError.
const HTTPDoneType = "dev.troupe.timer.http.done"

// Extension attributes of an OnDone message.
const (
	// ExtHTTPStatus is the last response's status code; "0" when the last
	// attempt got no response (a network error or a timeout).
	ExtHTTPStatus = "httpstatus"
	// ExtHTTPError is why the task failed; absent when it succeeded (2xx).
	ExtHTTPError = "httperror"
)

// MaxDoneBody is the most of a response body an OnDone handler gets. A
// longer error response is cut; a longer 2xx response fails the task at
// once (no answer can be handed on whole), and OnDone is told so without
// the body.
const MaxDoneBody = 1 << 20

// HTTPOutcome is how an HTTP task ended, as its OnDone handler reads it.
type HTTPOutcome struct {
	// TaskID is the task's id (its Idempotency-Key).
	TaskID string
	// Status is the last response's status code, 0 if the last attempt got
	// no response.
	Status int
	// ContentType is the response's Content-Type.
	ContentType string
	// Body is the response's body, up to MaxDoneBody bytes.
	Body []byte
	// Err is why the task failed; "" when it succeeded (2xx).
	Err string
	// Meta is the task's Meta.
	Meta map[string]string
}

// ErrNotHTTPDone is matched by the error HTTPOutcomeOf returns for a Fired
// that is not an HTTP task's outcome.
var ErrNotHTTPDone = errors.New("timer: not an HTTP task's outcome")

// HTTPOutcomeOf reads the outcome of an HTTP task from the Fired its OnDone
// handler got.
func HTTPOutcomeOf(f *Fired) (HTTPOutcome, error) {
	if f == nil || f.Msg == nil || f.Msg.Type != HTTPDoneType {
		return HTTPOutcome{}, ErrNotHTTPDone
	}
	m := f.Msg
	status, err := strconv.Atoi(m.Extensions[ExtHTTPStatus])
	if err != nil {
		return HTTPOutcome{}, fmt.Errorf("%w: %s %q", ErrNotHTTPDone, ExtHTTPStatus, m.Extensions[ExtHTTPStatus])
	}
	out := HTTPOutcome{TaskID: m.Subject, Status: status, ContentType: m.DataContentType, Body: m.Data, Err: m.Extensions[ExtHTTPError], Meta: map[string]string{}}
	for k, v := range m.Extensions {
		if k != ExtHTTPStatus && k != ExtHTTPError {
			out.Meta[k] = v
		}
	}
	return out, nil
}

// validMetaName reports whether name can name an extension attribute of an
// OnDone message.
func validMetaName(name string) bool {
	if name == "" || name == ExtHTTPStatus || name == ExtHTTPError {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	switch name {
	case "specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data",
		"correlationid", "causationid", "traceparent":
		return false
	}
	return true
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
	if len(t.Meta) > 0 && t.OnDone == "" {
		errs = append(errs, errors.New("Meta is handed to OnDone, which is empty"))
	}
	for k := range t.Meta {
		if !validMetaName(k) {
			errs = append(errs, fmt.Errorf("Meta name %q: want lower-case letters a-z and digits, not a CloudEvents attribute, %s or %s", k, ExtHTTPStatus, ExtHTTPError))
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
	row      dueRow // attempts: the claimed attempt's number
	task     HTTPTask
	payload  error     // the stored task cannot be decoded
	leaseEnd time.Time // when another scheduler may take the task over
	lease    string    // the claim's token, which fences its outcome
}

// httpLoop claims due HTTP tasks, up to HTTPConcurrency at a time, and runs
// their calls.
func (s *Scheduler) httpLoop(ctx context.Context) {
	clock := s.cfg.Clock
	sem := make(chan struct{}, s.cfg.HTTPConcurrency)
	done := make(chan struct{}, 1) // a call ended: a slot is free
	var wg sync.WaitGroup
	defer wg.Wait()
	failures := 0
	for ctx.Err() == nil {
		free := cap(sem) - len(sem)
		if free == 0 {
			// Nothing to claim until a call ends, however many are due.
			select {
			case <-ctx.Done():
			case <-done:
			}
			continue
		}
		now := clock.Now()
		tasks, err := s.claimHTTP(ctx, now, free)
		if err != nil {
			failures++
			s.backOff(ctx, "claiming HTTP tasks", err, failures)
			continue
		}
		failures = 0
		for _, t := range tasks {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() {
					<-sem
					select {
					case done <- struct{}{}:
					default: // a wake is pending already
					}
				}()
				s.runTask(ctx, t)
			})
		}
		if len(tasks) == free {
			continue // more may be due
		}
		// Fewer claimed than were free: any task due at now and not
		// claimed is held by another scheduler.
		tick, idle, again := s.planWait(ctx, true, now, false)
		if again {
			continue
		}
		select {
		case <-ctx.Done():
		case <-s.wakeHTTP:
		case <-done:
		case <-tick:
		case <-idle:
		}
	}
}

// claimHTTP leases up to n due HTTP tasks: each one's due time moves to
// now + LeaseTTL, its attempt count goes up by one, and it gets a new claim
// token, in one transaction. The token fences the lease: if the holder dies
// and another scheduler claims the task after the lease (or the task is
// cancelled and scheduled anew), the first holder's late outcome no longer
// matches and is ignored.
func (s *Scheduler) claimHTTP(ctx context.Context, now time.Time, n int) ([]claimedTask, error) {
	now = now.UTC()
	var out []claimedTask
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		out = nil
		q := `SELECT id, kind, target, due_at, payload, schedule, attempts FROM troupe_timers
			WHERE failed_at IS NULL AND kind = 3 AND due_at <= $1 ORDER BY due_at, id LIMIT $2`
		if tx.Dialect() == sqldb.Postgres {
			q += ` FOR UPDATE SKIP LOCKED`
		}
		rows, err := readDue(ctx, tx, q, now, n)
		if err != nil {
			return err
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
			token := s.cfg.Owner + "/" + message.NewID()
			if _, err := tx.Exec(ctx, `UPDATE troupe_timers SET due_at = $1, attempts = attempts + 1, lease = $3 WHERE id = $2`, leaseEnd, r.id, token); err != nil {
				return fmt.Errorf("lease HTTP task %q: %w", r.id, err)
			}
			r.attempts++
			c := claimedTask{row: r, leaseEnd: leaseEnd, lease: token}
			if err := json.Unmarshal(r.payload, &c.task); err != nil {
				c.payload = fmt.Errorf("stored HTTP task cannot be decoded: %w", err)
			}
			out = append(out, c)
		}
		return deleteIDs(ctx, tx, dropped)
	})
	return out, err
}

// outcomeWriteTimeout bounds one write of an attempt's outcome, made even
// while Run stops: the call's answer is worth recording.
const outcomeWriteTimeout = 5 * time.Second

// runTask makes one attempt of a claimed task and records its outcome.
func (s *Scheduler) runTask(ctx context.Context, c claimedTask) {
	var (
		answered   bool
		retryAfter time.Duration
		callErr    error
		res        response
	)
	if c.payload != nil {
		answered, callErr = true, Permanent(c.payload)
	} else {
		answered, res, retryAfter, callErr = s.call1(ctx, c)
	}
	bg := context.WithoutCancel(ctx)
	if !answered && ctx.Err() != nil {
		// Stopping cut the call short: hand the task back (it runs again at
		// once, elsewhere or at the next start), unless another scheduler
		// took it meanwhile. An answer that arrived, even as Run stops, is
		// recorded below instead: handing it back would repeat the call.
		hctx, cancel := context.WithTimeout(bg, outcomeWriteTimeout)
		defer cancel()
		if _, err := s.db.Exec(hctx, `UPDATE troupe_timers SET due_at = $1 WHERE id = $2 AND lease = $3`, s.cfg.Clock.Now().UTC(), c.row.id, c.lease); err != nil {
			s.log.Warn("timer: handing back an HTTP task failed; it runs again after its lease", "id", c.row.id, "err", err)
		}
		return
	}
	now := s.cfg.Clock.Now().UTC()
	maxAttempts := c.task.MaxAttempts
	if maxAttempts == 0 {
		maxAttempts = s.cfg.MaxAttempts
	}
	attempt := c.row.attempts
	onDone := c.task.OnDone
	if c.payload != nil {
		onDone = "" // nothing to tell it: the task is unreadable
	}
	giveUp := callErr != nil && (errors.Is(callErr, ErrPermanent) || attempt >= maxAttempts)
	// ended: the task ends with this attempt and OnDone, if any, runs. It
	// stops being so if OnDone fails: the failure is then recorded as the
	// attempt's.
	ended := callErr == nil || (giveUp && onDone != "")
	retryAt := func() time.Time {
		if callErr == nil || giveUp {
			return now
		}
		return now.Add(max(s.cfg.Backoff(attempt), retryAfter))
	}
	// Every write is fenced on the attempt: a holder whose lease was taken
	// over changes nothing.
	record := func(ctx context.Context, tx sqldb.Tx) (int64, error) {
		switch {
		case ended:
			n, err := tx.Exec(ctx, `DELETE FROM troupe_timers WHERE id = $1 AND lease = $2`, c.row.id, c.lease)
			if err != nil || n == 0 || onDone == "" {
				return n, err
			}
			if err := s.runOnDone(ctx, tx, c, onDone, now, res, callErr); err != nil {
				return 0, &onDoneFailure{err: err}
			}
			return n, nil
		case giveUp:
			return tx.Exec(ctx, `UPDATE troupe_timers SET last_error = $1, failed_at = $2 WHERE id = $3 AND lease = $4`, callErr.Error(), now, c.row.id, c.lease)
		default:
			return tx.Exec(ctx, `UPDATE troupe_timers SET last_error = $1, due_at = $2 WHERE id = $3 AND lease = $4`, callErr.Error(), retryAt(), c.row.id, c.lease)
		}
	}
	// A database that fails the write is tried again while the lease
	// lasts: a success left unrecorded would be called again once the lease
	// ends.
	var n int64
	for tries := 1; ; tries++ {
		wctx, cancel := context.WithTimeout(bg, outcomeWriteTimeout)
		// Calls ending at the same time record their outcomes in one
		// transaction on SQLite (group commit).
		err := s.db.InGroupTx(wctx, func(ctx context.Context, tx sqldb.Tx) error {
			var err error
			n, err = record(ctx, tx)
			return err
		})
		cancel()
		if err == nil {
			break
		}
		if hf := (*onDoneFailure)(nil); errors.As(err, &hf) {
			// The handler's writes rolled back with the deletion: record
			// its failure as this attempt's, to be tried again, call
			// included (the receiver's idempotency makes that safe).
			s.log.Warn("timer: HTTP task's OnDone handler failed", "id", c.row.id, "handler", onDone, "attempt", attempt, "err", hf.err)
			callErr = errors.Join(callErr, fmt.Errorf("OnDone handler %q: %w", onDone, hf.err))
			ended = false
			giveUp = errors.Is(hf.err, ErrPermanent) || attempt >= maxAttempts
			tries = 0
			continue
		}
		b := loopBackoff(tries)
		if ctx.Err() != nil || !s.cfg.Clock.Now().Add(b).Before(c.leaseEnd) {
			s.log.Warn("timer: recording an HTTP task's outcome failed; it runs again after its lease", "id", c.row.id, "attempt", attempt, "call_err", callErr, "err", err)
			return
		}
		s.log.Warn("timer: recording an HTTP task's outcome failed; trying again", "id", c.row.id, "attempt", attempt, "err", err, "backoff", b)
		select {
		case <-ctx.Done(): // one last try
		case <-s.cfg.Clock.After(b):
		}
	}
	target := redactURL(c.task.URL)
	switch {
	case n == 0:
		s.log.Info("timer: HTTP task's outcome ignored: another scheduler took its lease, or it was cancelled", "id", c.row.id, "url", target, "attempt", attempt, "err", callErr)
	case ended:
		if callErr != nil {
			s.log.Warn("timer: HTTP task failed; its OnDone handler was told", "id", c.row.id, "url", target, "attempts", attempt, "handler", onDone, "err", callErr)
		}
		if s.cfg.OnFired != nil {
			s.cfg.OnFired([]Fired{{ID: c.row.id, Kind: KindHTTP, Due: c.row.due, At: now, Attempt: attempt, Schedule: c.row.schedule}})
		}
	case giveUp:
		s.log.Error("timer: HTTP task failed; kept for an operator", "id", c.row.id, "url", target, "attempts", attempt, "err", callErr)
	default:
		s.log.Warn("timer: HTTP task attempt failed; will retry", "id", c.row.id, "url", target, "attempt", attempt, "retry_at", retryAt(), "err", callErr)
	}
}

// onDoneFailure is an OnDone handler's error, which rolled back the
// transaction that recorded the task's end.
type onDoneFailure struct{ err error }

func (e *onDoneFailure) Error() string { return "OnDone handler: " + e.err.Error() }
func (e *onDoneFailure) Unwrap() error { return e.err }

// doneSource is the CloudEvents source of OnDone messages.
const doneSource = "/troupe/timer"

// runOnDone runs the task's OnDone handler in tx with the outcome.
func (s *Scheduler) runOnDone(ctx context.Context, tx sqldb.Tx, c claimedTask, name string, now time.Time, res response, callErr error) error {
	h := s.handler(name)
	if h == nil {
		return fmt.Errorf("%w %q: register it on every scheduler that runs HTTP tasks", ErrUnknownHandler, name)
	}
	m := message.New(doneSource, HTTPDoneType, res.body)
	m.Subject, m.DataContentType = c.row.id, res.contentType
	m.Extensions = map[string]string{ExtHTTPStatus: strconv.Itoa(res.status)}
	for k, v := range c.task.Meta {
		m.Extensions[k] = v
	}
	if callErr != nil {
		m.Extensions[ExtHTTPError] = callErr.Error()
	}
	return s.call(ctx, tx, h, &Fired{ID: c.row.id, Kind: KindHTTP, Target: name, Due: c.row.due, At: now, Attempt: c.row.attempts, Schedule: c.row.schedule, Msg: m})
}

// maxRetryAfter caps a Retry-After the scheduler honors.
const maxRetryAfter = time.Hour

// response is what an attempt's response said, for OnDone.
type response struct {
	status      int
	contentType string
	body        []byte // read only for a task with OnDone
}

// call1 makes the HTTP call. answered reports a response (or a request that
// can never be built): an outcome to record, as opposed to a call cut short.
// err is nil for a 2xx response and a Permanent error for a status that
// retrying cannot mend; retryAfter is the delay a Retry-After header asked
// for.
func (s *Scheduler) call1(ctx context.Context, c claimedTask) (answered bool, res response, retryAfter time.Duration, err error) {
	timeout := c.task.Timeout
	if timeout == 0 {
		timeout = s.cfg.HTTPTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	call := c.task.Method + " " + redactURL(c.task.URL)
	req, err := http.NewRequestWithContext(ctx, c.task.Method, c.task.URL, bytes.NewReader(c.task.Body))
	if err != nil {
		return true, res, 0, Permanent(fmt.Errorf("%s: build request: %w", call, err))
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
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err // its text repeats the method and URL, unredacted
		}
		return false, res, 0, fmt.Errorf("%s: %w", call, err)
	}
	defer resp.Body.Close()
	res.status, res.contentType = resp.StatusCode, resp.Header.Get("Content-Type")
	keep := int64(512)
	if c.task.OnDone != "" {
		keep = MaxDoneBody
	}
	body, rerr := io.ReadAll(io.LimitReader(resp.Body, keep+1))
	over := int64(len(body)) > keep
	body = body[:min(int64(len(body)), keep)]
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20)) // let the connection be reused
	if c.task.OnDone != "" {
		if rerr != nil && resp.StatusCode >= 200 && resp.StatusCode < 300 {
			// A success whose body was cut off is no answer to hand on.
			return ctx.Err() == nil, res, 0, fmt.Errorf("%s: %s: reading the body: %w", call, resp.Status, rerr)
		}
		if over && resp.StatusCode >= 200 && resp.StatusCode < 300 {
			// Nor is one whose body is over the limit; calling again gets
			// the same answer.
			return true, res, 0, Permanent(fmt.Errorf("%s: %s: the body is over %d bytes", call, resp.Status, keep))
		}
		res.body = body
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return true, res, 0, nil
	}
	excerpt := body[:min(len(body), 512)]
	err = fmt.Errorf("%s: %s: %s", call, resp.Status, strings.TrimSpace(string(excerpt)))
	switch code := resp.StatusCode; {
	case code == http.StatusRequestTimeout, code == http.StatusTooEarly, code == http.StatusTooManyRequests, code >= 500:
		return true, res, retryAfterDelay(resp.Header.Get("Retry-After"), s.cfg.Clock.Now()), err
	default:
		return true, res, 0, Permanent(err)
	}
}

// redactURL returns raw with any password replaced by "xxxxx", for logs and
// recorded errors.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return raw
	}
	return u.Redacted()
}

// retryAfterDelay reads a Retry-After header: seconds or an HTTP date,
// capped at maxRetryAfter.
func retryAfterDelay(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		// Out of range counts as huge (or hugely negative): multiplying
		// it into a Duration would overflow.
		switch {
		case n <= 0:
			return 0
		case n >= int64(maxRetryAfter/time.Second):
			return maxRetryAfter
		}
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return min(t.Sub(now), maxRetryAfter)
	}
	return 0
}
