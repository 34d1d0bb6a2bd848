package message

import (
	"errors"
	"fmt"
	"iter"
	"slices"
	"time"
	"unicode/utf8"
)

// Validate reports every way m breaks the CloudEvents rules, joined with
// [errors.Join]; each is a [*FieldError] and matches [ErrInvalid]. It
// returns nil for a valid message. The rules:
//
//   - ID, Source and Type are required (non-empty).
//   - Every string attribute, extension values included, is valid UTF-8 and
//     holds no control characters (U+0000–U+001F, U+007F–U+009F) and no
//     Unicode noncharacters, as the CloudEvents String type demands. This
//     also keeps every value safe to carry in a broker header.
//   - Time, when set, lies in years 0000–9999, the range RFC 3339 can write.
//   - Extension names are non-empty and made of lower-case letters a–z and
//     digits 0–9, and are not the name of a core attribute, "data", or one of
//     correlationid, causationid and traceparent (which have their own
//     fields). The specification advises names of at most 20 characters but
//     does not require it, so longer names are accepted.
//
// Source and DataSchema are not checked as URIs, and DataContentType is not
// checked as a media type: the specification's syntax is loose enough in
// practice that checking would reject events other producers send.
//
// [EncodeJSON] and [Binding.Encode] call Validate and refuse invalid
// messages; the decoders apply the same rules, so a message that decodes
// always encodes again.
func (m *Message) Validate() error {
	if m == nil {
		return &FieldError{Reason: "nil message"}
	}
	var errs []error
	for field, reason := range m.problems() {
		errs = append(errs, &FieldError{Field: field, Reason: reason})
	}
	return errors.Join(errs...)
}

// problems yields each problem with m as (field, reason), in a fixed order:
// required attributes, optional attributes, then extensions by name.
func (m *Message) problems() iter.Seq2[string, string] {
	return func(yield func(string, string) bool) {
		required := [...]struct{ name, value string }{
			{"id", m.ID},
			{"source", m.Source},
			{"type", m.Type},
		}
		for _, a := range required {
			reason := "is required"
			if a.value != "" {
				reason = checkString(a.value)
			}
			if reason != "" && !yield(a.name, reason) {
				return
			}
		}
		if reason := checkString(m.Subject); reason != "" && !yield("subject", reason) {
			return
		}
		if !m.Time.IsZero() {
			if y := wireTime(m.Time).Year(); y < 0 || y > 9999 {
				if !yield("time", fmt.Sprintf("year %d is outside 0000-9999 and cannot be written in RFC 3339", y)) {
					return
				}
			}
		}
		optional := [...]struct{ name, value string }{
			{"datacontenttype", m.DataContentType},
			{"dataschema", m.DataSchema},
			{"correlationid", m.CorrelationID},
			{"causationid", m.CausationID},
			{"traceparent", m.TraceParent},
		}
		for _, a := range optional {
			if reason := checkString(a.value); reason != "" && !yield(a.name, reason) {
				return
			}
		}
		if len(m.Extensions) == 0 {
			return
		}
		for _, name := range sortedNames(m.Extensions) {
			reason := checkExtensionName(name)
			if reason == "" {
				reason = checkString(m.Extensions[name])
			}
			if reason != "" && !yield(name, reason) {
				return
			}
		}
	}
}

// firstProblem returns the first problem with m as a *DecodeError, or nil.
func (m *Message) firstProblem() error {
	for field, reason := range m.problems() {
		return &DecodeError{Field: field, Reason: reason}
	}
	return nil
}

// sortedNames returns the keys of exts in order.
func sortedNames(exts map[string]string) []string {
	names := make([]string, 0, len(exts))
	for name := range exts {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// checkString returns why s is not a valid CloudEvents String, or "".
func checkString(s string) string {
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c < 0x7f {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			return fmt.Sprintf("contains control character %U at byte %d", rune(c), i)
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			return fmt.Sprintf("is not valid UTF-8 at byte %d", i)
		case r <= 0x9f:
			return fmt.Sprintf("contains control character %U at byte %d", r, i)
		case r >= 0xfdd0 && r <= 0xfdef, r&0xfffe == 0xfffe:
			return fmt.Sprintf("contains Unicode noncharacter %U at byte %d", r, i)
		}
		i += size
	}
	return ""
}

// checkExtensionName returns why name cannot name an extension, or "".
func checkExtensionName(name string) string {
	if !validAttributeName(name) {
		return "extension name must be lower-case letters a-z and digits 0-9"
	}
	switch name {
	case "specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema":
		return "extension name is a core attribute"
	case "data":
		return "extension name is reserved for the payload"
	case "correlationid":
		return "extension name has its own field, CorrelationID"
	case "causationid":
		return "extension name has its own field, CausationID"
	case "traceparent":
		return "extension name has its own field, TraceParent"
	}
	return ""
}

// validAttributeName reports whether name is a non-empty run of a-z and 0-9.
func validAttributeName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// wireTime returns t as it is written: in its own offset, unless that
// offset has seconds RFC 3339 cannot write, in which case in UTC.
func wireTime(t time.Time) time.Time {
	if _, off := t.Zone(); off%60 != 0 {
		return t.UTC()
	}
	return t
}

// parseTime parses an RFC 3339 timestamp attribute.
func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, &DecodeError{Field: "time", Reason: "is not an RFC 3339 timestamp", Err: err}
	}
	return t, nil
}
