package saga

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/troupedev/troupe/sqldb"
)

// branchStatus is where one branch of a parallel group stands. The values
// are stored.
type branchStatus string

const (
	// branchSent: the action was sent (Attempt times); its answer is awaited.
	branchSent branchStatus = "sent"
	// branchDone: the action succeeded.
	branchDone branchStatus = "done"
	// branchRefused: the action was refused; it did nothing to undo.
	branchRefused branchStatus = "refused"
	// branchDue: the branch is to be compensated: its action got no answer
	// in time (it may have run), or its compensation is to be sent again
	// (an operator's RetryTx, Attempt sends after the last).
	branchDue branchStatus = "due"
	// branchUndoing: the compensation was sent (Attempt times); its answer
	// is awaited.
	branchUndoing branchStatus = "undoing"
	// branchUndone: the compensation succeeded.
	branchUndone branchStatus = "undone"
)

// branchState is one branch's state, kept with the saga's row while its
// group is in progress. A branch with no state has not started: its group
// compensated before it did.
type branchState struct {
	Status branchStatus `json:"status"`
	// Attempt counts the sends of the side in flight (sent, undoing), or of
	// the last compensation (due).
	Attempt int `json:"attempt,omitempty"`
}

// encodeBranches returns the column value of a group's branch states: a
// JSON object by branch name, or "" when the current step is no group in
// progress.
func encodeBranches(bs map[string]*branchState) (string, error) {
	if bs == nil {
		return "", nil
	}
	b, err := json.Marshal(bs)
	if err != nil {
		return "", fmt.Errorf("encode the branches' state: %w", err)
	}
	return string(b), nil
}

func decodeBranches(s string) (map[string]*branchState, error) {
	if s == "" {
		return nil, nil
	}
	bs := map[string]*branchState{}
	if err := json.Unmarshal([]byte(s), &bs); err != nil {
		return nil, fmt.Errorf("decode the branches' state %q: %w", s, err)
	}
	return bs, nil
}

// fork enters group g, the current step: its local branches run first, in
// this transaction; if one refuses, no command is sent and the group
// compensates the local branches that ran. Otherwise every other branch's
// action is sent, each with its own deadline and attempts, in this
// transaction too.
func (o *Orchestrator) fork(ctx context.Context, tx sqldb.Tx, in *instance, g step) error {
	in.branches = map[string]*branchState{}
	for _, b := range g.branches {
		if !b.isLocal() {
			continue
		}
		data, refusedErr, err := o.runLocal(ctx, tx, in, b.local, false)
		if err != nil {
			return err
		}
		if refusedErr != nil {
			o.record(in, b.name, Action.String(), 1, "refused", refusedErr.Error())
			in.branches[b.name] = &branchState{Status: branchRefused}
			in.status, in.reason = Compensating, refusedErr.Error()
			return nil
		}
		in.data = data
		o.record(in, b.name, Action.String(), 1, "done", "")
		in.branches[b.name] = &branchState{Status: branchDone}
	}
	for _, b := range g.branches {
		if b.isLocal() {
			continue
		}
		if err := o.sendMember(ctx, tx, in, b, true, Action, 1, 1); err != nil {
			return err
		}
		in.branches[b.name] = &branchState{Status: branchSent, Attempt: 1}
	}
	return nil
}

// joined reports whether every branch of g succeeded.
func joined(g step, bs map[string]*branchState) bool {
	return !slices.ContainsFunc(g.branches, func(b step) bool {
		s := bs[b.name]
		return s == nil || s.Status != branchDone
	})
}

// undoGroup compensates group g, the current step, and reports whether
// every branch is settled (undone, or refused or never started: nothing to
// undo). Every branch that may have run is compensated at once, in
// parallel: those done, those whose action got no answer in time, and
// those still in flight. An action in flight is not awaited: its
// participant's barrier makes the compensation a no-op if the action has
// not run there yet, and refuses the action when it arrives; if it ran
// first, the compensation undoes it. Either way the saga never waits for
// the slowest branch to undo the others. Local branches are undone in this
// transaction; one that fails parks the saga (settled false).
func (o *Orchestrator) undoGroup(ctx context.Context, tx sqldb.Tx, in *instance, g step) (settled bool, err error) {
	if in.branches == nil {
		// Turned around by a later step: every branch had succeeded.
		in.branches = map[string]*branchState{}
		for _, b := range g.branches {
			in.branches[b.name] = &branchState{Status: branchDone}
		}
	}
	for _, b := range g.branches {
		bs := in.branches[b.name]
		if bs == nil {
			continue
		}
		if bs.Status == branchSent {
			if err := o.cancelDeadline(ctx, tx, in, branchDeadlineID(in.id, in.step, b.name, Action, bs.Attempt)); err != nil {
				return false, err
			}
			if b.isHTTP() {
				if _, err := o.sched.TryCancelTx(ctx, tx, httpTaskID(in.id, b.name, Action)); err != nil {
					return false, err
				}
			}
			o.record(in, b.name, Action.String(), bs.Attempt, "abandoned", "compensated without awaiting the answer")
			bs.Status, bs.Attempt = branchDue, 0
		}
		if bs.Status != branchDone && bs.Status != branchDue {
			continue
		}
		if b.isLocal() {
			ok, err := o.undoLocal(ctx, tx, in, b)
			if err != nil || !ok {
				return false, err
			}
			bs.Status = branchUndone
			continue
		}
		// The first send of the branch's compensation, or the first
		// after an operator's RetryTx: its waits start anew.
		if err := o.sendMember(ctx, tx, in, b, true, Compensation, bs.Attempt+1, bs.Attempt+1); err != nil {
			return false, err
		}
		bs.Status, bs.Attempt = branchUndoing, bs.Attempt+1
	}
	for _, bs := range in.branches {
		if bs.Status != branchUndone && bs.Status != branchRefused {
			return false, nil
		}
	}
	return true, nil
}
