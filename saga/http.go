package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// The request headers of a step called over HTTP, besides
// timer.IdempotencyKeyHeader (Idempotency-Key: the same on every call of
// one side of one step of one saga) and timer.AttemptHeader
// (Troupe-Attempt: the call's number, from 1). The names are part of the
// protocol: they never change.
const (
	// HeaderSagaID names the saga instance.
	HeaderSagaID = "Troupe-Saga-Id"
	// HeaderStep names the step (or the group's branch).
	HeaderStep = "Troupe-Saga-Step"
	// HeaderOp is "action" or "compensation".
	HeaderOp = "Troupe-Saga-Op"
	// HeaderSource is the orchestrating service's CloudEvents source
	// (Config.Source).
	HeaderSource = "Troupe-Saga-Source"
)

// HTTPDoneHandler is the timer handler name under which an orchestrator
// receives the outcomes of its HTTP steps' calls.
const HTTPDoneHandler = "troupe.saga.http-done"

// httpTaskID is the id of the timer task that calls side op of step (or
// branch) name of a saga, and the Idempotency-Key of its calls: the same
// for every call of that side, as the participant's barrier key is.
func httpTaskID(sagaID, name string, op Op) string {
	return "saga-http/" + sagaID + "/" + name + "/" + op.String()
}

// callHTTP stores, in tx, the timer task that POSTs side op of the HTTP
// step m with input as its JSON body, and returns the task's id. The call
// is made outside any transaction, by the scheduler's HTTP loop; its
// outcome comes back to onHTTPDone in the transaction that ends the task.
func (o *Orchestrator) callHTTP(ctx context.Context, tx sqldb.Tx, in *instance, m step, op Op, attempt int, input any) (string, error) {
	body, err := json.Marshal(input)
	if err != nil {
		return "", fmt.Errorf("saga: encode the input of %s %s of %q: %w", m.name, op, in.id, err)
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set(HeaderSagaID, in.id)
	h.Set(HeaderStep, m.name)
	h.Set(HeaderOp, op.String())
	h.Set(HeaderSource, o.cfg.Source)
	// An action's calls are capped by MaxAttempts (and its deadline). A
	// compensation's are bounded by time alone: its deadline, set
	// CompensationTimeout after this send, cancels the task and parks the
	// saga. How many calls fit in that time depends on the scheduler's
	// Backoff and on the participant's Retry-After, neither known here (a
	// Backoff of 0 fits any number), so the task's own cap is put out of
	// reach rather than guessed: the task never gives up before the
	// deadline, and a refusal (4xx) still ends it at once.
	maxAttempts := m.maxAttempts
	if op == Compensation {
		maxAttempts = math.MaxInt32
	}
	task := timer.HTTPTask{
		ID:          httpTaskID(in.id, m.name, op),
		URL:         m.urlFor(op),
		Header:      h,
		Body:        body,
		MaxAttempts: maxAttempts,
		OnDone:      HTTPDoneHandler,
		Meta:        map[string]string{ExtSagaID: in.id, ExtStep: m.name, ExtOp: op.String(), extAttempt: strconv.Itoa(attempt)},
	}
	// A task left from an earlier send (an operator's retry of a parked
	// compensation) gives way: the new one calls with the same key.
	if _, err := o.sched.TryCancelTx(ctx, tx, task.ID); err != nil {
		return "", err
	}
	// ErrExists: the earlier task is ending in a transaction that waits
	// for this saga's row; its outcome will answer this send.
	if _, err := o.sched.ScheduleHTTPTx(ctx, tx, o.sched.Now(), task); err != nil && !errors.Is(err, timer.ErrExists) {
		return "", fmt.Errorf("saga: call %s %s of %q: %w", m.name, op, in.id, err)
	}
	return task.ID, nil
}

// maxReason caps a refusal's reason read from a response body.
const maxReason = 512

// onHTTPDone applies the outcome of an HTTP step's call, in the timer's
// transaction that ends the call's task: exactly once. An outcome the saga
// no longer awaits is recorded in the history and otherwise ignored. An
// error makes the scheduler call again (the participant answers a repeated
// call as the first), until the task's attempts are spent; the step's
// deadline then decides.
func (o *Orchestrator) onHTTPDone(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
	out, err := timer.HTTPOutcomeOf(f)
	if err != nil {
		return timer.Permanent(err)
	}
	sagaID, name := out.Meta[ExtSagaID], out.Meta[ExtStep]
	op, ok := parseOp(out.Meta[ExtOp])
	if sagaID == "" || name == "" || !ok {
		return timer.Permanent(fmt.Errorf("saga: HTTP outcome %q lacks its saga, step or side", out.TaskID))
	}
	in, err := o.load(ctx, tx, sagaID)
	if errors.Is(err, sqldb.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("saga: load %q: %w", sagaID, err)
	}
	def, err := o.definition(in.name, in.version)
	if err != nil {
		return err
	}
	m, bs, attempt, ok := awaited(def, in, name, op)
	if !ok {
		o.log.Info("saga: ignoring an HTTP outcome the saga does not await", "saga", in.id, "step", name, "op", op, "status", in.status, "http_status", out.Status)
		o.record(in, name, op.String(), 0, "ignored-reply", "HTTP "+strconv.Itoa(out.Status))
		return o.save(ctx, tx, in)
	}
	return o.conclude(ctx, tx, def, in, m, bs, op, attempt, httpVerdict(in.id, m, op, f.Attempt, out))
}

// httpVerdict reads a call's outcome: 2xx is success, its body the reply's
// data; 409 and 422 are business refusals, the body their reason; a
// network error, 408, 425, 429 and 5xx on the last attempt mean no answer
// (lost); any other status is a refusal.
func httpVerdict(sagaID string, m step, op Op, calls int, out timer.HTTPOutcome) verdict {
	body := strings.TrimSpace(string(out.Body))
	if len(body) > maxReason {
		body = body[:maxReason] + "..."
	}
	switch s := out.Status; {
	case s >= 200 && s < 300 && out.Err != "" && op == Action:
		// A success whose body could not be read whole (cut off, or over
		// timer.MaxDoneBody): the timer reports a failure, and OnReply
		// would get a cut body. The action ran: compensate it.
		return verdict{kind: lost, reason: fmt.Sprintf("step %q: the %s's answer (HTTP %d) could not be read: %s", m.name, op, s, out.Err)}
	case s >= 200 && s < 300:
		rm := message.New(m.urlFor(op), ReplyType, out.Body)
		rm.ID, rm.DataContentType = out.TaskID, out.ContentType
		rm.Subject, rm.CorrelationID = sagaID, sagaID
		rm.Extensions = map[string]string{ExtSagaID: sagaID, ExtStep: m.name, ExtOp: op.String(), ExtOutcome: Succeeded.String()}
		return verdict{kind: succeeded, reply: &ReplyMsg{Msg: rm, SagaID: sagaID, Step: m.name, Op: op, Outcome: Succeeded}}
	case s == http.StatusConflict || s == http.StatusUnprocessableEntity:
		if body == "" {
			body = http.StatusText(s)
		}
		return verdict{kind: refused, reason: body}
	case s == 0 || s == http.StatusRequestTimeout || s == http.StatusTooEarly || s == http.StatusTooManyRequests || s >= 500:
		return verdict{kind: lost, reason: fmt.Sprintf("step %q: the %s failed after %d calls: %s", m.name, op, calls, out.Err)}
	default:
		return verdict{kind: refused, reason: fmt.Sprintf("HTTP %d %s: %s", s, http.StatusText(s), body)}
	}
}
