package message

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrMalformed matches every error that decoding returns for bad input:
	// errors.Is(err, ErrMalformed) holds for each [*DecodeError].
	ErrMalformed = errors.New("malformed message")
	// ErrTooLarge is wrapped by the [*DecodeError] returned for input larger
	// than the decoder's limit (see [MaxSize]).
	ErrTooLarge = errors.New("message too large")
	// ErrInvalid matches every [*FieldError]: a message that breaks a
	// CloudEvents rule and so cannot be encoded.
	ErrInvalid = errors.New("invalid message")
)

// DecodeError reports input that cannot be decoded into a valid [Message].
// It names the first offending attribute; decoding stops there.
type DecodeError struct {
	// Field is the attribute (or header, or JSON member) at fault, such as
	// "id" or "time". Empty when the input as a whole is at fault, for
	// example when it is too large or not a JSON object, and when a JSON
	// member's own name cannot be read (it is not valid UTF-8).
	Field string
	// Reason says what is wrong, in words.
	Reason string
	// Err is the underlying error, if any: [ErrTooLarge], a JSON syntax
	// error, a time parse error.
	Err error
}

// Error returns, for example, `decode message: field "id": is required`.
func (e *DecodeError) Error() string {
	var b strings.Builder
	b.WriteString("decode message")
	if e.Field != "" {
		fmt.Fprintf(&b, ": field %q", e.Field)
	}
	if e.Reason != "" {
		b.WriteString(": ")
		b.WriteString(e.Reason)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns the underlying error.
func (e *DecodeError) Unwrap() error { return e.Err }

// Is reports whether target is [ErrMalformed], which every DecodeError is.
func (e *DecodeError) Is(target error) bool { return target == ErrMalformed }

// FieldError reports one attribute of a message that breaks a CloudEvents
// rule. [Message.Validate] returns one per problem, joined.
type FieldError struct {
	// Field is the attribute at fault, such as "source", or the extension's
	// name as given.
	Field string
	// Reason says what is wrong.
	Reason string
}

// Error returns, for example, `message field "source": is required`.
func (e *FieldError) Error() string {
	if e.Field == "" {
		return "invalid message: " + e.Reason
	}
	return fmt.Sprintf("message field %q: %s", e.Field, e.Reason)
}

// Is reports whether target is [ErrInvalid], which every FieldError is.
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

// DefaultMaxSize is the largest input, in bytes, that the decoders accept
// unless told otherwise with [MaxSize]: 1 MiB, about the default largest
// message of a NATS server and of a Kafka broker.
const DefaultMaxSize = 1 << 20

// DecodeOption tunes one decode call.
type DecodeOption func(*decodeOptions)

type decodeOptions struct {
	maxSize int
}

// MaxSize sets the largest input the decoder accepts, in bytes; larger input
// fails with [ErrTooLarge] before any of it is parsed. For [DecodeJSON] the
// input is the JSON document; for [Binding.Decode] it is the body plus every
// header's key and value. A value of n <= 0 keeps [DefaultMaxSize].
func MaxSize(n int) DecodeOption {
	return func(o *decodeOptions) {
		if n > 0 {
			o.maxSize = n
		}
	}
}

func newDecodeOptions(opts []DecodeOption) decodeOptions {
	o := decodeOptions{maxSize: DefaultMaxSize}
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return o
}

// checkSize returns a *DecodeError wrapping ErrTooLarge when size is over
// the limit.
func (o decodeOptions) checkSize(size int) error {
	if size > o.maxSize {
		return &DecodeError{
			Reason: fmt.Sprintf("%d bytes exceed the limit of %d bytes", size, o.maxSize),
			Err:    ErrTooLarge,
		}
	}
	return nil
}
