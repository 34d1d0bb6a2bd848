package timer

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"

	"github.com/troupedev/troupe/sqldb"
)

// HandlerFunc handles a fired timer in tx, the transaction that deletes the
// timer: its writes commit exactly when the timer is consumed, so a timer's
// effect happens once. An error rolls back the handler's writes and retries
// the timer after Config.Backoff, up to Config.MaxAttempts tries; an error
// wrapped with Permanent fails the timer at once. Either way the timer is
// then kept, marked failed with the error, for an operator (Failed,
// RetryTx). A panic counts as an error.
//
// A batch's handlers run without savepoints, so that the common case costs
// no subtransaction per timer; when one fails, the batch rolls back whole
// and runs again with a savepoint around each handler, recording the
// failure without calling the failing handler a second time. So a handler
// may run more than once for one firing, but its writes through tx commit
// once: keep its effects inside tx. Its ctx ends after half of
// Config.LeaseTTL: on PostgreSQL a transaction idle for LeaseTTL is ended
// by the server.
type HandlerFunc func(ctx context.Context, tx sqldb.Tx, f *Fired) error

// Handle registers h as the handler named name, the target of timers
// scheduled with ToHandler(name). A scheduler fires only the handler timers
// it has a handler for: a timer whose handler no running scheduler knows
// stays pending (it shows in Stats as overdue) until one does, so a
// rolling upgrade that adds a handler loses nothing. A running scheduler
// fires the timers already due for name at once. Registering a name again
// replaces its handler.
func (s *Scheduler) Handle(name string, h HandlerFunc) error {
	if name == "" || h == nil {
		return fmt.Errorf("%w: Handle needs a name and a function", ErrUnknownHandler)
	}
	s.mu.Lock()
	s.handlers[name] = h
	s.mu.Unlock()
	s.Notify() // its due timers were invisible to the loop's last look
	return nil
}

// handlerNames returns the registered names, sorted.
func (s *Scheduler) handlerNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.handlers))
	for n := range s.handlers {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (s *Scheduler) handler(name string) HandlerFunc {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handlers[name]
}

// call runs h, turning a panic into an error.
func (s *Scheduler) call(ctx context.Context, tx sqldb.Tx, h HandlerFunc, f *Fired) (err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.LeaseTTL/2)
	defer cancel()
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("timer: handler panicked; its writes are rolled back",
				"handler", f.Target, "id", f.ID, "attempt", f.Attempt, "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("handler panicked: %v", r)
		}
	}()
	return h(ctx, tx, f)
}

// ErrPermanent is matched by errors made with Permanent.
var ErrPermanent = errors.New("timer: permanent failure")

// PermanentError marks a handler's error as one that retrying cannot mend.
type PermanentError struct{ Err error }

// Permanent wraps err so that the timer whose handler returned it fails at
// once instead of being retried. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &PermanentError{Err: err}
}

// Error returns the wrapped error's text.
func (e *PermanentError) Error() string { return e.Err.Error() }

// Unwrap returns the wrapped error.
func (e *PermanentError) Unwrap() error { return e.Err }

// Is reports whether target is ErrPermanent.
func (e *PermanentError) Is(target error) bool { return target == ErrPermanent }
