package saga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// HTTPHandler returns the HTTP endpoint of the step that commands of type
// commandType ask for (registered with Handle): the orchestrator of a saga
// whose step has this endpoint's URL POSTs both sides to it (see the
// package documentation for the protocol). db is the participant's
// database, the one its inbox is on; it needs the saga tables too
// (Migrate), where the answers to actions are kept.
//
// Each request runs in one transaction of db: the barrier (inbox.BarrierTx)
// for the saga, step and side the headers name, the step's function, and
// the answer, which is kept with the barrier's row. So a repeated call (a
// retry after a lost response, a call made again by an orchestrator that
// restarted) has no second effect and gets the first answer again, data
// included; a compensation that overtakes its action succeeds without
// doing anything, and the late action is refused. The barrier and the kept
// answer do over HTTP what the inbox does for messages: no inbox row is
// written, and no reply goes to the outbox, since the response is the
// reply.
//
// It answers 200 with the reply's data as JSON for a success, 409 with the
// reason as text for a refusal, 400 for a request that is not a saga call
// or an error wrapped with inbox.Permanent (the orchestrator takes both as
// refusals), 405 for a method other than POST, and 503 for any other
// error, which rolls everything back and has the orchestrator call again.
func (p *Participant) HTTPHandler(db *sqldb.DB, commandType string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.serveHTTP(w, r, db, commandType)
	})
}

// maxHTTPCommand caps the body of a command over HTTP.
const maxHTTPCommand = message.DefaultMaxSize

func (p *Participant) serveHTTP(w http.ResponseWriter, r *http.Request, db *sqldb.DB, commandType string) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "saga steps are called with POST", http.StatusMethodNotAllowed)
		return
	}
	cmd, err := httpCommand(r, commandType)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	st, ok := p.step(commandType)
	if !ok {
		http.Error(w, fmt.Sprintf("no step handles commands of type %q", commandType), http.StatusNotFound)
		return
	}
	var reply Reply
	// Concurrent calls share commits on SQLite (group commit).
	err = db.InGroupTx(message.WithCause(r.Context(), cmd.Msg), func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		reply, err = p.answerTx(ctx, tx, cmd, st)
		return err
	})
	switch {
	case errors.Is(err, inbox.ErrPermanent):
		http.Error(w, err.Error(), http.StatusBadRequest)
	case err != nil:
		http.Error(w, "transient: "+err.Error(), http.StatusServiceUnavailable)
	case reply.Outcome == Failed:
		http.Error(w, reply.Reason, http.StatusConflict)
	default:
		var body []byte
		if reply.Data != nil {
			if body, err = json.Marshal(reply.Data); err != nil {
				http.Error(w, fmt.Sprintf("encode the reply: %v", err), http.StatusInternalServerError)
				return
			}
			w.Header().Set("Content-Type", "application/json")
		}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(body)
	}
}

// httpCommand reads a saga call into a Command (with no ReplyTo: the
// response is the reply).
func httpCommand(r *http.Request, commandType string) (*Command, error) {
	sagaID, stepName := r.Header.Get(HeaderSagaID), r.Header.Get(HeaderStep)
	op, ok := parseOp(r.Header.Get(HeaderOp))
	var errs []error
	if sagaID == "" || stepName == "" {
		errs = append(errs, fmt.Errorf("no %s or %s header", HeaderSagaID, HeaderStep))
	}
	if !ok {
		errs = append(errs, fmt.Errorf("%s %q: want action or compensation", HeaderOp, r.Header.Get(HeaderOp)))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxHTTPCommand+1))
	if err != nil {
		errs = append(errs, fmt.Errorf("read the body: %w", err))
	} else if len(body) > maxHTTPCommand {
		errs = append(errs, fmt.Errorf("body over %d bytes", maxHTTPCommand))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotACommand, err)
	}
	source := r.Header.Get(HeaderSource)
	if source == "" {
		source = "/troupe/http"
	}
	m := message.New(source, commandType, body)
	if key := r.Header.Get(timer.IdempotencyKeyHeader); key != "" {
		m.ID = key
	}
	m.DataContentType = r.Header.Get("Content-Type")
	m.Subject, m.CorrelationID = sagaID, sagaID
	m.Extensions = map[string]string{ExtSagaID: sagaID, ExtStep: stepName, ExtOp: op.String()}
	return &Command{Msg: m, SagaID: sagaID, Step: stepName, Op: op}, nil
}

// answerTx runs an HTTP command in tx and returns its answer: the first
// answer for a repeated action.
func (p *Participant) answerTx(ctx context.Context, tx sqldb.Tx, cmd *Command, st participantStep) (Reply, error) {
	outcome, reply, err := p.run(ctx, tx, cmd, st)
	if err != nil || cmd.Op != Action {
		return reply, err
	}
	switch outcome {
	case inbox.BarrierApplied:
		return reply, keepAnswer(ctx, tx, cmd, reply)
	case inbox.BarrierDuplicate:
		return keptAnswer(ctx, tx, cmd)
	}
	return reply, nil
}

// keepAnswer stores the answer to an action, to give a repeated call.
func keepAnswer(ctx context.Context, tx sqldb.Tx, cmd *Command, r Reply) error {
	var data []byte
	if r.Data != nil {
		var err error
		if data, err = json.Marshal(r.Data); err != nil {
			return fmt.Errorf("saga: encode the reply to %s of %q: %w", cmd.Step, cmd.SagaID, err)
		}
	}
	_, err := tx.Exec(ctx, `INSERT INTO troupe_saga_replies (saga_id, step, outcome, reason, data, created_at) VALUES ($1, $2, $3, $4, $5, $6)`,
		cmd.SagaID, cmd.Step, r.Outcome.String(), r.Reason, data, cmd.Msg.Time.UTC())
	if err != nil {
		return fmt.Errorf("saga: keep the answer to %s of %q: %w", cmd.Step, cmd.SagaID, err)
	}
	return nil
}

// keptAnswer reads the answer to an action done before.
func keptAnswer(ctx context.Context, tx sqldb.Tx, cmd *Command) (Reply, error) {
	var outcome, reason string
	var data []byte
	err := tx.QueryRow(ctx, `SELECT outcome, reason, data FROM troupe_saga_replies WHERE saga_id = $1 AND step = $2`, cmd.SagaID, cmd.Step).
		Scan(&outcome, &reason, &data)
	if errors.Is(err, sqldb.ErrNoRows) {
		// Done before, yet not over HTTP: its reply went to the broker.
		return Failure(fmt.Sprintf("step %q of saga %q was handled before over the broker: its reply is there", cmd.Step, cmd.SagaID)), nil
	}
	if err != nil {
		return Reply{}, fmt.Errorf("saga: read the answer to %s of %q: %w", cmd.Step, cmd.SagaID, err)
	}
	if outcome != Succeeded.String() {
		return Failure(reason), nil
	}
	if data == nil {
		return Success(nil), nil
	}
	return Success(json.RawMessage(data)), nil
}
