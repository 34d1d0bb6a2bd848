package saga

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Reservations describes a try / confirm / cancel reservation of several
// resources, each held by a participant, that a saga makes in two phases;
// Steps turns it into the saga's steps. The customer's order is placed
// only when every resource is assigned to it, and nothing stays held for
// good:
//
//   - Phase 1, a parallel group of Try steps, asks every participant at
//     once to hold a resource for Expiry. Any refusal (sold out), or a
//     Try unanswered after its attempts, cancels every Try that may have
//     run, and the saga compensates: the order is not placed.
//   - Phase 2, a parallel group of Confirm steps, asks each participant to
//     assign the resource it holds. A Confirm unanswered (the participant
//     is down, or answers HTTP 503) is sent again, for as long as the
//     expiry leaves time (see below). A Confirm refused (the reservation
//     expired) or still unanswered then fails the saga: it cancels every
//     Confirm that may have run (Cancel un-assigns a confirmed resource),
//     then every Try, and the order is not placed.
//
// Each phase's step for a resource is compensated by a Cancel of its
// reservation, so a failed saga sends a reservation up to two Cancels
// (its Confirm's, then its Try's); a participant cancels once. A Cancel
// unanswered is sent (or called) again for DefaultCompensationTimeout, as
// any compensation (see Step.CompensationTimeout), before the saga parks
// for an operator; meanwhile, the participant's expiry still releases a
// resource held and not confirmed.
//
// # Expiry, deadlines and attempts
//
// A step's budget is how long the saga awaits it before counting it as
// failed: Deadline × MaxAttempts for a command over the broker (each
// attempt is resent when its Deadline passes), Deadline for an HTTP step
// (its calls are retried within it). A participant starts a reservation's
// expiry when it first handles its Try, which is no earlier than phase 1
// began; phase 2 begins when the last Try has answered, at most the
// slowest Try's budget later. So each resource's Confirm reaches a
// reservation that has not expired, on every attempt the saga makes,
// when
//
//	Expiry ≥ slowest Try's budget + this resource's Confirm budget + Margin
//
// and Steps checks it for every resource, with the Confirm budget at
// least the resource's own (its Deadline and MaxAttempts), naming the
// numbers that conflict in its error. Margin absorbs what the budgets do
// not count: deadlines fired late by the timer scheduler (up to its poll
// interval), an HTTP call still running when its deadline passes (up to
// the scheduler's HTTP timeout), and the participant's clock running at
// another rate than the orchestrator's.
//
// Within that, the Confirm is retried as long as the expiry allows: its
// Deadline is the resource's, and its attempts as many as fit in the time
// the expiry leaves after the slowest Try and the margin (over HTTP, its
// Deadline is that time, with as many calls per Deadline as the Try
// makes). So the saga gives up confirming only when the expiry, less the
// margin, leaves no time for another attempt.
//
// Safety does not rest on these numbers, only the chance to place the
// order does: a Confirm that reaches an expired reservation is refused,
// the participant releases the resource at the expiry if no Confirm came,
// and a Confirm the saga gave up on that lands anyway is undone by the
// Cancel the saga sends after it.
//
// # What participants receive
//
// Every command (and HTTP body) of a reservation carries a
// ReservationCommand as JSON: the reservation's name within the saga, the
// expiry as a duration, and the resource's Input. The expiry travels as a
// duration, not an instant, so that it does not depend on the
// orchestrator's and the participant's clocks agreeing: the participant
// counts it from when it first handles the Try. A Try handled again (a
// retry, a duplicate) finds the reservation already recorded and keeps
// its first expiry. The saga id and the reservation's name together name
// one reservation: the Try, the Confirm and their Cancels all carry them.
// Package reserve serves these commands with a Reserver
// (reserve.Reserver.HandleSaga).
type Reservations[D any] struct {
	// Name prefixes the steps' names: the groups are Name.try and
	// Name.confirm, and the steps of resource R are Name.try.R and
	// Name.confirm.R (with one resource, there are no groups: phase 1 is
	// Name.try.R, phase 2 Name.confirm.R). The reservation of R is named
	// Name.R in its commands. Required; it never changes while sagas run.
	Name string
	// Expiry is how long a participant holds a resource after it handles
	// its Try, unless a Confirm assigns it first. Required; see the type's
	// documentation for how long it must be.
	Expiry time.Duration
	// Margin is the part of Expiry kept free of the saga's deadlines (see
	// the type's documentation). Default: a tenth of Expiry.
	Margin time.Duration
	// Resources are the resources to reserve, each at its participant.
	// Required; their names are unique.
	Resources []Reserve[D]
}

// Reserve is one resource of Reservations, reserved at one participant
// reached over the broker (Topic, TryCommand and ConfirmCommand) or over
// HTTP (TryURL and ConfirmURL).
type Reserve[D any] struct {
	// Name names the resource within the Reservations (its steps and its
	// reservation). Required.
	Name string

	// Topic is the participant's command topic.
	Topic string
	// TryCommand is the command type of phase 1: its action is the Try,
	// its compensation the Cancel.
	TryCommand string
	// ConfirmCommand is the command type of phase 2: its action is the
	// Confirm, its compensation the Cancel.
	ConfirmCommand string

	// TryURL is where phase 1 is POSTed: the Try, and its Cancel (the
	// header Troupe-Saga-Op tells them apart).
	TryURL string
	// ConfirmURL is where phase 2 is POSTed: the Confirm, and its Cancel.
	ConfirmURL string

	// Input is what to reserve, made from the saga's data: the Input of
	// every command of the reservation (nil: none). For a participant
	// served by package reserve, a reserve.SagaRequest.
	Input func(data *D) any
	// OnReserved reads a successful Try's reply into the saga's data (nil:
	// the reply's data is ignored). It runs once per resource, one reply
	// at a time (see Step.OnReply).
	OnReserved func(data *D, reply *ReplyMsg) error

	// Deadline is the Try's deadline, as Step.Deadline, and each
	// Confirm attempt's over the broker. Default 30 s.
	Deadline time.Duration
	// MaxAttempts caps the Try's sends (or HTTP calls), as
	// Step.MaxAttempts. The Confirm gets at least as many, and more when
	// the expiry leaves time for them. Default 3.
	MaxAttempts int
}

// ReservationCommand is the data of every command (and the body of every
// HTTP call) of a reservation made by Reservations: its Try, Confirm and
// Cancels. Its JSON names are part of the protocol: they never change.
type ReservationCommand struct {
	// Reservation names the reservation within its saga: the
	// Reservations' Name, a dot, and the resource's Name. With the saga id
	// (Command.SagaID, or the header Troupe-Saga-Id), it names the
	// reservation at the participant.
	Reservation string `json:"reservation"`
	// ExpiryMS is Reservations.Expiry in milliseconds: how long to hold
	// the resource, counted from when the participant first handles the
	// Try.
	ExpiryMS int64 `json:"expiry_ms"`
	// Input is the resource's Input, as JSON (absent when nil).
	Input json.RawMessage `json:"input,omitempty"`
}

// Expiry returns ExpiryMS as a duration.
func (c ReservationCommand) Expiry() time.Duration {
	return time.Duration(c.ExpiryMS) * time.Millisecond
}

// reservationCommand is ReservationCommand as sent: Input is encoded with
// the rest.
type reservationCommand struct {
	Reservation string `json:"reservation"`
	ExpiryMS    int64  `json:"expiry_ms"`
	Input       any    `json:"input,omitempty"`
}

// reserveTiming is a resource's settings, defaults applied, and its
// Try's budget.
type reserveTiming struct {
	deadline time.Duration
	attempts int
	http     bool
	budget   time.Duration
}

// describe says how the budget is made, for errors.
func (tm reserveTiming) describe() string {
	if tm.http {
		return fmt.Sprintf("Deadline %v, over HTTP", tm.deadline)
	}
	return fmt.Sprintf("Deadline %v × MaxAttempts %d", tm.deadline, tm.attempts)
}

// Steps returns the saga's steps for the reservations: the group of Try
// steps, then the group of Confirm steps (or, for one resource, its Try
// step then its Confirm step), to put in a Definition's Steps. It checks
// the description first, and returns an error matching
// ErrInvalidDefinition that lists every problem, such as an Expiry too
// short for the deadlines and attempts, with the numbers that conflict.
func (rs Reservations[D]) Steps() ([]Step[D], error) {
	var errs []error
	if rs.Name == "" {
		errs = append(errs, errors.New("empty Name"))
	}
	margin := rs.Margin
	if margin == 0 {
		margin = rs.Expiry / 10
	}
	switch {
	case rs.Expiry <= 0:
		errs = append(errs, fmt.Errorf("want a positive Expiry, have %v", rs.Expiry))
	case rs.Margin < 0 || margin >= rs.Expiry:
		errs = append(errs, fmt.Errorf("want a Margin of at least 0 and less than Expiry %v, have %v", rs.Expiry, rs.Margin))
	}
	if len(rs.Resources) == 0 {
		errs = append(errs, errors.New("no Resources"))
	}
	timings := make([]reserveTiming, len(rs.Resources))
	seen := map[string]bool{}
	for i, r := range rs.Resources {
		tm, rerrs := checkReserve(r, i, seen)
		timings[i], errs = tm, append(errs, rerrs...)
	}
	if len(errs) == 0 {
		errs = checkExpiry(rs, margin, timings)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: reservations %q: %w", ErrInvalidDefinition, rs.Name, err)
	}

	slowest := slowestTry(rs.Resources, timings)
	window := rs.Expiry - margin - timings[slowest].budget
	expiryMS := int64((rs.Expiry + time.Millisecond - 1) / time.Millisecond)
	tries, confirms := make([]Step[D], len(rs.Resources)), make([]Step[D], len(rs.Resources))
	for i, r := range rs.Resources {
		tm, key := timings[i], rs.Name+"."+r.Name
		input := func(d *D) any {
			c := reservationCommand{Reservation: key, ExpiryMS: expiryMS}
			if r.Input != nil {
				c.Input = r.Input(d)
			}
			return c
		}
		tries[i] = Step[D]{Name: rs.Name + ".try." + r.Name, Topic: r.Topic, Command: r.TryCommand, URL: r.TryURL,
			Input: input, OnReply: r.OnReserved, Deadline: tm.deadline, MaxAttempts: tm.attempts}
		// As many Confirm attempts as the window holds: at least the Try's,
		// which checkExpiry made sure of.
		confirm := Step[D]{Name: rs.Name + ".confirm." + r.Name, Topic: r.Topic, Command: r.ConfirmCommand, URL: r.ConfirmURL,
			Input: input, Deadline: tm.deadline, MaxAttempts: int(window / tm.deadline)}
		if tm.http {
			confirm.Deadline, confirm.MaxAttempts = window, tm.attempts*int(window/tm.deadline)
		}
		confirms[i] = confirm
	}
	if len(rs.Resources) == 1 {
		return []Step[D]{tries[0], confirms[0]}, nil
	}
	return []Step[D]{
		{Name: rs.Name + ".try", Parallel: tries},
		{Name: rs.Name + ".confirm", Parallel: confirms},
	}, nil
}

// checkReserve checks resource i of a Reservations and returns its
// timing; seen holds the names taken.
func checkReserve[D any](r Reserve[D], i int, seen map[string]bool) (reserveTiming, []error) {
	var errs []error
	what := fmt.Sprintf("resource %q", r.Name)
	switch {
	case r.Name == "":
		what = fmt.Sprintf("resource %d", i)
		errs = append(errs, fmt.Errorf("%s has no Name", what))
	case seen[r.Name]:
		errs = append(errs, fmt.Errorf("%s appears twice", what))
	}
	seen[r.Name] = true
	command := r.Topic != "" || r.TryCommand != "" || r.ConfirmCommand != ""
	web := r.TryURL != "" || r.ConfirmURL != ""
	switch {
	case command && web:
		errs = append(errs, fmt.Errorf("%s is reached both over the broker and over HTTP: set Topic and commands, or URLs", what))
	case !command && !web:
		errs = append(errs, fmt.Errorf("%s has neither Topic, TryCommand and ConfirmCommand, nor TryURL and ConfirmURL", what))
	case command && (r.Topic == "" || r.TryCommand == "" || r.ConfirmCommand == ""):
		errs = append(errs, fmt.Errorf("%s needs Topic, TryCommand and ConfirmCommand", what))
	case command && r.TryCommand == r.ConfirmCommand:
		errs = append(errs, fmt.Errorf("%s has TryCommand and ConfirmCommand both %q: a participant tells the phases apart by them", what, r.TryCommand))
	case web && (r.TryURL == "" || r.ConfirmURL == ""):
		errs = append(errs, fmt.Errorf("%s needs both TryURL and ConfirmURL", what))
	case web && r.TryURL == r.ConfirmURL:
		errs = append(errs, fmt.Errorf("%s has TryURL and ConfirmURL both %q: a participant tells the phases apart by them", what, r.TryURL))
	case web:
		for _, u := range []string{r.TryURL, r.ConfirmURL} {
			if err := checkURL(u); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", what, err))
			}
		}
	}
	if r.Deadline < 0 || r.MaxAttempts < 0 {
		errs = append(errs, fmt.Errorf("%s: negative Deadline %v or MaxAttempts %d", what, r.Deadline, r.MaxAttempts))
	}
	tm := reserveTiming{deadline: r.Deadline, attempts: r.MaxAttempts, http: web}
	if tm.deadline == 0 {
		tm.deadline = DefaultDeadline
	}
	if tm.attempts == 0 {
		tm.attempts = DefaultMaxAttempts
	}
	tm.budget = tm.deadline
	if !tm.http {
		tm.budget *= time.Duration(tm.attempts)
	}
	return tm, errs
}

// slowestTry returns the index of the resource whose Try may take the
// longest.
func slowestTry[D any](rs []Reserve[D], timings []reserveTiming) int {
	slowest := 0
	for i := range rs {
		if timings[i].budget > timings[slowest].budget {
			slowest = i
		}
	}
	return slowest
}

// checkExpiry reports every resource whose Confirm, given at least its
// Try's budget, may still be awaited when the expiry, less the margin, has
// passed.
func checkExpiry[D any](rs Reservations[D], margin time.Duration, timings []reserveTiming) []error {
	slowest := slowestTry(rs.Resources, timings)
	phase1 := timings[slowest]
	var errs []error
	for i, r := range rs.Resources {
		tm := timings[i]
		if need := phase1.budget + tm.budget + margin; need > rs.Expiry {
			errs = append(errs, fmt.Errorf("resource %q: Expiry %v < %v (phase 1: the Try of %q, %s) + %v (the Confirm of %q, %s) + %v (Margin) = %v",
				r.Name, rs.Expiry, phase1.budget, rs.Resources[slowest].Name, phase1.describe(), tm.budget, r.Name, tm.describe(), margin, need))
		}
	}
	return errs
}
