package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/sqldb"
)

// Defaults of Step fields.
const (
	DefaultDeadline    = 30 * time.Second
	DefaultMaxAttempts = 3
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
// either local (Local set: it runs in the orchestrator's own database, in
// the transition's transaction) or a command (Topic and Command set: it is
// sent to a Participant over the broker and its reply awaited).
type Step[D any] struct {
	// Name identifies the step within its saga. Required.
	Name string

	// Local runs a local step. Return Refuse(err) for a business refusal:
	// its writes are undone and the saga compensates; any other error
	// rolls the transition back, to be retried.
	Local func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D) error
	// UndoLocal compensates a completed local step (nil: nothing to undo).
	UndoLocal func(ctx context.Context, tx sqldb.Tx, sagaID string, data *D) error

	// Topic is the participant's command topic.
	Topic string
	// Command is the command type; the participant handles its action and
	// its compensation (Participant.Handle).
	Command string
	// Input is the command's data, made from the saga's (nil: none).
	Input func(data *D) any
	// OnReply reads a successful action's reply into the saga's data (nil:
	// the reply's data is ignored).
	OnReply func(data *D, reply *ReplyMsg) error
	// Deadline is how long to await a reply before sending the command
	// again. Default 30 s.
	Deadline time.Duration
	// MaxAttempts caps the sends of a command. When the last one gets no
	// reply by its deadline, an action counts as failed (the saga
	// compensates) and a compensation parks the saga for an operator.
	// Default 3.
	MaxAttempts int
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
	name        string
	local       func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error)
	undoLocal   func(ctx context.Context, tx sqldb.Tx, id string, data []byte) ([]byte, error)
	topic       string
	command     string
	input       func(data []byte) (any, error)
	onReply     func(data []byte, r *ReplyMsg) ([]byte, error)
	deadline    time.Duration
	maxAttempts int
}

func (s step) isLocal() bool { return s.local != nil }

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
		if s.Name == "" {
			errs = append(errs, fmt.Errorf("step %d has no Name", i))
		}
		if seen[s.Name] {
			errs = append(errs, fmt.Errorf("step %q appears twice", s.Name))
		}
		seen[s.Name] = true
		local, command := s.Local != nil, s.Topic != "" || s.Command != ""
		switch {
		case local && command:
			errs = append(errs, fmt.Errorf("step %q is both local and a command", s.Name))
		case !local && !command:
			errs = append(errs, fmt.Errorf("step %q has neither Local nor Topic and Command", s.Name))
		case command && (s.Topic == "" || s.Command == ""):
			errs = append(errs, fmt.Errorf("step %q needs both Topic and Command", s.Name))
		case local && (s.Input != nil || s.OnReply != nil):
			errs = append(errs, fmt.Errorf("step %q is local: Input and OnReply apply to commands", s.Name))
		}
		if s.Deadline < 0 || s.MaxAttempts < 0 {
			errs = append(errs, fmt.Errorf("step %q: negative Deadline or MaxAttempts", s.Name))
		}
		st := step{name: s.Name, topic: s.Topic, command: s.Command, deadline: s.Deadline, maxAttempts: s.MaxAttempts}
		if st.deadline == 0 {
			st.deadline = DefaultDeadline
		}
		if st.maxAttempts == 0 {
			st.maxAttempts = DefaultMaxAttempts
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

// StartTx starts an instance of the saga, with id and data, in tx: the
// instance and its first step's command (or its local steps' writes) commit
// with tx. The orchestrator must have the definition registered.
func (def *Definition[D]) StartTx(ctx context.Context, tx sqldb.Tx, o *Orchestrator, sagaID string, data D) error {
	raw, err := json.Marshal(&data)
	if err != nil {
		return fmt.Errorf("saga: encode the data of %q: %w", sagaID, err)
	}
	v := def.Version
	if v == 0 {
		v = 1
	}
	return o.startTx(ctx, tx, def.Name, v, sagaID, raw)
}
