package inbox

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"

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
type HandlerFunc func(ctx context.Context, tx sqldb.Tx, m *message.Message) error

// Handler returns a broker.Handler that handles each delivered message at
// most once for consumer (use the subscription's consumer group name), by
// calling h.
//
// Each batch the broker delivers runs in one database transaction:
//
//  1. One INSERT ... ON CONFLICT DO NOTHING RETURNING claims the inbox rows
//     (consumer, message id, source) of the whole batch. A message whose row
//     was there already is a duplicate: it is acknowledged and h is not
//     called.
//  2. Each claimed message runs under a savepoint of its own: h(ctx, tx, m),
//     then RELEASE SAVEPOINT and a new SAVEPOINT in one round trip. On error
//     or panic, ROLLBACK TO SAVEPOINT undoes h's writes, the message's inbox
//     row is deleted, and the rest of the batch goes on. (A batch with a
//     single message to handle needs no savepoint: on failure the whole
//     transaction rolls back instead.)
//  3. After the last message, COMMIT. Then the handled messages and the
//     duplicates are acknowledged, those that failed with a transient error
//     are Nak'ed with Config.Backoff's delay for their attempt (or
//     dead-lettered once they reach Config.MaxAttempts), and those that
//     failed with a Permanent error are dead-lettered with the error as
//     the reason.
//
// If the transaction cannot commit (the database is down, a deferred
// constraint fails) or becomes unusable, nothing of the batch is written and
// every message of it is Nak'ed with its backoff delay.
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
		ib.handleBatch(ctx, consumer, h, batch)
	}
}

// outcome is what became of one message of a batch inside the transaction.
type outcome int

const (
	handled outcome = iota + 1
	duplicate
	failed    // transient: retry
	poisonous // permanent: dead-letter
)

func (ib *Inbox) handleBatch(ctx context.Context, consumer string, h HandlerFunc, batch []*broker.Delivery) {
	outcomes := make([]outcome, len(batch))
	errs := make([]error, len(batch))
	txErr := ib.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		for i, d := range batch {
			if d.Msg == nil || d.Msg.ID == "" {
				outcomes[i], errs[i] = poisonous, errors.New("inbox: message has no id")
			}
		}
		claimed, err := ib.claimBatch(ctx, tx, consumer, batch, outcomes)
		if err != nil {
			return err
		}
		// A batch with one message to handle (the common case at low load)
		// needs no savepoint: if its handler fails, the whole transaction
		// rolls back, which loses nothing else.
		solo, soloFailed := len(claimed) == 1, false
		inSavepoint := false
		for i, d := range batch {
			if outcomes[i] != 0 {
				continue
			}
			k := msgKey{d.Msg.ID, d.Msg.Source}
			if !claimed[k] {
				outcomes[i] = duplicate
				continue
			}
			delete(claimed, k) // a second copy in this batch is a duplicate
			if err := ctx.Err(); err != nil {
				return err // stopping: the whole batch comes back later
			}
			if solo {
				herr := ib.call(message.WithCause(ctx, d.Msg), tx, consumer, h, d)
				if herr == nil {
					outcomes[i] = handled
					continue
				}
				// Roll back at the end; the batch's other messages are
				// duplicates still to be marked as such.
				outcomes[i], errs[i] = ib.classify(consumer, d, herr)
				soloFailed = true
				continue
			}
			if !inSavepoint {
				if _, err := tx.Exec(ctx, "SAVEPOINT troupe_inbox"); err != nil {
					return fmt.Errorf("inbox: savepoint: %w", err)
				}
				inSavepoint = true
			}
			herr := ib.call(message.WithCause(ctx, d.Msg), tx, consumer, h, d)
			if herr == nil {
				// Keep this message's writes, and mark the start of the next
				// one's, in one round trip.
				_, err := tx.Exec(ctx, "RELEASE SAVEPOINT troupe_inbox; SAVEPOINT troupe_inbox")
				if err == nil {
					outcomes[i] = handled
					continue
				}
				// On PostgreSQL: a statement of the handler failed, and the
				// handler returned nil all the same.
				herr = fmt.Errorf("inbox: the transaction failed after the handler returned: %w", err)
			}
			if err := ib.undo(ctx, tx, consumer, d.Msg); err != nil {
				return fmt.Errorf("inbox: undo message %q after %v: %w", d.Msg.ID, herr, err)
			}
			outcomes[i], errs[i] = ib.classify(consumer, d, herr)
		}
		if soloFailed {
			return errSoloFailed
		}
		return nil
	})
	if txErr != nil && !errors.Is(txErr, errSoloFailed) {
		ib.cfg.Logger.Error("inbox: batch not committed; every message of it will be redelivered",
			"consumer", consumer, "messages", len(batch), "err", txErr)
		for _, d := range batch {
			d.Nak(ib.cfg.Backoff(d.Attempt))
		}
		return
	}
	if ib.cfg.AfterCommit != nil && slices.Contains(outcomes, handled) {
		ib.cfg.AfterCommit()
	}
	for i, d := range batch {
		switch outcomes[i] {
		case handled, duplicate:
			d.Ack()
		case poisonous:
			d.DeadLetter(errs[i].Error())
		case failed:
			if ib.cfg.MaxAttempts > 0 && d.Attempt >= ib.cfg.MaxAttempts {
				d.DeadLetter(fmt.Sprintf("%v (attempt %d of %d)", errs[i], d.Attempt, ib.cfg.MaxAttempts))
				continue
			}
			d.Nak(ib.cfg.Backoff(d.Attempt))
		}
	}
}

// errSoloFailed rolls back the transaction of a batch whose only message to
// handle failed; its outcome is set, and the batch is settled as usual.
var errSoloFailed = errors.New("inbox: the batch's only message failed")

// classify returns the outcome of a message whose handler failed with herr,
// and logs it.
func (ib *Inbox) classify(consumer string, d *broker.Delivery, herr error) (outcome, error) {
	if errors.Is(herr, ErrPermanent) || errors.Is(herr, message.ErrMalformed) {
		ib.cfg.Logger.Warn("inbox: handler failed permanently; dead-lettering the message",
			"consumer", consumer, "id", d.Msg.ID, "attempt", d.Attempt, "err", herr)
		return poisonous, herr
	}
	ib.cfg.Logger.Warn("inbox: handler failed; the message will be redelivered",
		"consumer", consumer, "id", d.Msg.ID, "attempt", d.Attempt, "err", herr)
	return failed, herr
}

// msgKey identifies a message, as CloudEvents does.
type msgKey struct{ id, source string }

// claimRows is the most inbox rows one INSERT claims, well below SQLite's
// limit on parameters.
const claimRows = 500

// claimBatch inserts the inbox rows of the batch's messages whose outcome is
// not decided yet, in a few statements, and returns the keys it inserted:
// the others are duplicates. Rows go in in key order, so two transactions
// claiming overlapping batches on PostgreSQL wait for each other instead of
// deadlocking.
func (ib *Inbox) claimBatch(ctx context.Context, tx sqldb.Tx, consumer string, batch []*broker.Delivery, outcomes []outcome) (map[msgKey]bool, error) {
	keys := make([]msgKey, 0, len(batch))
	seen := make(map[msgKey]bool, len(batch))
	for i, d := range batch {
		if outcomes[i] != 0 {
			continue
		}
		if k := (msgKey{d.Msg.ID, d.Msg.Source}); !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b msgKey) int {
		return cmp.Or(strings.Compare(a.id, b.id), strings.Compare(a.source, b.source))
	})
	claimed := make(map[msgKey]bool, len(keys))
	now := ib.cfg.Now().UTC()
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), claimRows)]
		keys = keys[len(chunk):]
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
