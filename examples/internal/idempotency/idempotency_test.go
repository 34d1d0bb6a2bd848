package idempotency_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/troupedev/troupe/examples/internal/idempotency"
)

func TestKey_ReadsBareAndQuotedKeysAndRefusesInvalidOnes(t *testing.T) {
	for _, c := range []struct {
		values []string
		want   string
		bad    bool
	}{
		{nil, "", false},
		{[]string{"abc-1"}, "abc-1", false},
		{[]string{`"abc-1"`}, "abc-1", false},
		{[]string{`"a\"b\\c"`}, `a"b\c`, false},
		{[]string{strings.Repeat("k", idempotency.MaxLength)}, strings.Repeat("k", idempotency.MaxLength), false},
		{[]string{""}, "", true},
		{[]string{`""`}, "", true},
		{[]string{"a", "b"}, "", true},
		{[]string{`"a\xb"`}, "", true},
		{[]string{`"a"b"`}, "", true},
		{[]string{"clé"}, "", true},
		{[]string{"tab\there"}, "", true},
		{[]string{strings.Repeat("k", idempotency.MaxLength+1)}, "", true},
	} {
		h := http.Header{}
		for _, v := range c.values {
			h.Add(idempotency.Header, v)
		}
		got, err := idempotency.Key(h)
		var ke *idempotency.Error
		if c.bad != errors.As(err, &ke) || (!c.bad && err != nil) {
			t.Errorf("Key(%q) error = %v, want invalid: %v", c.values, err, c.bad)
			continue
		}
		if got != c.want {
			t.Errorf("Key(%q) = %q, want %q", c.values, got, c.want)
		}
	}
}
