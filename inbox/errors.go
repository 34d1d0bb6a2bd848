package inbox

import "errors"

// ErrPermanent is matched (errors.Is) by every error made with Permanent.
var ErrPermanent = errors.New("inbox: permanent failure")

// PermanentError is a handler error that no retry can fix: the message goes
// to the dead-letter topic with Err's text as the reason.
type PermanentError struct {
	// Err is the handler's error.
	Err error
}

// Permanent marks err as permanent: a HandlerFunc returning it has its
// message dead-lettered at once instead of redelivered. Permanent(nil) is
// nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &PermanentError{Err: err}
}

// Error returns Err's text.
func (e *PermanentError) Error() string { return e.Err.Error() }

// Unwrap returns Err.
func (e *PermanentError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, ErrPermanent) hold.
func (e *PermanentError) Is(target error) bool { return target == ErrPermanent }
