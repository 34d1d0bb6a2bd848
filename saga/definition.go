package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// Defaults of Step fields.
const (
	DefaultDeadline            = 30 * time.Second
	DefaultMaxAttempts         = 3
	DefaultCompensationTimeout = 10 * time.Minute
)

// ErrInvalidDefinition is matched by the error Register returns for a
// definition that cannot run.
var ErrInvalidDefinition = errors.New("saga: invalid definition")

// A Definition describes a saga type: its steps, in order, and what happens
// when it completes or has compensated. D is the saga's data, stored as
// JSON with each instance and handed to every step.
type Definition[D any] struct {
	// Name identifies the saga type on the wire and in the database; it
	// never changes. Required.
	Name string
	// Version numbers the definition. An instance finishes on the version
	// it started with, so register every version that may have instances
	// in flight. Default 1.
	Version int
	// Steps run in order; when one fails, those before it are compensated
	// in reverse order.
	Steps []Step[D]
	// OnCompleted runs in the transaction that completes the saga (approve
	// the order).
	OnCompleted func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D) error
	// OnCompensated runs in the transaction that ends the compensation
	// (reject the order), with the reason the saga failed.
	OnCompensated func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D, reason string) error
}

// A Step is one local transaction of the saga, with its compensation. It is
// one of:
//
//   - local (Local set): it runs in the orchestrator's own database, in the
//     transition's transaction;
//   - a command (Topic and Command set): it is sent to a Participant over
//     the broker and its reply awaited;
//   - an HTTP call (URL set): the orchestrator POSTs to the participant, in
//     any language, and the response is the reply (see the package
//     documentation for the protocol);
//   - a parallel group (Parallel set): its branches, ordinary steps of the
//     three kinds above, run at once, and the group is done when all are.
type Step[D any] struct {
	// Name identifies the step within its saga: unique among all its steps
	// and branches. Required.
	Name string

	// Local runs a local step. Return Refuse(err) for a business refusal:
	// its writes are undone and the saga compensates; any other error
	// rolls the transition back, to be retried. Messages it adds with
	// outbox.Add(ctx, tx, ...) may be kept for one insert with the rest of
	// a batch (outbox.Defer): a refusal takes them back with its writes,
	// but a rollback to a savepoint of the step's own does not.
	Local func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D) error
	// UndoLocal compensates a completed local step (nil: nothing to undo).
	UndoLocal func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D) error

	// Topic is the participant's command topic.
	Topic string
	// Command is the command type; the participant handles its action and
	// its compensation (Participant.Handle).
	Command string

	// URL is where an HTTP step's action is POSTed (an absolute http or
	// https URL), and its compensation too unless CompensationURL is set:
	// the header Troupe-Saga-Op tells the side.
	URL string
	// CompensationURL is where an HTTP step's compensation is POSTed.
	// Default: URL.
	CompensationURL string

	// Input is the command's data (the HTTP request's JSON body), made from
	// the saga's (nil: none).
	Input func(data *D) any
	// OnReply reads a successful action's reply (for an HTTP step: the
	// response body) into the saga's data (nil: the reply's data is
	// ignored). The OnReply of concurrent branches of a group each update
	// the saga's data, one reply at a time: every transition holds the
	// saga's row lock.
	OnReply func(data *D, reply *ReplyMsg) error
	// Deadline is how long to await an action's reply before sending its
	// command again; for an HTTP step, how long the action may take in
	// all, its retried calls included, before it counts as failed. A
	// compensation's command is first awaited Deadline too, then twice as
	// long at each send (see CompensationTimeout). Default 30 s.
	Deadline time.Duration
	// MaxAttempts caps the sends of an action's command: when the last one
	// gets no reply by its deadline, the action counts as failed and the
	// saga compensates (this step too, since it may have run). For an HTTP
	// step it caps the calls of the action: transient failures (a network
	// error, 408, 425, 429, 5xx) are retried with the timer scheduler's
	// backoff until then. Compensations are not capped by it: see
	// CompensationTimeout. Default 3.
	MaxAttempts int
	// CompensationTimeout is how long the compensation may go unanswered
	// before the saga parks for an operator. A compensation must succeed
	// in the end, and a participant, broker or database down for a while
	// is no reason to wake anyone, so until then it is sent again: over
	// the broker at each of its deadlines, which wait Deadline, then twice
	// as long each time, up to a minute (or Deadline, if longer); over
	// HTTP its calls are retried after transient failures with the timer
	// scheduler's backoff. A compensation refused (a Failure reply, an
	// HTTP refusal, a local compensation's error) parks the saga at once.
	// Default DefaultCompensationTimeout (10 min).
	CompensationTimeout time.Duration

	// Parallel makes the step a group of branches that run at once (fork)
	// and complete together (join). A group has two or more branches, each
	// a local, command or HTTP step (not a group), and nothing else of its
	// own. See the package documentation for how a group compensates.
	Parallel []Step[D]
}

// refusal marks a local step's business refusal.
type refusal struct{ err error }

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// Refuse wraps a local step's error as a business refusal: the saga
// compensates instead of retrying.
func Refuse(err error) error {
	if err == nil {
		return nil
	}
	return &refusal{err: err}
}

// definition is a Definition with its data type erased: steps take and
// return the data as JSON.
type definition struct {
	name          string
	version       int
	steps         []step
	onCompleted   func(ctx context.Context, tx sqldb.Tx, id string, data []byte) error
	onCompensated func(ctx context.Context, tx sqldb.Tx, id string, data []byte, reason string) error
}

type step struct {
	name                string
	local               func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error)
	undoLocal           func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error)
	topic               string
	command             string
	url                 string
	compensationURL     string
	input               func(data []byte) (any, error)
	onReply             func(data []byte, r *ReplyMsg) ([]byte, error)
	deadline            time.Duration
	maxAttempts         int
	compensationTimeout time.Duration
	branches            []step // a parallel group's
}

func (s step) isLocal() bool { return s.local != nil }
func (s step) isHTTP() bool  { return s.url != "" }
func (s step) isGroup() bool { return len(s.branches) > 0 }

// maxCompensationWait caps how long one send of a compensation's command
// is awaited, unless the step's Deadline is longer.
const maxCompensationWait = time.Minute

// wait returns how long the n-th send (from 0) of a round of sends of side
// op is awaited, and, for a compensation, how long the round has then been
// awaited in all (an action's sends are counted instead: total is 0).
//
// Each send of an action is awaited Deadline. An HTTP compensation is one
// send, whose calls the scheduler retries, awaited CompensationTimeout. A
// compensation's command is awaited Deadline, then twice as long at each
// send, up to max(Deadline, maxCompensationWait), the last wait cut so
// that the total is CompensationTimeout; past it, wait is 0.
func (s step) wait(op Op, n int) (wait, total time.Duration) {
	switch {
	case op == Action:
		return s.deadline, 0
	case s.isHTTP():
		return s.compensationTimeout, s.compensationTimeout
	}
	w, ceiling := s.deadline, max(s.deadline, maxCompensationWait)
	for i := 0; ; i++ {
		wait = min(w, s.compensationTimeout-total)
		if wait <= 0 {
			return 0, total
		}
		total += wait
		if i == n {
			return wait, total
		}
		if w > ceiling/2 {
			w = ceiling
		} else {
			w *= 2
		}
	}
}

// urlFor returns the URL an HTTP step's side is POSTed to.
func (s step) urlFor(op Op) string {
	if op == Compensation && s.compensationURL != "" {
		return s.compensationURL
	}
	return s.url
}

// branch returns the group's branch named name.
func (s step) branch(name string) (step, bool) {
	for _, b := range s.branches {
		if b.name == name {
			return b, true
		}
	}
	return step{}, false
}

// registration is what Register accepts: a *Definition of any data type.
type registration interface {
	erase() (*definition, error)
}

// withData decodes data, runs f on it, and encodes the result.
func withData[D any](data []byte, f func(d *D) error) ([]byte, error) {
	var d D
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("saga: decode the saga's data: %w", err)
	}
	if err := f(&d); err != nil {
		return nil, err
	}
	out, err := json.Marshal(&d)
	if err != nil {
		return nil, fmt.Errorf("saga: encode the saga's data: %w", err)
	}
	return out, nil
}

func (def *Definition[D]) erase() (*definition, error) {
	var errs []error
	if def.Name == "" {
		errs = append(errs, errors.New("empty Name"))
	}
	if len(def.Steps) == 0 {
		errs = append(errs, errors.New("no steps"))
	}
	d := &definition{name: def.Name, version: def.Version}
	if d.version == 0 {
		d.version = 1
	}
	seen := map[string]bool{}
	for i, s := range def.Steps {
		st, serrs := eraseStep(s, fmt.Sprintf("step %d", i), seen)
		errs = append(errs, serrs...)
		if len(s.Parallel) > 0 {
			if s.Local != nil || s.UndoLocal != nil || s.Topic != "" || s.Command != "" || s.URL != "" || s.CompensationURL != "" ||
				s.Input != nil || s.OnReply != nil || s.Deadline != 0 || s.MaxAttempts != 0 || s.CompensationTimeout != 0 {
				errs = append(errs, fmt.Errorf("group %q has a transport or settings of its own: set them on its branches", s.Name))
			}
			if len(s.Parallel) < 2 {
				errs = append(errs, fmt.Errorf("group %q has %d branch: a group needs two or more", s.Name, len(s.Parallel)))
			}
			for j, b := range s.Parallel {
				if len(b.Parallel) > 0 {
					errs = append(errs, fmt.Errorf("group %q: branch %q is a group: groups do not nest", s.Name, b.Name))
					continue
				}
				bs, berrs := eraseStep(b, fmt.Sprintf("group %q branch %d", s.Name, j), seen)
				errs = append(errs, berrs...)
				st.branches = append(st.branches, bs)
			}
		}
		d.steps = append(d.steps, st)
	}
	if def.OnCompleted != nil {
		d.onCompleted = func(ctx context.Context, tx sqldb.Tx, id string, data []byte) error {
			_, err := withData(data, func(d *D) error { return def.OnCompleted(ctx, tx, id, d) })
			return err
		}
	}
	if def.OnCompensated != nil {
		d.onCompensated = func(ctx context.Context, tx sqldb.Tx, id string, data []byte, reason string) error {
			_, err := withData(data, func(d *D) error { return def.OnCompensated(ctx, tx, id, d, reason) })
			return err
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w %q: %w", ErrInvalidDefinition, def.Name, err)
	}
	return d, nil
}

// eraseStep checks one step (of a group: not its branches) and erases its
// data type. what names it in errors until it is known to have a name;
// seen holds the names taken.
func eraseStep[D any](s Step[D], what string, seen map[string]bool) (step, []error) {
	var errs []error
	if s.Name == "" {
		errs = append(errs, fmt.Errorf("%s has no Name", what))
	} else if seen[s.Name] {
		errs = append(errs, fmt.Errorf("step %q appears twice (names are unique across the steps and the groups' branches)", s.Name))
	}
	seen[s.Name] = true
	st := step{name: s.Name, topic: s.Topic, command: s.Command, url: s.URL, compensationURL: s.CompensationURL,
		deadline: s.Deadline, maxAttempts: s.MaxAttempts, compensationTimeout: s.CompensationTimeout}
	if st.deadline == 0 {
		st.deadline = DefaultDeadline
	}
	if st.maxAttempts == 0 {
		st.maxAttempts = DefaultMaxAttempts
	}
	if st.compensationTimeout == 0 {
		st.compensationTimeout = DefaultCompensationTimeout
	}
	if s.Deadline < 0 || s.MaxAttempts < 0 || s.CompensationTimeout < 0 {
		errs = append(errs, fmt.Errorf("step %q: negative Deadline, MaxAttempts or CompensationTimeout", s.Name))
	}
	if len(s.Parallel) > 0 {
		return st, errs // a group: its caller checks the rest
	}
	local, command, web := s.Local != nil, s.Topic != "" || s.Command != "", s.URL != "" || s.CompensationURL != ""
	switch {
	case local && command:
		errs = append(errs, fmt.Errorf("step %q is both local and a command", s.Name))
	case local && web:
		errs = append(errs, fmt.Errorf("step %q is both local and an HTTP step", s.Name))
	case command && web:
		errs = append(errs, fmt.Errorf("step %q is both a command and an HTTP step", s.Name))
	case !local && !command && !web:
		errs = append(errs, fmt.Errorf("step %q has neither Local, Topic and Command, URL nor Parallel", s.Name))
	case command && (s.Topic == "" || s.Command == ""):
		errs = append(errs, fmt.Errorf("step %q needs both Topic and Command", s.Name))
	case web && s.URL == "":
		errs = append(errs, fmt.Errorf("step %q has a CompensationURL but no URL", s.Name))
	case local && (s.Input != nil || s.OnReply != nil):
		errs = append(errs, fmt.Errorf("step %q is local: Input and OnReply apply to commands and HTTP steps", s.Name))
	}
	if web {
		for _, u := range []string{s.URL, s.CompensationURL} {
			if err := checkURL(u); u != "" && err != nil {
				errs = append(errs, fmt.Errorf("step %q: %w", s.Name, err))
			}
		}
	}
	if s.Local != nil {
		st.local = func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error) {
			return withData(data, func(d *D) error { return s.Local(ctx, tx, id, d) })
		}
	}
	if s.UndoLocal != nil {
		st.undoLocal = func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error) {
			return withData(data, func(d *D) error { return s.UndoLocal(ctx, tx, id, d) })
		}
	}
	st.input = func(data []byte) (any, error) {
		var in any
		_, err := withData(data, func(d *D) error {
			if s.Input != nil {
				in = s.Input(d)
			}
			return nil
		})
		return in, err
	}
	if s.OnReply != nil {
		st.onReply = func(data []byte, r *ReplyMsg) ([]byte, error) {
			return withData(data, func(d *D) error { return s.OnReply(d, r) })
		}
	}
	return st, errs
}

// checkURL reports why raw cannot be an HTTP step's URL.
func checkURL(raw string) error {
	u, err := url.Parse(raw)
	switch {
	case err != nil:
		return fmt.Errorf("URL: %w", err)
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("URL %q: want an absolute http or https URL", raw)
	case u.Host == "":
		return fmt.Errorf("URL %q has no host", raw)
	}
	return nil
}

// StartTx starts an instance of the saga, with id and data, in tx: the
// instance and its first step's command (or its local steps' writes) commit
// with tx. The orchestrator must have the definition registered.
//
// An id already used is ErrExists, and tx must then be rolled back: the
// saga's row is written once, by one INSERT after its first steps ran (its
// local steps, the first command and its deadline), so their effects are
// in tx and must go with it. A local step that fails on the earlier saga's
// writes (a key of its own made of the saga's id) returns its error
// instead of ErrExists.
func (def *Definition[D]) StartTx(ctx context.Context, tx sqldb.Tx, o *Orchestrator, sagaID string, data D) error {
	raw, err := json.Marshal(&data)
	if err != nil {
		return fmt.Errorf("saga: encode the data of %q: %w", sagaID, err)
	}
	return o.startTx(ctx, tx, def.Name, def.version(), sagaID, raw)
}

// version is the definition's version, 1 when not set.
func (def *Definition[D]) version() int {
	if def.Version == 0 {
		return 1
	}
	return def.Version
}

// Start is one saga for StartManyTx to start: its id and data, and the
// message that caused it, if any, whose correlation id, causation id and
// trace parent its commands inherit (as StartTx's inherit ctx's cause,
// message.CauseFrom). Nil: ctx's cause.
type Start[D any] struct {
	ID    string
	Data  D
	Cause *message.Message
}

// StartManyTx starts several instances of the saga in tx, as StartTx starts
// each, but set-wise: their rows, their history, their first commands and
// the commands' deadlines are written by one statement each for the lot
// (on PostgreSQL), where StartTx writes them for one saga. Their local
// steps run in turn, in the order of starts. Use it where many sagas start
// at once: an application serving many requests together (see
// sqldb.Batcher).
//
// An id already used, or given twice, is ErrExists, and tx must then be
// rolled back, as with StartTx.
func (def *Definition[D]) StartManyTx(ctx context.Context, tx sqldb.Tx, o *Orchestrator, starts []Start[D]) error {
	ids := make([]string, len(starts))
	raws := make([][]byte, len(starts))
	causes := make([]*message.Message, len(starts))
	for i := range starts {
		raw, err := json.Marshal(&starts[i].Data)
		if err != nil {
			return fmt.Errorf("saga: encode the data of %q: %w", starts[i].ID, err)
		}
		ids[i], raws[i], causes[i] = starts[i].ID, raw, starts[i].Cause
	}
	return o.startManyTx(ctx, tx, def.Name, def.version(), ids, raws, causes)
}
