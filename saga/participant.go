package saga

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// StepFunc runs one side of a step in the participant's transaction and
// returns its reply: Success(data), or Failure(reason) for a business
// refusal. Either commits: the refusal is recorded as the step's answer, so
// a repeated command gets no different one. An error instead rolls
// everything back and has the command redelivered after a backoff (wrap it
// with inbox.Permanent to dead-letter the command).
type StepFunc func(ctx context.Context, tx sqldb.Tx, cmd *Command) (Reply, error)

// A Participant handles saga commands in a service that owns resources a
// saga uses (credit, stock, seats). For each command it runs, in one
// transaction of the participant's database:
//
//   - the inbox claim of the message (a redelivered copy does nothing);
//   - the barrier for (saga, step, side) (inbox.BarrierTx): a repeated
//     action or compensation (a new command for a step already done, as a
//     saga's retry after a deadline sends) has no second effect; a
//     compensation that arrives before its action succeeds without running
//     (null compensation), and the late action is then refused;
//   - the step's function, with the participant's own writes;
//   - the reply, added to the participant's outbox for the command's reply
//     topic.
//
// A repeated action gets no reply of its own: the reply to the first, with
// its data, is already in the outbox, and the outbox delivers it. A
// repeated compensation is answered success again. A refused action makes
// its step's compensation a no-op (nothing was reserved), and a refused
// compensation runs again when retried (inbox.BarrierRefusedTx). Register
// the steps with Handle, then subscribe Handler to the command topic.
type Participant struct {
	ib     *inbox.Inbox
	source string

	mu    sync.Mutex
	steps map[string]participantStep
}

type participantStep struct {
	action, compensation StepFunc
}

// NewParticipant returns a participant that records its handling in ib and
// replies as source (the participant service's CloudEvents source, e.g.
// "/services/customer"). The database of ib needs the inbox's and the
// outbox's tables (inbox.Migrate, outbox.Migrate).
func NewParticipant(ib *inbox.Inbox, source string) (*Participant, error) {
	if ib == nil || source == "" {
		return nil, errors.New("saga: NewParticipant needs an inbox and a source")
	}
	return &Participant{ib: ib, source: source, steps: map[string]participantStep{}}, nil
}

// Handle registers the two sides of the step that commands of type
// commandType ask for. compensation may be nil for a step with nothing to
// undo (its compensation commands then succeed at once).
func (p *Participant) Handle(commandType string, action, compensation StepFunc) error {
	if commandType == "" || action == nil {
		return errors.New("saga: Participant.Handle needs a command type and an action")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.steps[commandType] = participantStep{action: action, compensation: compensation}
	return nil
}

// Handler returns the broker handler for the participant's command topic;
// consumer names the subscription's group, as for inbox.Handler. A message
// that is not a saga command, or whose type no step handles, is
// dead-lettered with the reason.
func (p *Participant) Handler(consumer string) broker.Handler {
	return p.ib.BatchHandler(consumer, p.HandleBatchTx, p.HandleTx)
}

// HandleBatchTx handles commands in tx as HandleTx handles each in turn,
// but set-wise where it can: one statement claims the barrier rows of their
// actions (inbox.BarrierActionsTx), and one outbox.Add per reply topic
// sends their replies. The steps run in turn, in the order of msgs. A
// command whose action's row was there already, and a compensation, go
// through the barrier as in HandleTx. It fails, and the inbox then handles
// the commands one by one with HandleTx (see inbox.BatchHandler), on a
// malformed command, one no step handles, or a step's error.
func (p *Participant) HandleBatchTx(ctx context.Context, tx sqldb.Tx, msgs []*message.Message) error {
	cmds := make([]*Command, len(msgs))
	steps := make([]participantStep, len(msgs))
	compensated := map[inbox.BarrierStep]bool{} // steps with a compensation in the batch
	for i, m := range msgs {
		cmd, err := ParseCommand(m)
		if err != nil {
			return err
		}
		st, ok := p.step(m.Type)
		if !ok {
			return fmt.Errorf("saga: no step handles commands of type %q", m.Type)
		}
		cmds[i], steps[i] = cmd, st
		if cmd.Op == Compensation {
			compensated[inbox.BarrierStep{SagaID: cmd.SagaID, Step: cmd.Step}] = true
		}
	}
	// The actions are claimed up front, except those of a step whose
	// compensation is in the batch too: they go through the barrier in
	// the batch's order, so that a compensation that comes first still
	// makes its late action refused.
	var claims []inbox.BarrierStep
	var claimOf []int // the command of each claim
	for i, cmd := range cmds {
		k := inbox.BarrierStep{SagaID: cmd.SagaID, Step: cmd.Step}
		if cmd.Op == Action && !compensated[k] {
			claims = append(claims, k)
			claimOf = append(claimOf, i)
		}
	}
	applied, err := p.ib.BarrierActionsTx(ctx, tx, claims)
	if err != nil {
		return err
	}
	claimed := make([]bool, len(msgs))
	for j, i := range claimOf {
		claimed[i] = applied[j]
	}
	var topics []string
	replies := map[string][]*message.Message{}
	for i, cmd := range cmds {
		mctx := message.WithCause(ctx, msgs[i])
		var outcome inbox.BarrierOutcome
		var reply Reply
		if claimed[i] {
			outcome = inbox.BarrierApplied
			if reply, err = p.applied(mctx, tx, cmd, steps[i].action, inbox.BarrierAction); err != nil {
				return err
			}
		} else if outcome, reply, err = p.run(mctx, tx, cmd, steps[i]); err != nil {
			return err
		}
		if outcome == inbox.BarrierDuplicate && cmd.Op == Action {
			continue // the first time's reply is in the outbox already
		}
		rm, err := replyMessage(p.source, cmd, reply)
		if err != nil {
			return err
		}
		message.InheritCause(mctx, rm)
		if _, ok := replies[cmd.ReplyTo]; !ok {
			topics = append(topics, cmd.ReplyTo)
		}
		replies[cmd.ReplyTo] = append(replies[cmd.ReplyTo], rm)
	}
	for _, topic := range topics {
		if err := outbox.Add(ctx, tx, topic, replies[topic]...); err != nil {
			return err
		}
	}
	return nil
}

// HandleTx handles one command in tx, the transaction in which the caller
// has recorded the message in its inbox (inbox.Handler does; a caller with
// its own consumption loop calls inbox.ClaimTx first). Handler uses it.
func (p *Participant) HandleTx(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	cmd, err := ParseCommand(m)
	if err != nil {
		return inbox.Permanent(err)
	}
	st, ok := p.step(m.Type)
	if !ok {
		return inbox.Permanent(fmt.Errorf("saga: no step handles commands of type %q", m.Type))
	}
	outcome, reply, err := p.run(ctx, tx, cmd, st)
	if err != nil {
		return err
	}
	if outcome == inbox.BarrierDuplicate && cmd.Op == Action {
		return nil // the first time's reply, with its data, is in the outbox already
	}
	rm, err := replyMessage(p.source, cmd, reply)
	if err != nil {
		return err
	}
	return outbox.Add(ctx, tx, cmd.ReplyTo, rm)
}

func (p *Participant) step(commandType string) (participantStep, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st, ok := p.steps[commandType]
	return st, ok
}

// applied runs fn, cmd's side op of its step, whose barrier row is claimed,
// and returns its reply; a refusal is recorded in the barrier.
func (p *Participant) applied(ctx context.Context, tx sqldb.Tx, cmd *Command, fn StepFunc, op inbox.BarrierOp) (Reply, error) {
	if fn == nil {
		return Success(nil), nil
	}
	reply, err := fn(ctx, tx, cmd)
	if err != nil {
		return Reply{}, err
	}
	if reply.Outcome != Succeeded && reply.Outcome != Failed {
		return Reply{}, fmt.Errorf("saga: step %q returned a reply without an outcome (use Success or Failure)", cmd.Step)
	}
	if reply.Outcome == Failed {
		if err := p.ib.BarrierRefusedTx(ctx, tx, cmd.SagaID, cmd.Step, op); err != nil {
			return Reply{}, err
		}
	}
	return reply, nil
}

// run runs cmd's side of st behind the barrier, in tx, and returns the
// barrier's outcome and the reply, except for a duplicate action, whose
// reply is the first one's.
func (p *Participant) run(ctx context.Context, tx sqldb.Tx, cmd *Command, st participantStep) (inbox.BarrierOutcome, Reply, error) {
	fn, op := st.action, inbox.BarrierAction
	if cmd.Op == Compensation {
		fn, op = st.compensation, inbox.BarrierCompensation
	}
	var reply Reply
	outcome, err := p.ib.BarrierTx(ctx, tx, cmd.SagaID, cmd.Step, op, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		reply, err = p.applied(ctx, tx, cmd, fn, op)
		return err
	})
	if err != nil {
		return 0, Reply{}, err
	}
	switch outcome {
	case inbox.BarrierDuplicate:
		// A compensation's barrier row stands for one done, a null one, or
		// one a refused action made needless: success. Say it again: the
		// saga may have ignored the first answer while it was parked, and
		// an operator retries.
		reply = Success(nil)
	case inbox.BarrierNullCompensation:
		reply = Success(nil)
	case inbox.BarrierRefused:
		reply = Failure("refused: the step was compensated before this action arrived")
	}
	return outcome, reply, nil
}
