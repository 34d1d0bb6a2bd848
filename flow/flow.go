package flow

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

//go:embed migrations
var migrationFS embed.FS

// Component is the name under which the flow tables' migrations are
// recorded.
const Component = "flow"

// Migrate creates or updates the flow tables (troupe_flows and
// troupe_flow_events) in db.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("flow: %w", err)
	}
	return db.Migrate(ctx, Component, migs)
}

// Status is where a flow stands. Its values are stored, except Stalled,
// which is derived when a flow is read.
type Status string

// The statuses of a flow.
const (
	// Running: the flow has started and no message has ended it yet.
	Running Status = "running"
	// Completed: a message of one of the definition's Completes types was
	// recorded first among its ending messages.
	Completed Status = "completed"
	// Failed: a message of one of the definition's Fails types was
	// recorded first among its ending messages.
	Failed Status = "failed"
	// Stalled: the flow is running, and its earliest message is older than
	// its definition's Deadline by the tracker's clock. Never stored: Get
	// and List derive it when they read.
	Stalled Status = "stalled"
)

// Role is the part a message type plays in its definition. It is stored
// with each recorded message.
type Role string

// The roles of a message type.
const (
	// RoleStart: a Starts type.
	RoleStart Role = "start"
	// RoleStep: a Steps type, in the middle of the flow.
	RoleStep Role = "step"
	// RoleComplete: a Completes type.
	RoleComplete Role = "complete"
	// RoleFail: a Fails type.
	RoleFail Role = "fail"
	// RoleOther: a type no definition declares, recorded because its
	// correlation id was that of a known flow.
	RoleOther Role = ""
)

// ExtReason is the extension attribute that carries why a flow failed, read
// from a Fails message by the default Definition.Reason.
const ExtReason = "reason"

// Errors callers test with errors.Is.
var (
	// ErrUnknownFlow is returned by Get and History for a correlation id
	// with no flow recorded.
	ErrUnknownFlow = errors.New("flow: no such flow")
	// ErrInvalidDefinition is returned by Define for a definition it
	// refuses; the error lists every problem.
	ErrInvalidDefinition = errors.New("flow: invalid definition")
	// ErrInvalidMessage is returned by RecordTx for a nil message or one
	// without an id or a source.
	ErrInvalidMessage = errors.New("flow: invalid message")
	// ErrInvalidFilter is returned by List for a filter it cannot apply.
	ErrInvalidFilter = errors.New("flow: invalid filter")
)

// Definition describes one kind of choreographed business transaction by
// the message types its services publish. A message type belongs to at
// most one definition, so every declared message tells which kind of flow
// it is part of.
type Definition struct {
	// Name is the flow kind's stable name, such as "shop.create-order".
	// Required.
	Name string
	// Starts are the message types that start a flow of this kind, such as
	// "shop.order.created". At least one is required. A Starts message
	// without a correlation id starts the flow under its own id, as
	// message.Message.CausedBy gives the messages it causes.
	Starts []string
	// Steps are the types published in the middle of the flow, such as
	// "shop.credit.reserved". Optional, but declare them: a message of an
	// undeclared type is recorded only if its flow is already known when
	// it arrives, so one that overtakes every declared message of its flow
	// is ignored; a declared one is always recorded.
	Steps []string
	// Completes are the types that end the flow successfully, such as
	// "shop.order.approved".
	Completes []string
	// Fails are the types that end it as failed or compensated, such as
	// "shop.order.rejected". Completes and Fails together need at least
	// one type.
	Fails []string
	// Deadline is how long after its earliest message a flow may run
	// before Get and List report it Stalled. Default 0: never stalled.
	Deadline time.Duration
	// Reason returns why a Fails message failed its flow. Default: the
	// message's ExtReason ("reason") extension attribute, or else the
	// string member "reason" of its data when the data is a JSON object.
	// Reasons longer than 1 KiB are cut.
	Reason func(m *message.Message) string
}

// validate reports every problem of d, given the types others declare.
func (d *Definition) validate(taken map[string]string, names map[string]bool) error {
	var errs []error
	if d.Name == "" {
		errs = append(errs, errors.New("empty Name"))
	} else if names[d.Name] {
		errs = append(errs, fmt.Errorf("a definition named %q is defined already", d.Name))
	}
	if len(d.Starts) == 0 {
		errs = append(errs, errors.New("no Starts type"))
	}
	if len(d.Completes)+len(d.Fails) == 0 {
		errs = append(errs, errors.New("no Completes or Fails type: nothing would end a flow"))
	}
	if d.Deadline < 0 {
		errs = append(errs, fmt.Errorf("negative Deadline %v", d.Deadline))
	}
	seen := map[string]string{}
	for _, list := range []struct {
		field string
		types []string
	}{{"Starts", d.Starts}, {"Steps", d.Steps}, {"Completes", d.Completes}, {"Fails", d.Fails}} {
		for _, typ := range list.types {
			switch {
			case typ == "":
				errs = append(errs, fmt.Errorf("an empty type in %s", list.field))
			case seen[typ] != "":
				errs = append(errs, fmt.Errorf("type %q is in %s and in %s: a type has one role", typ, seen[typ], list.field))
			case taken[typ] != "":
				errs = append(errs, fmt.Errorf("type %q belongs to definition %q already: a type belongs to one definition", typ, taken[typ]))
			default:
				seen[typ] = list.field
			}
		}
	}
	return errors.Join(errs...)
}

// Flow is one choreographed business transaction: every recorded message
// with one correlation id.
type Flow struct {
	// ID is the flow's correlation id.
	ID string
	// Name is its definition's name: that of the first declared message
	// recorded for it.
	Name string
	// Status is where it stands; Stalled is derived at read time.
	Status Status
	// Reason says why it failed: the Definition.Reason of the Fails
	// message that ended it. A terminal message recorded after the one
	// that ended the flow, with the other outcome, adds a note such as
	// "also failed by shop.order.rejected: out of stock" or "also
	// completed by shop.order.approved" (separated by "; "), and leaves
	// Status as it is.
	Reason string
	// StartedAt is the time of its earliest message (normally its start),
	// by the message's Time.
	StartedAt time.Time
	// UpdatedAt is when a message of it was last recorded, by the
	// recording tracker's clock.
	UpdatedAt time.Time
	// EndedAt is the time of the message that ended it; zero while it runs.
	EndedAt time.Time
	// Events is how many distinct messages were recorded for it.
	Events int
	// Services are the distinct sources of its messages, in the order of
	// their first message's time.
	Services []string
}

// Event is one recorded message of a flow.
type Event struct {
	// MessageID, Source, Type, Subject and CausationID are the message's.
	MessageID, Source, Type, Subject, CausationID string
	// Role is the part its type plays in the flow's definition (RoleOther
	// for an undeclared type).
	Role Role
	// Contradicts is set on a Completes or Fails message recorded after
	// the flow had ended with the other outcome: it is kept in the history
	// but does not change the flow's status.
	Contradicts bool
	// Time is the message's time (its recording time if it had none).
	Time time.Time
	// RecordedAt is when the tracker recorded it, by the tracker's clock.
	RecordedAt time.Time
}

// Filter selects flows for List. The zero Filter lists up to 100 flows of
// every name and status.
type Filter struct {
	// Name keeps flows of this definition. Default: every name.
	Name string
	// Status keeps flows with this status; Running excludes the stalled
	// ones, and Stalled lists running flows past their deadline. Default:
	// every status.
	Status Status
	// Limit is the most flows returned. Default 100; at most 1000.
	Limit int
}

func (f Filter) validate() error {
	var errs []error
	if !slices.Contains([]Status{"", Running, Completed, Failed, Stalled}, f.Status) {
		errs = append(errs, fmt.Errorf("unknown status %q", f.Status))
	}
	if f.Limit < 0 || f.Limit > maxListLimit {
		errs = append(errs, fmt.Errorf("Limit %d is outside 0..%d", f.Limit, maxListLimit))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidFilter, err)
	}
	return nil
}

const (
	defaultListLimit = 100
	maxListLimit     = 1000
)

// Stats counts what a tracker's Handler did with the deliveries it was
// given, since the tracker was created. Messages recorded with RecordTx
// are not counted (their transaction may still roll back).
type Stats struct {
	// Recorded counts messages recorded as events of a flow.
	Recorded uint64
	// Duplicates counts deliveries of messages already recorded.
	Duplicates uint64
	// Ignored counts messages acknowledged without being recorded: without
	// a correlation id (and not a Starts type), or of a type no definition
	// declares with the correlation id of no known flow.
	Ignored uint64
	// DeadLettered counts malformed deliveries: no message, or one without
	// an id or a source.
	DeadLettered uint64
}
