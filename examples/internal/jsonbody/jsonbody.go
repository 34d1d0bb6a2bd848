// Package jsonbody decodes the JSON request bodies of the examples' HTTP
// APIs strictly, into errors that say what is wrong and where, so that a
// client sees 400 {"error", "field"} rather than a Go error's text.
package jsonbody

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Error is a body that could not be decoded.
type Error struct {
	// Field names the field at fault, when one is: "items[1].quantity"
	// style paths as encoding/json reports them, or "(body)".
	Field string
	// Problem says what is wrong, for people.
	Problem string
}

func (e *Error) Error() string {
	if e.Field == "" {
		return e.Problem
	}
	return e.Field + ": " + e.Problem
}

// Decode reads exactly one JSON value from body into v, reading at most
// limit bytes. Unknown fields, a wrong type, an empty or truncated body,
// anything after the value (even a stray "}" or "]"), and a body over the
// limit are each an *Error.
func Decode(body io.Reader, limit int64, v any) *Error {
	lr := &io.LimitedReader{R: body, N: limit + 1}
	over := func() bool { return lr.N == 0 } // read more than limit
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case err == nil:
		// Token, not More: More is false before a stray "}" or "]".
		if _, err := dec.Token(); !errors.Is(err, io.EOF) {
			if over() {
				return &Error{Problem: fmt.Sprintf("body over %d bytes", limit)}
			}
			return &Error{Problem: "unexpected data after the JSON object"}
		}
		return nil
	case errors.Is(err, io.EOF):
		return &Error{Problem: "empty body: want a JSON object"}
	case errors.As(err, &syntax):
		return &Error{Problem: fmt.Sprintf("malformed JSON at byte %d: %v", syntax.Offset, syntax)}
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "(body)"
		}
		return &Error{Field: field, Problem: fmt.Sprintf("want %s, got %s", typ.Type, typ.Value)}
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		return &Error{Field: name, Problem: "unknown field"}
	case errors.Is(err, io.ErrUnexpectedEOF):
		if over() {
			return &Error{Problem: fmt.Sprintf("body over %d bytes", limit)}
		}
		return &Error{Problem: "malformed JSON: the body ends inside a value"}
	default:
		return &Error{Problem: err.Error()}
	}
}
