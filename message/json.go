package message

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// StructuredContentType is the media type of a message in the CloudEvents
// JSON format, as written by [EncodeJSON].
const StructuredContentType = "application/cloudevents+json"

// EncodeJSON returns m in the CloudEvents JSON format (structured mode, media
// type [StructuredContentType]). It refuses a message that [Message.Validate]
// rejects.
//
// Attributes come first in a fixed order, then extensions sorted by name,
// then the payload:
//
//   - as "data", embedded verbatim, when DataContentType declares JSON
//     (application/json, */json or */*+json, parameters aside) or is empty,
//     and Data is valid UTF-8 JSON with no surrounding white space, other
//     than null (a null "data" member reads as no data);
//   - as "data", a JSON string, when DataContentType is text/* and Data is
//     valid UTF-8;
//   - otherwise as "data_base64".
//
// Either way [DecodeJSON] returns Data byte for byte. Empty Data is omitted.
func EncodeJSON(m *Message) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("encode message: %w", err)
	}
	return appendJSON(make([]byte, 0, jsonSizeHint(m)), m), nil
}

func jsonSizeHint(m *Message) int {
	n := 160 + len(m.ID) + len(m.Source) + len(m.Type) + len(m.Subject) +
		len(m.DataContentType) + len(m.DataSchema) + len(m.CorrelationID) +
		len(m.CausationID) + len(m.TraceParent) + len(m.Data)*4/3
	for k, v := range m.Extensions {
		n += len(k) + len(v) + 6
	}
	return n
}

// appendJSON appends m, which must be valid, to b in the JSON format.
func appendJSON(b []byte, m *Message) []byte {
	b = append(b, `{"specversion":"`+SpecVersion+`","id":`...)
	b = appendJSONString(b, m.ID)
	b = append(b, `,"source":`...)
	b = appendJSONString(b, m.Source)
	b = append(b, `,"type":`...)
	b = appendJSONString(b, m.Type)
	b = appendOptional(b, "subject", m.Subject)
	if !m.Time.IsZero() {
		b = append(b, `,"time":"`...)
		b = wireTime(m.Time).AppendFormat(b, time.RFC3339Nano)
		b = append(b, '"')
	}
	b = appendOptional(b, "datacontenttype", m.DataContentType)
	b = appendOptional(b, "dataschema", m.DataSchema)
	b = appendOptional(b, "correlationid", m.CorrelationID)
	b = appendOptional(b, "causationid", m.CausationID)
	b = appendOptional(b, "traceparent", m.TraceParent)
	if len(m.Extensions) > 0 {
		for _, name := range sortedNames(m.Extensions) {
			b = append(b, ',', '"')
			b = append(b, name...) // validated: a-z0-9 only
			b = append(b, '"', ':')
			b = appendJSONString(b, m.Extensions[name])
		}
	}
	if len(m.Data) > 0 {
		mt := mediaType(m.DataContentType)
		switch {
		case (mt == "" || isJSONMediaType(mt)) && embeddableJSON(m.Data):
			b = append(b, `,"data":`...)
			b = append(b, m.Data...)
		case strings.HasPrefix(mt, "text/") && utf8.Valid(m.Data):
			b = append(b, `,"data":`...)
			b = appendJSONString(b, string(m.Data))
		default:
			b = append(b, `,"data_base64":"`...)
			b = base64.StdEncoding.AppendEncode(b, m.Data)
			b = append(b, '"')
		}
	}
	return append(b, '}')
}

func appendOptional(b []byte, name, value string) []byte {
	if value == "" {
		return b
	}
	b = append(b, ',', '"')
	b = append(b, name...)
	b = append(b, '"', ':')
	return appendJSONString(b, value)
}

// appendJSONString appends s, which must be valid UTF-8, as a JSON string.
// Unlike encoding/json it leaves <, > and & alone: the output is not meant
// for HTML.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// embeddableJSON reports whether data can be written as the "data" member
// and read back byte for byte: valid JSON, valid UTF-8, no white space
// around the value (a decoder does not keep it), and not null (which a
// decoder reads as no data).
func embeddableJSON(data []byte) bool {
	if len(data) == 0 || isJSONSpace(data[0]) || isJSONSpace(data[len(data)-1]) || isJSONNull(data) {
		return false
	}
	return utf8.Valid(data) && json.Valid(data)
}

func isJSONSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// mediaType returns the media type of a content type, without parameters,
// trimmed and in lower case: "Application/JSON; charset=utf-8" gives
// "application/json".
func mediaType(contentType string) string {
	if i := strings.IndexByte(contentType, ';'); i >= 0 {
		contentType = contentType[:i]
	}
	return asciiLower(strings.TrimSpace(contentType))
}

// isJSONMediaType reports whether mt (from mediaType) declares JSON: its
// subtype is json or ends in +json.
func isJSONMediaType(mt string) bool {
	i := strings.IndexByte(mt, '/')
	if i < 0 {
		return false
	}
	sub := mt[i+1:]
	return sub == "json" || strings.HasSuffix(sub, "+json")
}

// asciiLower returns s with A-Z turned to a-z and every other byte kept.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if c := b[j]; c >= 'A' && c <= 'Z' {
					b[j] = c + 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// DecodeJSON decodes a message in the CloudEvents JSON format. Bad input
// yields a [*DecodeError] naming the first offending attribute, and input
// over the size limit (default [DefaultMaxSize], see [MaxSize]) one that
// wraps [ErrTooLarge].
//
// The input must be one JSON object with no repeated member; specversion
// must be "1.0"; id, source and type must be non-empty strings; time, when
// present, an RFC 3339 string; other attributes strings. A null member,
// "data" included, is treated as absent. Extension values may be strings,
// numbers or booleans; numbers and booleans are kept as their JSON text
// ("5", "true"). Every rule of [Message.Validate] applies too, so a decoded
// message always encodes.
//
// The input must be UTF-8, as RFC 8259 requires of JSON exchanged between
// systems. Text is never repaired: a member name or string value holding
// invalid UTF-8, or an escaped surrogate (\ud800-\udfff) that is not half
// of a pair, is refused rather than replaced with U+FFFD as encoding/json
// does, so two different ids can never decode to the same one.
//
// The payload is read from "data_base64" (base64) or "data", never both.
// When DataContentType declares JSON or is absent, Data is the "data"
// value's JSON text as it appears in the input, escapes included; otherwise
// a JSON string is unquoted into Data, and any other value is kept as JSON
// text. A DataContentType left absent stays empty: the specification
// suggests writing the implied application/json when such an event is sent
// on in another mode, but Troupe passes messages on as they were made.
func DecodeJSON(b []byte, opts ...DecodeOption) (*Message, error) {
	o := newDecodeOptions(opts)
	if err := o.checkSize(len(b)); err != nil {
		return nil, err
	}
	return decodeJSON(b)
}

// jsonMember is one member of the envelope, kept raw until specversion has
// been checked.
type jsonMember struct {
	name []byte // unescaped; usually a slice of the input
	raw  []byte
}

func (mb jsonMember) field() string { return string(mb.name) }

func decodeJSON(b []byte) (*Message, error) {
	// encoding/json checks the syntax without allocating; the members are
	// then split off by scanning valid JSON, which is simple, and their
	// values stay slices of b.
	if !json.Valid(b) {
		if len(bytes.TrimLeft(b, " \t\r\n")) == 0 {
			return nil, &DecodeError{Reason: "empty input"}
		}
		var v json.RawMessage
		return nil, &DecodeError{Reason: "invalid JSON", Err: json.Unmarshal(b, &v)}
	}
	i := skipJSONSpace(b, 0)
	if b[i] != '{' {
		return nil, &DecodeError{Reason: "the envelope must be a JSON object, got " + rawKind(b[i:])}
	}

	members := make([]jsonMember, 0, manyMembers)
	var seen map[string]struct{} // member names, once there are many
	for i = skipJSONSpace(b, i+1); b[i] != '}'; {
		end := endOfJSONString(b, i)
		name := b[i+1 : end-1]
		if bytes.IndexByte(name, '\\') >= 0 || !utf8.Valid(name) {
			s, reason := unquoteJSONString(b[i:end])
			if reason != "" {
				// The name cannot be told, so Field stays empty.
				return nil, &DecodeError{Reason: fmt.Sprintf("member name %q %s", name, reason)}
			}
			name = []byte(s)
		}
		i = skipJSONSpace(b, skipJSONSpace(b, end)+1) // past the colon
		end = endOfJSONValue(b, i)
		raw := b[i:end]
		if repeatedMember(members, seen, name) {
			return nil, &DecodeError{Field: string(name), Reason: "appears more than once"}
		}
		members = append(members, jsonMember{name, raw})
		if seen != nil {
			seen[string(name)] = struct{}{}
		} else if len(members) == manyMembers {
			seen = make(map[string]struct{}, 2*manyMembers)
			for _, mb := range members {
				seen[string(mb.name)] = struct{}{}
			}
		}
		if i = skipJSONSpace(b, end); b[i] == ',' {
			i = skipJSONSpace(b, i+1)
		}
	}

	// specversion first: with another version, the other members may mean
	// something else.
	version, present, err := jsonAttr(members, "specversion")
	if err != nil {
		return nil, err
	}
	if err := checkSpecVersion(version, present); err != nil {
		return nil, err
	}

	m := &Message{}
	var data, dataBase64 []byte
	for _, mb := range members {
		var err error
		switch string(mb.name) {
		case "specversion": // checked above
		case "id":
			m.ID, err = jsonAttrString(mb)
		case "source":
			m.Source, err = jsonAttrString(mb)
		case "type":
			m.Type, err = jsonAttrString(mb)
		case "subject":
			m.Subject, err = jsonAttrString(mb)
		case "datacontenttype":
			m.DataContentType, err = jsonAttrString(mb)
		case "dataschema":
			m.DataSchema, err = jsonAttrString(mb)
		case "time":
			var s string
			if s, err = jsonAttrString(mb); err == nil && !isJSONNull(mb.raw) {
				m.Time, err = parseTime(s)
			}
		case "data":
			if !isJSONNull(mb.raw) {
				data = mb.raw
			}
		case "data_base64":
			if !isJSONNull(mb.raw) {
				dataBase64 = mb.raw
			}
		case "correlationid":
			m.CorrelationID, _, err = jsonExtension(mb)
		case "causationid":
			m.CausationID, _, err = jsonExtension(mb)
		case "traceparent":
			m.TraceParent, _, err = jsonExtension(mb)
		default:
			err = m.setJSONExtension(mb)
		}
		if err != nil {
			return nil, err
		}
	}

	switch {
	case data != nil && dataBase64 != nil:
		return nil, &DecodeError{Field: "data", Reason: "data and data_base64 are both present"}
	case dataBase64 != nil:
		s, _, err := jsonString(jsonMember{[]byte("data_base64"), dataBase64})
		if err != nil {
			return nil, err
		}
		if m.Data, err = base64.StdEncoding.DecodeString(s); err != nil {
			return nil, &DecodeError{Field: "data_base64", Reason: "is not valid base64", Err: err}
		}
	case data != nil:
		mt := mediaType(m.DataContentType)
		if mt != "" && !isJSONMediaType(mt) && data[0] == '"' {
			s, _, err := jsonString(jsonMember{[]byte("data"), data})
			if err != nil {
				return nil, err
			}
			m.Data = []byte(s)
		} else {
			// Kept as JSON text, which must be UTF-8 like the rest of the
			// input; escapes stay as they are, so nothing is lost.
			if !utf8.Valid(data) {
				return nil, &DecodeError{Field: "data", Reason: invalidUTF8(data)}
			}
			m.Data = bytes.Clone(data) // not a slice of the caller's input
		}
	}
	if len(m.Data) == 0 {
		m.Data = nil
	}
	if err := m.firstProblem(); err != nil {
		return nil, err
	}
	return m, nil
}

// skipJSONSpace returns the index of the first byte at or after i that is
// not JSON white space. b must be valid JSON, so the index is in range
// wherever a token follows.
func skipJSONSpace(b []byte, i int) int {
	for i < len(b) && isJSONSpace(b[i]) {
		i++
	}
	return i
}

// endOfJSONString returns the index just past the string that starts at
// b[i], in valid JSON.
func endOfJSONString(b []byte, i int) int {
	for i++; ; i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
}

// endOfJSONValue returns the index just past the value that starts at b[i],
// in valid JSON.
func endOfJSONValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return endOfJSONString(b, i)
	case '{', '[':
		depth := 0
		for ; ; i++ {
			switch b[i] {
			case '"':
				i = endOfJSONString(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
	default: // number, true, false, null
		for i < len(b) && !isJSONSpace(b[i]) && b[i] != ',' && b[i] != '}' && b[i] != ']' {
			i++
		}
		return i
	}
}

// manyMembers is the member count from which repeated names are found with a
// map rather than by scanning the members.
const manyMembers = 16

func repeatedMember(members []jsonMember, seen map[string]struct{}, name []byte) bool {
	if seen != nil {
		_, ok := seen[string(name)]
		return ok
	}
	for _, mb := range members {
		if bytes.Equal(mb.name, name) {
			return true
		}
	}
	return false
}

func checkSpecVersion(version string, present bool) error {
	if !present || version == "" {
		return &DecodeError{Field: "specversion", Reason: "is required"}
	}
	if version != SpecVersion {
		return &DecodeError{Field: "specversion", Reason: fmt.Sprintf("version %q is not supported, want %q", version, SpecVersion)}
	}
	return nil
}

// jsonAttr returns the string value of the named member, and whether it is
// present (and not null).
func jsonAttr(members []jsonMember, name string) (string, bool, error) {
	for _, mb := range members {
		if string(mb.name) == name {
			return jsonString(mb)
		}
	}
	return "", false, nil
}

// jsonAttrString returns mb's value as a string, "" when it is null.
func jsonAttrString(mb jsonMember) (string, error) {
	s, _, err := jsonString(mb)
	return s, err
}

// setJSONExtension sets the extension mb, unless its value is null.
func (m *Message) setJSONExtension(mb jsonMember) error {
	name := string(mb.name)
	if !validAttributeName(name) {
		return &DecodeError{Field: name, Reason: "attribute names must be lower-case letters a-z and digits 0-9"}
	}
	v, ok, err := jsonExtension(mb)
	if err != nil || !ok {
		return err
	}
	if m.Extensions == nil {
		m.Extensions = make(map[string]string)
	}
	m.Extensions[name] = v
	return nil
}

// jsonString returns mb's value as a string; ok is false when it is null.
func jsonString(mb jsonMember) (string, bool, error) {
	raw := mb.raw
	if isJSONNull(raw) {
		return "", false, nil
	}
	if raw[0] != '"' {
		return "", false, &DecodeError{Field: mb.field(), Reason: "must be a JSON string, got " + rawKind(raw)}
	}
	s, reason := unquoteJSONString(raw)
	if reason != "" {
		return "", false, &DecodeError{Field: mb.field(), Reason: reason}
	}
	return s, true, nil
}

// unquoteJSONString returns the value of raw, a JSON string (quotes
// included) from valid JSON. Where encoding/json puts U+FFFD in place of
// invalid UTF-8 and of an escaped surrogate that is not half of a pair, it
// refuses them: reason then says why, and is "" otherwise.
func unquoteJSONString(raw []byte) (s string, reason string) {
	inner := raw[1 : len(raw)-1]
	// Escapes are ASCII, so invalid UTF-8 in the value is invalid UTF-8 in
	// the text between the quotes.
	if !utf8.Valid(inner) {
		return "", invalidUTF8(inner)
	}
	first := bytes.IndexByte(inner, '\\')
	if first < 0 {
		return string(inner), "" // the usual case: the text is the value
	}
	b := make([]byte, first, len(inner))
	copy(b, inner)
	for i := first; i < len(inner); {
		if c := inner[i]; c != '\\' {
			b = append(b, c)
			i++
			continue
		}
		c := inner[i+1]
		i += 2
		switch c {
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			r := hex4(inner[i:])
			i += 4
			if utf16.IsSurrogate(r) {
				// A high surrogate must be followed by an escaped low one.
				if i+6 <= len(inner) && inner[i] == '\\' && inner[i+1] == 'u' {
					if pair := utf16.DecodeRune(r, hex4(inner[i+2:])); pair != utf8.RuneError {
						b = utf8.AppendRune(b, pair)
						i += 6
						continue
					}
				}
				return "", fmt.Sprintf("contains the unpaired surrogate \\u%04x, which is not a Unicode character", r)
			}
			b = utf8.AppendRune(b, r)
		default: // '"', '\\', '/'
			b = append(b, c)
		}
	}
	return string(b), ""
}

// hex4 returns the value of the four hex digits that b starts with, as
// valid JSON guarantees after \u.
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		d, _ := unhex(c)
		r = r<<4 | rune(d)
	}
	return r
}

// invalidUTF8 returns the reason for text that is not valid UTF-8.
func invalidUTF8(text []byte) string {
	i := 0
	for i < len(text) {
		r, size := utf8.DecodeRune(text[i:])
		if r == utf8.RuneError && size == 1 {
			break
		}
		i += size
	}
	return fmt.Sprintf("is not valid UTF-8 at byte %d of its JSON text", i)
}

// jsonExtension returns an extension's value as a string: a string as is,
// a number or boolean as its JSON text. ok is false for null.
func jsonExtension(mb jsonMember) (v string, ok bool, err error) {
	switch raw := mb.raw; raw[0] {
	case '"':
		return jsonString(mb)
	case 'n':
		return "", false, nil
	case '{', '[':
		return "", false, &DecodeError{Field: mb.field(), Reason: "extension value must be a string, number or boolean, got " + rawKind(raw)}
	default: // number, true, false
		return string(raw), true, nil
	}
}

func isJSONNull(raw []byte) bool { return len(raw) == 4 && string(raw) == "null" }

// rawKind names the JSON type of a raw value.
func rawKind(raw []byte) string {
	switch raw[0] {
	case '"':
		return "string"
	case '{':
		return "object"
	case '[':
		return "array"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	default:
		return "number"
	}
}
