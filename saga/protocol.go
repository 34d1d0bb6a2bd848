package saga

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/troupedev/troupe/message"
)

// The CloudEvents extension attributes that carry a saga's commands and
// replies. The names are part of the wire protocol: they never change.
const (
	// ExtSagaID names the saga instance (also the message's correlation id
	// and subject, so a saga's messages keep their order).
	ExtSagaID = "sagaid"
	// ExtStep names the step within the saga's definition.
	ExtStep = "sagastep"
	// ExtOp is "action" or "compensation".
	ExtOp = "sagaop"
	// ExtReplyTo is the topic a command's reply goes to.
	ExtReplyTo = "sagareplyto"
	// ExtOutcome is a reply's outcome: "success" or "failure".
	ExtOutcome = "sagaoutcome"
	// ExtReason is a failure reply's reason, for people.
	ExtReason = "sagareason"
)

// ReplyType is the CloudEvents type of every reply to a saga command.
const ReplyType = "dev.troupe.saga.reply"

// Op is the side of a step a command asks for.
type Op int

// The sides of a step. Their names are the wire values of ExtOp.
const (
	// Action is the step's forward action.
	Action Op = iota + 1
	// Compensation undoes a completed action.
	Compensation
)

// String returns "action" or "compensation".
func (o Op) String() string {
	switch o {
	case Action:
		return "action"
	case Compensation:
		return "compensation"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

func parseOp(s string) (Op, bool) {
	switch s {
	case "action":
		return Action, true
	case "compensation":
		return Compensation, true
	}
	return 0, false
}

// Outcome is a reply's verdict.
type Outcome int

// The outcomes. Their names are the wire values of ExtOutcome.
const (
	// Succeeded means the participant did what the command asked.
	Succeeded Outcome = iota + 1
	// Failed means the participant refused for a business reason (the
	// credit limit would be exceeded; the compensation came first): a
	// retry would get the same answer, so the saga compensates.
	Failed
)

// String returns "success" or "failure".
func (o Outcome) String() string {
	switch o {
	case Succeeded:
		return "success"
	case Failed:
		return "failure"
	}
	return fmt.Sprintf("Outcome(%d)", int(o))
}

// ErrNotACommand is matched by the error ParseCommand returns for a message
// that lacks, or has invalid, saga command attributes.
var ErrNotACommand = errors.New("saga: not a saga command")

// ErrNotAReply is matched by the error ParseReply returns for a message that
// is not a well-formed saga reply.
var ErrNotAReply = errors.New("saga: not a saga reply")

// Command is a saga's request to a participant: do (or undo) one step.
type Command struct {
	// Msg is the command message; its Type names what to do, its Data the
	// step's input.
	Msg *message.Message
	// SagaID names the saga instance.
	SagaID string
	// Step names the step.
	Step string
	// Op is the side asked for.
	Op Op
	// ReplyTo is the topic of the reply.
	ReplyTo string
}

// NewCommand returns the command message for one side of a step: type typ,
// data the JSON of input, from source, with the saga attributes set, the
// saga id as subject and correlation id, and a fresh id.
func NewCommand(source, typ, sagaID, step string, op Op, replyTo string, input any) (*message.Message, error) {
	m, err := message.NewJSON(source, typ, input)
	if err != nil {
		return nil, fmt.Errorf("saga: command %s %s of %q: %w", step, op, sagaID, err)
	}
	m.Subject, m.CorrelationID = sagaID, sagaID
	m.Extensions = map[string]string{ExtSagaID: sagaID, ExtStep: step, ExtOp: op.String(), ExtReplyTo: replyTo}
	if _, err := ParseCommand(m); err != nil {
		return nil, err
	}
	return m, nil
}

// ParseCommand reads the saga attributes of a command message.
func ParseCommand(m *message.Message) (*Command, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: nil message", ErrNotACommand)
	}
	c := &Command{Msg: m, SagaID: m.Extensions[ExtSagaID], Step: m.Extensions[ExtStep], ReplyTo: m.Extensions[ExtReplyTo]}
	var errs []error
	if c.SagaID == "" {
		errs = append(errs, fmt.Errorf("no %s attribute", ExtSagaID))
	}
	if c.Step == "" {
		errs = append(errs, fmt.Errorf("no %s attribute", ExtStep))
	}
	if c.ReplyTo == "" {
		errs = append(errs, fmt.Errorf("no %s attribute", ExtReplyTo))
	}
	op, ok := parseOp(m.Extensions[ExtOp])
	if !ok {
		errs = append(errs, fmt.Errorf("%s %q: want action or compensation", ExtOp, m.Extensions[ExtOp]))
	}
	c.Op = op
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: message %q of type %q: %w", ErrNotACommand, m.ID, m.Type, err)
	}
	return c, nil
}

// Reply is a participant's answer to a command.
type Reply struct {
	// Outcome is the verdict.
	Outcome Outcome
	// Reason explains a failure, for people (the saga's history shows it).
	Reason string
	// Data is the reply's payload, encoded as JSON (nil for none).
	Data any
}

// Success returns a successful reply carrying data (nil for none).
func Success(data any) Reply { return Reply{Outcome: Succeeded, Data: data} }

// Failure returns a business refusal with its reason: the saga will not
// retry the step, it compensates.
func Failure(reason string) Reply { return Reply{Outcome: Failed, Reason: reason} }

// replyMessage builds the reply message to cmd.
func replyMessage(source string, cmd *Command, r Reply) (*message.Message, error) {
	var data []byte
	if r.Data != nil {
		var err error
		if data, err = json.Marshal(r.Data); err != nil {
			return nil, fmt.Errorf("saga: encode the reply to %s %s of %q: %w", cmd.Step, cmd.Op, cmd.SagaID, err)
		}
	}
	m := message.New(source, ReplyType, data)
	if data != nil {
		m.DataContentType = "application/json"
	}
	m.Subject, m.CorrelationID = cmd.SagaID, cmd.SagaID
	m.Extensions = map[string]string{ExtSagaID: cmd.SagaID, ExtStep: cmd.Step, ExtOp: cmd.Op.String(), ExtOutcome: r.Outcome.String()}
	if r.Reason != "" {
		m.Extensions[ExtReason] = r.Reason
	}
	return m, nil
}

// ReplyMsg is a reply as the saga's owner reads it.
type ReplyMsg struct {
	// Msg is the reply message; Data holds the reply's payload.
	Msg *message.Message
	// SagaID, Step and Op say which command it answers.
	SagaID, Step string
	// Op is the side the command asked for.
	Op Op
	// Outcome is the verdict, Reason a failure's explanation.
	Outcome Outcome
	// Reason explains a failure.
	Reason string
}

// ParseReply reads a reply message.
func ParseReply(m *message.Message) (*ReplyMsg, error) {
	if m == nil || m.Type != ReplyType {
		typ := "<nil>"
		if m != nil {
			typ = m.Type
		}
		return nil, fmt.Errorf("%w: type %q, want %q", ErrNotAReply, typ, ReplyType)
	}
	r := &ReplyMsg{Msg: m, SagaID: m.Extensions[ExtSagaID], Step: m.Extensions[ExtStep], Reason: m.Extensions[ExtReason]}
	var errs []error
	if r.SagaID == "" || r.Step == "" {
		errs = append(errs, fmt.Errorf("no %s or %s attribute", ExtSagaID, ExtStep))
	}
	op, ok := parseOp(m.Extensions[ExtOp])
	if !ok {
		errs = append(errs, fmt.Errorf("%s %q: want action or compensation", ExtOp, m.Extensions[ExtOp]))
	}
	r.Op = op
	switch m.Extensions[ExtOutcome] {
	case "success":
		r.Outcome = Succeeded
	case "failure":
		r.Outcome = Failed
	default:
		errs = append(errs, fmt.Errorf("%s %q: want success or failure", ExtOutcome, m.Extensions[ExtOutcome]))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: message %q: %w", ErrNotAReply, m.ID, err)
	}
	return r, nil
}
