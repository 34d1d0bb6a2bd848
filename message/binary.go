package message

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"
)

// Header is one broker message header, neutral between brokers: a broker
// adapter copies these to and from its client's own header type.
type Header struct {
	// Key is the header name, such as "ce-id". Decoding matches keys
	// without regard to ASCII case.
	Key string
	// Value is the header value as it travels, percent-encoded for NATS.
	Value string
}

// Binding maps messages to broker messages in binary mode: each attribute
// travels as a header, and Data is the body as is. The zero Binding is not
// valid; use [NATS] or [Kafka].
type Binding uint8

// The bindings, after the CloudEvents protocol bindings of each broker.
const (
	// NATS carries attribute "x" in header "ce-x", datacontenttype too (in
	// "ce-datacontenttype", as the NATS protocol binding maps it), with
	// values percent-encoded: space, '"', '%' and every byte outside
	// printable ASCII become %XX. Decoding trims white space around values,
	// removes double quotes (RFC 9110 quoted strings) and percent-decodes.
	NATS Binding = iota + 1
	// Kafka carries attribute "x" in header "ce_x", except datacontenttype,
	// which is the "content-type" header. Values are UTF-8 text as is.
	Kafka
)

// String returns the binding's name.
func (b Binding) String() string {
	switch b {
	case NATS:
		return "nats"
	case Kafka:
		return "kafka"
	}
	return fmt.Sprintf("binding(%d)", uint8(b))
}

// Prefix returns the prefix that turns an attribute name into a header key:
// "ce-" for NATS, "ce_" for Kafka.
func (b Binding) Prefix() string {
	switch b {
	case NATS:
		return "ce-"
	case Kafka:
		return "ce_"
	}
	return ""
}

// errUnknown is returned for a Binding other than NATS or Kafka; it is
// a programming error, not bad input, so it is not a *DecodeError.
func (b Binding) errUnknown() error {
	return fmt.Errorf("message: unknown binding %d", uint8(b))
}

// headerKeys are a binding's header keys for the core attributes and the
// extensions that have fields, kept whole so encoding does not concatenate
// them.
type headerKeys struct {
	specversion, id, source, typ, subject, time, datacontenttype, dataschema,
	correlationid, causationid, traceparent string
}

// keys returns b's header keys; ok is false for an unknown binding.
func (b Binding) keys() (k headerKeys, ok bool) {
	switch b {
	case NATS:
		return headerKeys{
			"ce-specversion", "ce-id", "ce-source", "ce-type", "ce-subject", "ce-time",
			"ce-datacontenttype", "ce-dataschema", "ce-correlationid", "ce-causationid", "ce-traceparent",
		}, true
	case Kafka:
		return headerKeys{
			"ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time",
			"content-type", "ce_dataschema", "ce_correlationid", "ce_causationid", "ce_traceparent",
		}, true
	}
	return headerKeys{}, false
}

// contentTypeHeader is the broker header that names the body's media type.
const contentTypeHeader = "content-type"

// Encode returns m's headers and body in binary mode. Headers come in a fixed
// order, extensions sorted by name; body is m.Data itself, not a copy, or
// nil when there is no data. Encode refuses a message that
// [Message.Validate] rejects.
//
// A Kafka message whose DataContentType is itself a CloudEvents media type
// (application/cloudevents...) cannot be told apart from a structured-mode
// message on the wire, so Kafka encodes it in structured mode instead: one
// content-type header, [StructuredContentType], and [EncodeJSON]'s output
// as the body. [Binding.Decode] reads either mode.
func (b Binding) Encode(m *Message) ([]Header, []byte, error) {
	keys, ok := b.keys()
	if !ok {
		return nil, nil, b.errUnknown()
	}
	if err := m.Validate(); err != nil {
		return nil, nil, fmt.Errorf("encode message: %w", err)
	}
	if b == Kafka && isStructured(m.DataContentType) {
		body := appendJSON(make([]byte, 0, jsonSizeHint(m)), m)
		return []Header{{contentTypeHeader, StructuredContentType}}, body, nil
	}

	hs := make([]Header, 0, 4+countSet(m)+len(m.Extensions))
	hs = append(hs,
		Header{keys.specversion, SpecVersion},
		Header{keys.id, b.encodeValue(m.ID)},
		Header{keys.source, b.encodeValue(m.Source)},
		Header{keys.typ, b.encodeValue(m.Type)},
	)
	hs = b.appendOptional(hs, keys.subject, m.Subject)
	if !m.Time.IsZero() {
		hs = append(hs, Header{keys.time, wireTime(m.Time).Format(time.RFC3339Nano)})
	}
	hs = b.appendOptional(hs, keys.datacontenttype, m.DataContentType)
	hs = b.appendOptional(hs, keys.dataschema, m.DataSchema)
	hs = b.appendOptional(hs, keys.correlationid, m.CorrelationID)
	hs = b.appendOptional(hs, keys.causationid, m.CausationID)
	hs = b.appendOptional(hs, keys.traceparent, m.TraceParent)
	if len(m.Extensions) > 0 {
		prefix := b.Prefix()
		for _, name := range sortedNames(m.Extensions) {
			hs = append(hs, Header{prefix + name, b.encodeValue(m.Extensions[name])})
		}
	}
	var body []byte
	if len(m.Data) > 0 {
		body = m.Data
	}
	return hs, body, nil
}

func countSet(m *Message) int {
	n := 0
	for _, s := range [...]string{m.Subject, m.DataContentType, m.DataSchema, m.CorrelationID, m.CausationID, m.TraceParent} {
		if s != "" {
			n++
		}
	}
	if !m.Time.IsZero() {
		n++
	}
	return n
}

func (b Binding) appendOptional(hs []Header, key, value string) []Header {
	if value == "" {
		return hs
	}
	return append(hs, Header{key, b.encodeValue(value)})
}

// encodeValue returns an attribute value as the binding writes it.
func (b Binding) encodeValue(v string) string {
	if b == NATS {
		return percentEncode(v)
	}
	return v
}

// decodeValue returns the attribute value a header value carries.
func (b Binding) decodeValue(v string) (string, error) {
	if b != NATS {
		return v, nil
	}
	v = strings.Trim(v, " \t")
	if strings.IndexByte(v, '"') >= 0 {
		var err error
		if v, err = unquoteHeader(v); err != nil {
			return "", err
		}
	}
	if strings.IndexByte(v, '%') >= 0 {
		return percentDecode(v)
	}
	return v, nil
}

// Decode decodes a broker message in either mode. Header keys are matched
// without regard to case, and headers that carry no attribute (those
// without the binding's prefix, other than content-type) are ignored.
//
// A content-type header that names a CloudEvents format
// (application/cloudevents...) marks a structured-mode message: the body is
// decoded with [DecodeJSON], and any other format is refused. Otherwise the
// message is in binary mode and Data is body itself, not a copy (nil when
// body is empty). The data content type may arrive in the content-type
// header or in the prefixed datacontenttype header, whichever the binding
// writes; when both are present they must agree.
//
// Bad input yields a [*DecodeError] naming the first offending attribute:
// a missing or unsupported specversion, a missing id, source or type, a
// repeated attribute, an extension name that is not lower-case a-z and 0-9,
// a time that is not RFC 3339, a NATS value with broken percent-encoding,
// a header value that is not valid UTF-8 (as it arrives, or for NATS once
// percent-decoded; it is refused, never repaired), or any other breach of
// [Message.Validate]'s rules. The body is bytes and may hold anything.
// Input over the size limit (default [DefaultMaxSize], see [MaxSize]),
// counting the body and every header's key and value, yields one wrapping
// [ErrTooLarge].
func (b Binding) Decode(headers []Header, body []byte, opts ...DecodeOption) (*Message, error) {
	if b != NATS && b != Kafka {
		return nil, b.errUnknown()
	}
	o := newDecodeOptions(opts)
	size := len(body)
	for _, h := range headers {
		size += len(h.Key) + len(h.Value)
	}
	if err := o.checkSize(size); err != nil {
		return nil, err
	}

	// First pass: the content type decides the mode, and specversion must
	// be checked before the other attributes are read.
	prefix := b.Prefix()
	var contentType, version string
	var haveContentType, haveVersion bool
	for _, h := range headers {
		switch {
		case asciiEqualFold(h.Key, contentTypeHeader):
			if haveContentType {
				return nil, &DecodeError{Field: contentTypeHeader, Reason: "header appears more than once"}
			}
			contentType, haveContentType = h.Value, true
		case len(h.Key) == len(prefix)+len("specversion") && asciiHasPrefixFold(h.Key, prefix) &&
			asciiEqualFold(h.Key[len(prefix):], "specversion"):
			if haveVersion {
				return nil, &DecodeError{Field: "specversion", Reason: "appears more than once"}
			}
			v, err := b.decodeValue(h.Value)
			if err != nil {
				return nil, &DecodeError{Field: "specversion", Reason: fmt.Sprintf("header %q", h.Key), Err: err}
			}
			version, haveVersion = v, true
		}
	}
	if haveContentType && isStructured(contentType) {
		switch mt := mediaType(contentType); {
		case mt == StructuredContentType:
			return decodeJSON(body)
		case strings.HasPrefix(mt, "application/cloudevents-batch"):
			return nil, &DecodeError{Field: contentTypeHeader, Reason: fmt.Sprintf("batch mode (%s) is not supported", mt)}
		default:
			return nil, &DecodeError{Field: contentTypeHeader, Reason: fmt.Sprintf("event format %s is not supported, only %s", mt, StructuredContentType)}
		}
	}
	if err := checkSpecVersion(version, haveVersion); err != nil {
		return nil, err
	}

	m := &Message{}
	var seen set
	var ceContentType string
	var haveCEContentType bool
	for _, h := range headers {
		if len(h.Key) <= len(prefix) || !asciiHasPrefixFold(h.Key, prefix) {
			continue
		}
		name := asciiLower(h.Key[len(prefix):])
		if name == "specversion" {
			continue // checked above
		}
		if !validAttributeName(name) {
			return nil, &DecodeError{Field: name, Reason: fmt.Sprintf("header %q: attribute names must be lower-case letters a-z and digits 0-9", h.Key)}
		}
		if !seen.add(name) {
			return nil, &DecodeError{Field: name, Reason: "appears more than once"}
		}
		v, err := b.decodeValue(h.Value)
		if err != nil {
			return nil, &DecodeError{Field: name, Reason: fmt.Sprintf("header %q", h.Key), Err: err}
		}
		switch name {
		case "id":
			m.ID = v
		case "source":
			m.Source = v
		case "type":
			m.Type = v
		case "subject":
			m.Subject = v
		case "time":
			if m.Time, err = parseTime(v); err != nil {
				return nil, err
			}
		case "datacontenttype":
			ceContentType, haveCEContentType = v, true
		case "dataschema":
			m.DataSchema = v
		case "correlationid":
			m.CorrelationID = v
		case "causationid":
			m.CausationID = v
		case "traceparent":
			m.TraceParent = v
		case "data":
			return nil, &DecodeError{Field: name, Reason: fmt.Sprintf("header %q: data travels in the body, not in a header", h.Key)}
		default:
			if m.Extensions == nil {
				m.Extensions = make(map[string]string)
			}
			m.Extensions[name] = v
		}
	}
	switch {
	case haveCEContentType && haveContentType && ceContentType != contentType:
		return nil, &DecodeError{Field: "datacontenttype", Reason: fmt.Sprintf("header %q and header %q disagree", prefix+"datacontenttype", contentTypeHeader)}
	case haveCEContentType:
		m.DataContentType = ceContentType
	case haveContentType:
		m.DataContentType = contentType
	}
	if len(body) > 0 {
		m.Data = body
	}
	if err := m.firstProblem(); err != nil {
		return nil, err
	}
	return m, nil
}

// set is a small set of attribute names: a slice while small, a map once
// there are many (a hostile message may carry thousands of headers).
type set struct {
	names []string
	m     map[string]struct{}
}

// add adds name and reports whether it was new.
func (s *set) add(name string) bool {
	if s.m != nil {
		if _, ok := s.m[name]; ok {
			return false
		}
		s.m[name] = struct{}{}
		return true
	}
	if slices.Contains(s.names, name) {
		return false
	}
	s.names = append(s.names, name)
	if len(s.names) == manyMembers {
		s.m = make(map[string]struct{}, 2*manyMembers)
		for _, n := range s.names {
			s.m[n] = struct{}{}
		}
	}
	return true
}

// isStructured reports whether a content type names a CloudEvents format,
// which marks a structured-mode message.
func isStructured(contentType string) bool {
	return asciiHasPrefixFold(strings.TrimSpace(contentType), "application/cloudevents")
}

// asciiEqualFold reports whether s and t are equal, ignoring ASCII case only.
func asciiEqualFold(s, t string) bool {
	if len(s) != len(t) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if lowerASCII(s[i]) != lowerASCII(t[i]) {
			return false
		}
	}
	return true
}

// asciiHasPrefixFold reports whether s begins with prefix, ignoring ASCII
// case only.
func asciiHasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && asciiEqualFold(s[:len(prefix)], prefix)
}

func lowerASCII(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// percentEncode encodes a NATS header value: space, '"', '%' and every byte
// outside printable ASCII become %XX (upper-case hex).
func percentEncode(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if needsPercent(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		if c := s[i]; needsPercent(c) {
			b = append(b, '%', hex[c>>4], hex[c&0xf])
		} else {
			b = append(b, c)
		}
	}
	return string(b)
}

func needsPercent(c byte) bool { return c <= ' ' || c >= 0x7f || c == '"' || c == '%' }

var (
	errBadPercent  = errors.New("broken percent-encoding")
	errBadUTF8     = errors.New("percent-encoding yields invalid UTF-8")
	errOpenQuote   = errors.New("unterminated double-quoted string")
	errQuoteEscape = errors.New("backslash at the end of a double-quoted string")
)

// percentDecode reverses percentEncode, accepting lower-case hex and bytes
// that need no encoding; the result must be valid UTF-8.
func percentDecode(s string) (string, error) {
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			b = append(b, c)
			continue
		}
		if i+2 >= len(s) {
			return "", errBadPercent
		}
		hi, ok1 := unhex(s[i+1])
		lo, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return "", errBadPercent
		}
		b = append(b, hi<<4|lo)
		i += 2
	}
	if !utf8.Valid(b) {
		return "", errBadUTF8
	}
	return string(b), nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// unquoteHeader removes the double-quoted strings of an HTTP-style header
// value (RFC 9110 quoted-string), keeping their contents: `a "b \"c\""`
// gives `a b "c"`.
func unquoteHeader(s string) (string, error) {
	b := make([]byte, 0, len(s))
	quoted := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			quoted = !quoted
		case c == '\\' && quoted:
			i++
			if i == len(s) {
				return "", errQuoteEscape
			}
			b = append(b, s[i])
		default:
			b = append(b, c)
		}
	}
	if quoted {
		return "", errOpenQuote
	}
	return string(b), nil
}
