// Package idempotency reads the Idempotency-Key header (IETF draft "The
// Idempotency-Key HTTP Header Field") of the examples' POST requests: a
// client that got no answer sends the same request again with the same
// key, and the service answers with what the first one created instead of
// creating it twice.
package idempotency

import (
	"fmt"
	"net/http"
	"strings"
)

// The header names and the key's limit.
const (
	// Header carries the key, as the draft's quoted string ("8e03978e-...")
	// or bare, as Stripe's clients send it: both name the same key.
	Header = "Idempotency-Key"
	// ReplayedHeader is "true" on an answer to a request whose key had
	// already done its work.
	ReplayedHeader = "Idempotent-Replayed"
	// MaxLength is the longest key, in bytes.
	MaxLength = 255
)

// Error is a key that is not valid; Problem says why, for people.
type Error struct{ Problem string }

func (e *Error) Error() string { return Header + ": " + e.Problem }

// Validate checks a key: empty (none), or 1 to MaxLength printable ASCII
// characters.
func Validate(key string) error {
	if len(key) > MaxLength {
		return &Error{fmt.Sprintf("longer than %d characters", MaxLength)}
	}
	for i := range len(key) {
		if key[i] < 0x20 || key[i] > 0x7e {
			return &Error{fmt.Sprintf("byte %d (%#x) is not a printable ASCII character", i, key[i])}
		}
	}
	return nil
}

// Key reads a request's key: "" when it has none. A value in double
// quotes is the draft's structured-field string, whose \" and \\ stand
// for " and \. An empty, repeated or invalid key is an *Error.
func Key(h http.Header) (string, error) {
	vs := h.Values(Header)
	switch {
	case len(vs) == 0:
		return "", nil
	case len(vs) > 1:
		return "", &Error{fmt.Sprintf("want one key, have %d", len(vs))}
	}
	key := vs[0]
	if len(key) >= 2 && key[0] == '"' && key[len(key)-1] == '"' {
		var b strings.Builder
		for i := 1; i < len(key)-1; i++ {
			c := key[i]
			if c == '\\' {
				if i++; i == len(key)-1 || (key[i] != '"' && key[i] != '\\') {
					return "", &Error{`a quoted key may escape only " and \`}
				}
				c = key[i]
			} else if c == '"' {
				return "", &Error{`an unescaped " inside the quoted key`}
			}
			b.WriteByte(c)
		}
		key = b.String()
	}
	if key == "" {
		return "", &Error{fmt.Sprintf("empty: want 1 to %d printable ASCII characters", MaxLength)}
	}
	if err := Validate(key); err != nil {
		return "", err
	}
	return key, nil
}
