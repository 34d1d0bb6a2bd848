package inbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// HandlerFunc applies one message's effect through tx, the transaction in
// which the inbox records the message as handled. ctx carries m as the
// message being handled (message.CauseFrom), so messages the handler adds
// to an outbox in tx inherit its correlation id, causation id and trace
// parent.
//
// Returning nil commits the effect with the inbox row. Returning an error
// undoes everything the handler did through tx and has the message
// redelivered after a backoff; wrap the error with Permanent to send the
// message to the dead-letter topic instead. A panic counts as a transient
// error. The handler must not commit or roll back tx, and must not use tx
// after returning.
//
// A handler that succeeded may be called again for the same delivery, in a
// new transaction, when another message of its batch failed and the first
// transaction rolled back (see Inbox.Handler): its writes through tx take
// effect once, but effects outside tx must tolerate a repeat, as they must
// for a redelivery.
type HandlerFunc func(ctx context.Context, tx sqldb.Tx, m *message.Message) error

// Handler returns a broker.Handler that handles each delivered message at
// most once for consumer (use the subscription's consumer group name), by
// calling h.
//
// Each batch the broker delivers is handled in one database transaction
// when its handlers succeed, which is the common case:
//
//  1. One INSERT ... ON CONFLICT DO NOTHING RETURNING claims the inbox rows
//     (consumer, message id, source) of the whole batch. A message whose row
//     was there already is a duplicate: it is acknowledged and h is not
//     called. So is a second copy of a message within the batch; the first
//     copy decides the message's fate.
//  2. h(ctx, tx, m) runs for each claimed message in turn, all in the
//     batch's transaction, with nothing between them: the batch costs its
//     handlers' statements, the claim and one commit.
//  3. COMMIT, then every message of the batch is acknowledged.
//
// When a handler fails (returns an error or panics), the transaction rolls
// back whole and the batch runs again in a new transaction, in which each
// message runs under a SAVEPOINT of its own (RELEASE SAVEPOINT and the next
// SAVEPOINT travel in one round trip). There, a handler that fails has its
// writes rolled back to its savepoint and its inbox row deleted, and the
// rest of the batch goes on. The message whose handler failed in the first
// run is not run again: it keeps that run's error. (Except when the error
// is PostgreSQL's SQLSTATE 25P02, "current transaction is aborted": it
// blames an earlier handler that went on after one of its statements
// failed, so the message runs again.) A batch with a single message to
// handle needs no second run: its rollback loses nothing else.
//
// After the commit, handled messages and duplicates are acknowledged,
// those that failed with a transient error are Nak'ed with Config.Backoff's
// delay for their attempt (or dead-lettered once they reach
// Config.MaxAttempts), and those that failed with a Permanent error are
// dead-lettered with the error as the reason.
//
// A handler therefore runs once per delivery when it fails, and may run a
// second time when it succeeded but another handler of its batch failed.
// Its writes through tx are applied once: the first run's were rolled
// back. Effects outside tx (a call to another service, a log line) may
// happen twice, as they may on any redelivery.
//
// If the transaction applies but cannot commit (a deferred constraint
// fails; on PostgreSQL, a handler returned nil after one of its statements
// failed, which aborts the transaction), each message still to handle runs
// again alone, in a transaction of its own, so that one message that
// cannot commit does not take the others down with it: its commit's error
// counts as a transient failure of that message. If the database cannot be
// reached, or ctx ends, nothing of the batch is written and every message
// of it is Nak'ed with its backoff delay.
//
// Handler panics if consumer is empty or h is nil.
func (ib *Inbox) Handler(consumer string, h HandlerFunc) broker.Handler {
	if consumer == "" {
		panic("inbox: Handler needs a consumer name")
	}
	if h == nil {
		panic("inbox: Handler needs a HandlerFunc")
	}
	return func(ctx context.Context, batch []*broker.Delivery) {
		ib.handleBatch(ctx, consumer, handlers{one: h}, batch)
	}
}

// BatchHandlerFunc applies the effects of several messages through tx, the
// transaction in which the inbox records them as handled, set-wise: a
// statement for the lot where a HandlerFunc would run one per message. Each
// message's effect must be the one h (the HandlerFunc given with it to
// BatchHandler) would apply, and in the same order. It must not commit or
// roll back tx, nor use tx after returning.
//
// ctx carries no message as the cause (message.CauseFrom): messages it adds
// to an outbox should inherit their cause's correlation id, causation id
// and trace parent through message.InheritCause with a context made by
// message.WithCause for the message that caused them.
type BatchHandlerFunc func(ctx context.Context, tx sqldb.Tx, msgs []*message.Message) error

// BatchHandler is Handler, but the messages of a batch are handled
// together by hb in the first try: after the claim (step 1 of Handler),
// hb(ctx, tx, claimed) runs once with the claimed messages in batch order
// (when there are at least two; one runs through h). If hb fails or
// panics, the transaction rolls back whole and the batch runs again as
// Handler runs it after a failure: each message under a savepoint of its
// own, through h, so that the messages that fail are told apart from the
// others. If the transaction cannot commit, each message runs alone through
// h. So hb handles the common case in fewer statements, and h decides the
// outcome of each message when something goes wrong.
//
// BatchHandler panics if consumer is empty or hb or h is nil.
func (ib *Inbox) BatchHandler(consumer string, hb BatchHandlerFunc, h HandlerFunc) broker.Handler {
	if consumer == "" {
		panic("inbox: BatchHandler needs a consumer name")
	}
	if hb == nil || h == nil {
		panic("inbox: BatchHandler needs a BatchHandlerFunc and a HandlerFunc")
	}
	return func(ctx context.Context, batch []*broker.Delivery) {
		ib.handleBatch(ctx, consumer, handlers{one: h, batch: hb}, batch)
	}
}

// handlers are a subscription's handlers: one per message, and optionally
// one for a whole batch (see BatchHandler).
type handlers struct {
	one   HandlerFunc
	batch BatchHandlerFunc
}

// outcome is what became of one message of a batch.
type outcome int

const (
	handled outcome = iota + 1
	duplicate
	failed       // transient: retry, or dead-letter at MaxAttempts
	poisonous    // permanent: dead-letter
	notCommitted // the batch could not be written: retry
)

// result is the outcome of one delivery of a batch, with the handler's
// error for failed and poisonous.
type result struct {
	outcome outcome
	err     error
}

func (ib *Inbox) handleBatch(ctx context.Context, consumer string, h handlers, batch []*broker.Delivery) {
	// Decided before any transaction: messages without an id, and second
	// copies of a message.
	pre := make([]result, len(batch))
	first := make(map[msgKey]bool, len(batch))
	for i, d := range batch {
		if d.Msg == nil || d.Msg.ID == "" {
			pre[i] = result{poisonous, errors.New("inbox: message has no id")}
			continue
		}
		if k := keyOf(d); first[k] {
			pre[i].outcome = duplicate
		} else {
			first[k] = true
		}
	}
	res := ib.hold(ctx, consumer, h, batch, ib.handle(ctx, consumer, h, batch, pre))
	if ib.cfg.AfterCommit != nil && slices.ContainsFunc(res, func(r result) bool { return r.outcome == handled }) {
		ib.cfg.AfterCommit()
	}
	for i, d := range batch {
		switch r := res[i]; r.outcome {
		case handled, duplicate:
			d.Ack()
		case poisonous:
			d.DeadLetter(r.err.Error())
		case failed:
			if ib.cfg.MaxAttempts > 0 && d.Attempt >= ib.cfg.MaxAttempts {
				d.DeadLetter(fmt.Sprintf("%v (attempt %d of %d)", r.err, d.Attempt, ib.cfg.MaxAttempts))
				continue
			}
			d.Nak(ib.cfg.Backoff(d.Attempt))
		default:
			d.Nak(ib.cfg.Backoff(d.Attempt))
		}
	}
}

// hold tries again, for up to OutageHold, the messages of res that were
// not committed because the database could not be reached, and returns
// the results once none is left so or the hold is over (ctx ended, or
// OutageHold passed).
func (ib *Inbox) hold(ctx context.Context, consumer string, h handlers, batch []*broker.Delivery, res []result) []result {
	undone := func(r result) bool { return r.outcome == notCommitted }
	if ib.cfg.OutageHold <= 0 || !slices.ContainsFunc(res, undone) {
		return res
	}
	until := time.Now().Add(ib.cfg.OutageHold)
	for n := 1; slices.ContainsFunc(res, undone); n++ {
		wait := min(ib.cfg.Backoff(n), time.Until(until))
		if wait <= 0 {
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return res
		case <-t.C:
		}
		again := slices.Clone(res)
		for i := range again {
			if undone(again[i]) {
				again[i] = result{}
			}
		}
		res = ib.handle(ctx, consumer, h, batch, again)
	}
	return res
}

// handle runs the batch's messages that pre leaves undecided, and returns
// every delivery's result: the first run without savepoints, the second
// with them if a handler failed, and one transaction per message if the
// batch's transaction cannot commit.
func (ib *Inbox) handle(ctx context.Context, consumer string, h handlers, batch []*broker.Delivery, pre []result) []result {
	res, err := ib.run(ctx, consumer, h, batch, pre, false)
	if hf := (*handlerFailure)(nil); errors.As(err, &hf) {
		pre = slices.Clone(pre)
		if hf.i < 0 {
			ib.cfg.Logger.Info("inbox: the batch handler failed; running the batch again message by message with savepoints",
				"consumer", consumer, "messages", len(batch), "err", hf.err)
		} else if abortedBefore(hf.err) {
			ib.cfg.Logger.Info("inbox: a handler found the transaction aborted by an earlier one; running the batch again with savepoints",
				"consumer", consumer, "id", batch[hf.i].Msg.ID, "err", hf.err)
		} else {
			pre[hf.i] = ib.classify(consumer, batch[hf.i], hf.err)
		}
		res, err = ib.run(ctx, consumer, h, batch, pre, true)
	}
	if cf := (*commitFailure)(nil); errors.As(err, &cf) && ctx.Err() == nil {
		return ib.isolate(ctx, consumer, h, batch, pre, cf.err)
	}
	if err != nil {
		ib.cfg.Logger.Error("inbox: batch not committed; its messages will be redelivered",
			"consumer", consumer, "messages", len(batch), "err", err)
		return undecidedNotCommitted(pre)
	}
	return res
}

// isolate handles, each in a transaction of its own, the messages still to
// handle of a batch whose transaction applied but could not commit (with
// cause). A message that cannot commit alone fails with its commit's error.
// Once a transaction fails otherwise (the database is unreachable, ctx has
// ended), the remaining messages are not tried: they are not committed.
func (ib *Inbox) isolate(ctx context.Context, consumer string, h handlers, batch []*broker.Delivery, pre []result, cause error) []result {
	ib.cfg.Logger.Warn("inbox: batch applied but not committed; handling its messages one per transaction",
		"consumer", consumer, "messages", len(batch), "err", cause)
	res := slices.Clone(pre)
	for i, d := range batch {
		if res[i].outcome != 0 {
			continue
		}
		one, err := ib.run(ctx, consumer, h, batch[i:i+1], pre[i:i+1], false)
		if cf := (*commitFailure)(nil); errors.As(err, &cf) && ctx.Err() == nil {
			res[i] = ib.classify(consumer, d, cf.err)
			continue
		}
		if err != nil {
			ib.cfg.Logger.Error("inbox: the batch's remaining messages not committed; they will be redelivered",
				"consumer", consumer, "id", d.Msg.ID, "err", err)
			return undecidedNotCommitted(res)
		}
		res[i] = one[0]
	}
	return res
}

// undecidedNotCommitted returns res with every undecided result set to
// notCommitted.
func undecidedNotCommitted(res []result) []result {
	out := slices.Clone(res)
	for i := range out {
		if out[i].outcome == 0 {
			out[i].outcome = notCommitted
		}
	}
	return out
}

// handlerFailure ends a run without savepoints: the handler of the batch's
// i-th message failed with err, and the transaction rolled back. i is -1
// when the batch handler failed: no message is to blame yet.
type handlerFailure struct {
	i   int
	err error
}

func (e *handlerFailure) Error() string { return "handler failed: " + e.err.Error() }

// commitFailure ends a run whose handlers all ran, yet whose transaction did
// not commit.
type commitFailure struct{ err error }

func (e *commitFailure) Error() string { return e.err.Error() }
func (e *commitFailure) Unwrap() error { return e.err }

// errAloneFailed rolls back the transaction of a run whose only message to
// handle failed; the run's results are final, as nothing else was written.
var errAloneFailed = errors.New("inbox: the batch's only message to handle failed")

// run handles, in one transaction, the messages of batch whose result pre
// leaves undecided, and returns every delivery's result once it commits.
// Without savepoints, the first handler that fails ends the transaction with
// a *handlerFailure, unless it is the only message to handle: its failure
// is then its result. With savepoints, each message with others to handle
// runs under a savepoint and a failure undoes that message alone. A
// transaction whose handlers all ran but that did not commit ends with a
// *commitFailure; any other error means nothing was applied.
func (ib *Inbox) run(ctx context.Context, consumer string, hs handlers, batch []*broker.Delivery, pre []result, savepoints bool) ([]result, error) {
	h := hs.one
	var res []result
	applied := false
	err := ib.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		res = slices.Clone(pre)
		claimed, err := ib.claimBatch(ctx, tx, consumer, batch, res)
		if err != nil {
			return err
		}
		alone := len(claimed) == 1
		if hs.batch != nil && !savepoints && len(claimed) > 1 {
			return ib.runBatch(ctx, tx, consumer, hs.batch, batch, res, claimed)
		}
		inSavepoint, aloneFailed := false, false
		for i, d := range batch {
			if res[i].outcome != 0 {
				continue
			}
			if !claimed[keyOf(d)] {
				res[i].outcome = duplicate
				continue
			}
			if err := ctx.Err(); err != nil {
				return err // stopping: the whole batch comes back later
			}
			mctx := message.WithCause(ctx, d.Msg)
			if alone || !savepoints {
				herr := ib.call(mctx, tx, consumer, h, d)
				switch {
				case herr == nil:
					res[i].outcome = handled
				case alone:
					// Roll back at the end: the batch's other messages are
					// still to be marked as duplicates.
					res[i], aloneFailed = ib.classify(consumer, d, herr), true
				default:
					return &handlerFailure{i: i, err: herr}
				}
				continue
			}
			if !inSavepoint {
				if _, err := tx.Exec(ctx, "SAVEPOINT troupe_inbox"); err != nil {
					return fmt.Errorf("inbox: savepoint: %w", err)
				}
				inSavepoint = true
			}
			herr := ib.call(mctx, tx, consumer, h, d)
			if herr == nil {
				// Keep this message's writes, and mark the start of the next
				// one's, in one round trip.
				_, err := tx.Exec(ctx, "RELEASE SAVEPOINT troupe_inbox; SAVEPOINT troupe_inbox")
				if err == nil {
					res[i].outcome = handled
					continue
				}
				// On PostgreSQL: a statement of the handler failed, and the
				// handler returned nil all the same.
				herr = fmt.Errorf("inbox: the transaction failed after the handler returned: %w", err)
			}
			if err := ib.undo(ctx, tx, consumer, d.Msg); err != nil {
				return fmt.Errorf("inbox: undo message %q after %v: %w", d.Msg.ID, herr, err)
			}
			res[i] = ib.classify(consumer, d, herr)
		}
		if aloneFailed {
			return errAloneFailed
		}
		applied = true
		return nil
	})
	switch {
	case err == nil || errors.Is(err, errAloneFailed):
		return res, nil
	case applied:
		return nil, &commitFailure{err: err}
	default:
		return nil, err
	}
}

// runBatch hands the batch's claimed messages to hb, and sets their results
// and the duplicates' in res. A failure of hb is a *handlerFailure with i
// -1.
func (ib *Inbox) runBatch(ctx context.Context, tx sqldb.Tx, consumer string, hb BatchHandlerFunc, batch []*broker.Delivery, res []result, claimed map[msgKey]bool) error {
	msgs := make([]*message.Message, 0, len(claimed))
	var ran []int
	for i, d := range batch {
		if res[i].outcome != 0 {
			continue
		}
		if !claimed[keyOf(d)] {
			res[i].outcome = duplicate
			continue
		}
		msgs = append(msgs, d.Msg)
		ran = append(ran, i)
	}
	if err := ctx.Err(); err != nil {
		return err // stopping: the whole batch comes back later
	}
	if err := ib.callBatch(ctx, tx, consumer, hb, msgs); err != nil {
		return &handlerFailure{i: -1, err: err}
	}
	for _, i := range ran {
		res[i].outcome = handled
	}
	return nil
}

// callBatch runs hb, turning a panic into an error.
func (ib *Inbox) callBatch(ctx context.Context, tx sqldb.Tx, consumer string, hb BatchHandlerFunc, msgs []*message.Message) (err error) {
	defer func() {
		if r := recover(); r != nil {
			ib.cfg.Logger.Error("inbox: batch handler panicked; its writes are rolled back and the batch runs again message by message",
				"consumer", consumer, "messages", len(msgs), "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("inbox: batch handler panicked: %v", r)
		}
	}()
	return hb(ctx, tx, msgs)
}

// abortedBefore reports whether a handler's error may be another
// message's fault: PostgreSQL's refusal to run statements in a transaction
// that an earlier statement's failure aborted (SQLSTATE 25P02,
// in_failed_sql_transaction), or the failure of a write queued by
// sqldb.ExecLater, which the handler's statement only sent (the queue may
// hold an earlier handler's writes). The run with savepoints, which sends
// each handler's queued writes before the next handler starts, tells.
func abortedBefore(err error) bool {
	var coded interface{ SQLState() string }
	var later *sqldb.LaterError
	return errors.As(err, &later) || errors.As(err, &coded) && coded.SQLState() == "25P02"
}

// classify returns the result of a message whose handler failed with herr,
// and logs it.
func (ib *Inbox) classify(consumer string, d *broker.Delivery, herr error) result {
	if errors.Is(herr, ErrPermanent) || errors.Is(herr, message.ErrMalformed) {
		ib.cfg.Logger.Warn("inbox: handler failed permanently; dead-lettering the message",
			"consumer", consumer, "id", d.Msg.ID, "attempt", d.Attempt, "err", herr)
		return result{poisonous, herr}
	}
	ib.cfg.Logger.Warn("inbox: handler failed; the message will be redelivered",
		"consumer", consumer, "id", d.Msg.ID, "attempt", d.Attempt, "err", herr)
	return result{failed, herr}
}

// msgKey identifies a message, as CloudEvents does.
type msgKey struct{ id, source string }

func keyOf(d *broker.Delivery) msgKey { return msgKey{d.Msg.ID, d.Msg.Source} }

// claimRows is the most inbox rows one INSERT claims, well below SQLite's
// limit on parameters.
const claimRows = 500

// claimBatch inserts the inbox rows of the batch's messages whose result is
// not decided yet, in a few statements, and returns the keys it inserted:
// the others are duplicates. Rows go in in key order, so two transactions
// claiming overlapping batches on PostgreSQL wait for each other instead of
// deadlocking.
func (ib *Inbox) claimBatch(ctx context.Context, tx sqldb.Tx, consumer string, batch []*broker.Delivery, res []result) (map[msgKey]bool, error) {
	keys := make([]msgKey, 0, len(batch))
	seen := make(map[msgKey]bool, len(batch))
	for i, d := range batch {
		if res[i].outcome != 0 {
			continue
		}
		if k := keyOf(d); !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b msgKey) int {
		return cmp.Or(strings.Compare(a.id, b.id), strings.Compare(a.source, b.source))
	})
	claimed := make(map[msgKey]bool, len(keys))
	now := ib.cfg.Now().UTC()
	for lo, hi := range sqldb.Chunks(tx.Dialect(), len(keys), claimRows) {
		chunk := keys[lo:hi]
		var q strings.Builder
		q.WriteString("INSERT INTO troupe_inbox (consumer, message_id, source, handled_at) VALUES ")
		args := make([]any, 0, 2+2*len(chunk))
		args = append(args, consumer, now)
		for i, k := range chunk {
			if i > 0 {
				q.WriteString(", ")
			}
			fmt.Fprintf(&q, "($1, $%d, $%d, $2)", len(args)+1, len(args)+2)
			args = append(args, k.id, k.source)
		}
		q.WriteString(" ON CONFLICT DO NOTHING RETURNING message_id, source")
		rows, err := tx.Query(ctx, q.String(), args...)
		if err != nil {
			return nil, fmt.Errorf("inbox: claim %d messages for consumer %q: %w", len(chunk), consumer, err)
		}
		for rows.Next() {
			var k msgKey
			if err := rows.Scan(&k.id, &k.source); err != nil {
				rows.Close()
				return nil, fmt.Errorf("inbox: claim messages: %w", err)
			}
			claimed[k] = true
		}
		if err := rows.Close(); err != nil {
			return nil, fmt.Errorf("inbox: claim %d messages for consumer %q: %w", len(chunk), consumer, err)
		}
	}
	return claimed, nil
}

// undo rolls back what the handler of m wrote since the savepoint, and
// removes m's inbox row, claimed before it. The savepoint is then set again
// after the removal, so that the next message's rollback keeps it removed.
func (ib *Inbox) undo(ctx context.Context, tx sqldb.Tx, consumer string, m *message.Message) error {
	if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT troupe_inbox"); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "DELETE FROM troupe_inbox WHERE consumer = $1 AND message_id = $2 AND source = $3",
		consumer, m.ID, m.Source); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, "RELEASE SAVEPOINT troupe_inbox; SAVEPOINT troupe_inbox")
	return err
}

// call runs h, turning a panic into an error.
func (ib *Inbox) call(ctx context.Context, tx sqldb.Tx, consumer string, h HandlerFunc, d *broker.Delivery) (err error) {
	defer func() {
		if r := recover(); r != nil {
			ib.cfg.Logger.Error("inbox: handler panicked; its writes are rolled back and the message will be redelivered",
				"consumer", consumer, "id", d.Msg.ID, "attempt", d.Attempt, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("inbox: handler panicked: %v", r)
		}
	}()
	return h(ctx, tx, d.Msg)
}
