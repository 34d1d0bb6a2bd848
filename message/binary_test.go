package message_test

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
)

var bindings = []message.Binding{message.NATS, message.Kafka}

func TestBinding_RoundTripKeepsEveryAttributeAndData(t *testing.T) {
	for _, b := range bindings {
		for _, tt := range roundTripCases() {
			t.Run(b.String()+"/"+tt.name, func(t *testing.T) {
				hs, body, err := b.Encode(tt.msg)
				if err != nil {
					t.Fatalf("Encode: %v", err)
				}
				got, err := b.Decode(hs, body)
				if err != nil {
					t.Fatalf("Decode(%q, %q): %v", hs, body, err)
				}
				if !got.Equal(tt.msg) {
					t.Fatalf("round trip changed the message\n got: %+v\nwant: %+v\nheaders: %q", got, tt.msg, hs)
				}
			})
		}
	}
}

func TestBinding_CrossesModesWithoutLoss(t *testing.T) {
	// A message stored as JSON (say in an outbox) and published in binary
	// mode arrives unchanged, and back again.
	for _, b := range bindings {
		for _, tt := range roundTripCases() {
			t.Run(b.String()+"/"+tt.name, func(t *testing.T) {
				j, err := message.EncodeJSON(tt.msg)
				if err != nil {
					t.Fatal(err)
				}
				fromJSON, err := message.DecodeJSON(j)
				if err != nil {
					t.Fatal(err)
				}
				hs, body, err := b.Encode(fromJSON)
				if err != nil {
					t.Fatal(err)
				}
				fromBinary, err := b.Decode(hs, body)
				if err != nil {
					t.Fatal(err)
				}
				j2, err := message.EncodeJSON(fromBinary)
				if err != nil {
					t.Fatal(err)
				}
				if !fromBinary.Equal(tt.msg) || !bytes.Equal(j, j2) {
					t.Fatalf("changed across modes\n got: %+v\nwant: %+v", fromBinary, tt.msg)
				}
			})
		}
	}
}

func TestBinding_EncodeWritesTheSpecHeaders(t *testing.T) {
	m := &message.Message{
		ID: "1234-1234-1234", Source: "/mycontext/subcontext", Type: "com.example.someevent",
		Time:            time.Date(2018, 4, 5, 3, 56, 24, 0, time.UTC),
		DataContentType: "application/json", CorrelationID: "c1",
		Extensions: map[string]string{"tenant": "acme"}, Data: []byte(`{"a":1}`),
	}
	tests := []struct {
		b    message.Binding
		want []message.Header
	}{
		{message.NATS, []message.Header{
			{Key: "ce-specversion", Value: "1.0"},
			{Key: "ce-id", Value: "1234-1234-1234"},
			{Key: "ce-source", Value: "/mycontext/subcontext"},
			{Key: "ce-type", Value: "com.example.someevent"},
			{Key: "ce-time", Value: "2018-04-05T03:56:24Z"},
			{Key: "ce-datacontenttype", Value: "application/json"},
			{Key: "ce-correlationid", Value: "c1"},
			{Key: "ce-tenant", Value: "acme"},
		}},
		{message.Kafka, []message.Header{
			{Key: "ce_specversion", Value: "1.0"},
			{Key: "ce_id", Value: "1234-1234-1234"},
			{Key: "ce_source", Value: "/mycontext/subcontext"},
			{Key: "ce_type", Value: "com.example.someevent"},
			{Key: "ce_time", Value: "2018-04-05T03:56:24Z"},
			{Key: "content-type", Value: "application/json"},
			{Key: "ce_correlationid", Value: "c1"},
			{Key: "ce_tenant", Value: "acme"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.b.String(), func(t *testing.T) {
			hs, body, err := tt.b.Encode(m)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(hs, tt.want) {
				t.Errorf("headers\n got %q\nwant %q", hs, tt.want)
			}
			if string(body) != `{"a":1}` {
				t.Errorf("body = %q", body)
			}
		})
	}
	if _, body, _ := message.Kafka.Encode(&message.Message{ID: "1", Source: "s", Type: "t"}); body != nil {
		t.Errorf("no data: body = %q, want nil (a Kafka record without value)", body)
	}
}

func TestBinding_NATSPercentEncodesValues(t *testing.T) {
	// The example of the NATS protocol binding.
	m := &message.Message{ID: "1", Source: "s", Type: "t", Subject: "Euro € 😀", Extensions: map[string]string{"x": `100% "sure"`}}
	hs, _, err := message.NATS.Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"ce-subject": "Euro%20%E2%82%AC%20%F0%9F%98%80", "ce-x": "100%25%20%22sure%22"}
	for _, h := range hs {
		if w, ok := want[h.Key]; ok && h.Value != w {
			t.Errorf("%s = %q, want %q", h.Key, h.Value, w)
		}
	}
	// Kafka carries UTF-8 as is.
	hs, _, _ = message.Kafka.Encode(m)
	if !slices.Contains(hs, message.Header{Key: "ce_subject", Value: "Euro € 😀"}) {
		t.Errorf("Kafka headers %q lack the plain subject", hs)
	}
}

func TestBinding_NATSDecodesQuotedAndLowerCaseValues(t *testing.T) {
	hs := []message.Header{
		{Key: "ce-specversion", Value: ` "1.0" `},
		{Key: "ce-id", Value: "a%2fb%2F"},
		{Key: "ce-source", Value: `"/my \"quoted\" source"`},
		{Key: "ce-type", Value: "t%C3%A9"},
		{Key: "ce-subject", Value: `"a%20b" c`},
	}
	m, err := message.NATS.Decode(hs, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := &message.Message{ID: "a/b/", Source: `/my "quoted" source`, Type: "té", Subject: "a b c"}
	if !m.Equal(want) {
		t.Errorf("got %+v, want %+v", m, want)
	}
}

func TestBinding_DecodeMatchesKeysWithoutCaseAndIgnoresForeignHeaders(t *testing.T) {
	tests := []struct {
		b  message.Binding
		hs []message.Header
	}{
		{message.NATS, []message.Header{
			{Key: "Nats-Msg-Id", Value: "dedup"},
			{Key: "CE-SpecVersion", Value: "1.0"},
			{Key: "Ce-Id", Value: "1"},
			{Key: "ce-SOURCE", Value: "s"},
			{Key: "cE-type", Value: "t"},
			{Key: "CE-Tenant", Value: "acme"},
			{Key: "Content-Type", Value: "application/json"},
			{Key: "traceparent", Value: "not an attribute"},
			{Key: "ce_id", Value: "the Kafka prefix means nothing here"},
		}},
		{message.Kafka, []message.Header{
			{Key: "CE_SPECVERSION", Value: "1.0"},
			{Key: "ce_Id", Value: "1"},
			{Key: "Ce_Source", Value: "s"},
			{Key: "ce_type", Value: "t"},
			{Key: "ce_TENANT", Value: "acme"},
			{Key: "CONTENT-TYPE", Value: "application/json"},
			{Key: "x-retry", Value: "3"},
			{Key: "ce-id", Value: "the NATS prefix means nothing here"},
		}},
	}
	want := &message.Message{ID: "1", Source: "s", Type: "t", DataContentType: "application/json",
		Extensions: map[string]string{"tenant": "acme"}, Data: []byte("{}")}
	for _, tt := range tests {
		t.Run(tt.b.String(), func(t *testing.T) {
			m, err := tt.b.Decode(tt.hs, []byte("{}"))
			if err != nil {
				t.Fatal(err)
			}
			if !m.Equal(want) {
				t.Errorf("got %+v, want %+v", m, want)
			}
		})
	}
}

func TestBinding_DecodeReadsStructuredMode(t *testing.T) {
	want := &message.Message{ID: "1", Source: "s", Type: "t", DataContentType: "text/plain", Data: []byte("hi")}
	body, err := message.EncodeJSON(want)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bindings {
		// Headers beside a structured body are ignored, as the bindings allow.
		hs := []message.Header{
			{Key: "Content-Type", Value: "application/cloudevents+json; charset=UTF-8"},
			{Key: b.Prefix() + "id", Value: "ignored"},
		}
		got, err := b.Decode(hs, body)
		if err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		if !got.Equal(want) {
			t.Errorf("%s: got %+v, want %+v", b, got, want)
		}
	}
}

func TestBinding_KafkaSendsCloudEventsContentTypeInStructuredMode(t *testing.T) {
	// In Kafka, content-type application/cloudevents... marks structured
	// mode, so a message whose data is itself an event goes structured.
	m := &message.Message{ID: "1", Source: "s", Type: "t", DataContentType: "application/cloudevents+json",
		Data: []byte(`{"specversion":"1.0","id":"inner","source":"s","type":"t"}`)}
	hs, body, err := message.Kafka.Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	if want := []message.Header{{Key: "content-type", Value: message.StructuredContentType}}; !slices.Equal(hs, want) {
		t.Fatalf("headers = %q, want %q", hs, want)
	}
	got, err := message.DecodeJSON(body)
	if err != nil || !got.Equal(m) {
		t.Fatalf("body decodes to %+v, %v", got, err)
	}
}

func TestBinding_DecodeTakesContentTypeFromEitherHeader(t *testing.T) {
	base := func(b message.Binding, extra ...message.Header) []message.Header {
		p := b.Prefix()
		return append([]message.Header{{Key: p + "specversion", Value: "1.0"}, {Key: p + "id", Value: "1"},
			{Key: p + "source", Value: "s"}, {Key: p + "type", Value: "t"}}, extra...)
	}
	for _, b := range bindings {
		for _, key := range []string{"content-type", b.Prefix() + "datacontenttype"} {
			m, err := b.Decode(base(b, message.Header{Key: key, Value: "text/csv"}), nil)
			if err != nil || m.DataContentType != "text/csv" {
				t.Errorf("%s with %s: %+v, %v", b, key, m, err)
			}
		}
		both := base(b, message.Header{Key: "content-type", Value: "text/csv"},
			message.Header{Key: b.Prefix() + "datacontenttype", Value: "text/csv"})
		if m, err := b.Decode(both, nil); err != nil || m.DataContentType != "text/csv" {
			t.Errorf("%s with both headers agreeing: %+v, %v", b, m, err)
		}
		clash := base(b, message.Header{Key: "content-type", Value: "text/csv"},
			message.Header{Key: b.Prefix() + "datacontenttype", Value: "text/plain"})
		var de *message.DecodeError
		if _, err := b.Decode(clash, nil); !errors.As(err, &de) || de.Field != "datacontenttype" {
			t.Errorf("%s with both headers disagreeing: %v, want a datacontenttype error", b, err)
		}
	}
}

func TestBinding_DecodeRejectsBadInputNamingTheField(t *testing.T) {
	valid := func(p string) []message.Header {
		return []message.Header{{Key: p + "specversion", Value: "1.0"}, {Key: p + "id", Value: "1"},
			{Key: p + "source", Value: "s"}, {Key: p + "type", Value: "t"}}
	}
	without := func(hs []message.Header, name string) []message.Header {
		return slices.DeleteFunc(hs, func(h message.Header) bool { return strings.HasSuffix(h.Key, name) })
	}
	tests := []struct {
		name      string
		only      message.Binding // 0 for both bindings
		headers   func(p string) []message.Header
		wantField string
		wantIn    string
	}{
		{"no headers", 0, func(p string) []message.Header { return nil }, "specversion", "required"},
		{"missing specversion", 0, func(p string) []message.Header { return without(valid(p), "specversion") }, "specversion", "required"},
		{"unknown specversion", 0, func(p string) []message.Header {
			return append(without(valid(p), "specversion"), message.Header{Key: p + "specversion", Value: "0.3"})
		}, "specversion", "not supported"},
		{"repeated specversion", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "SPECVERSION", Value: "1.0"})
		}, "specversion", "more than once"},
		{"missing id", 0, func(p string) []message.Header { return without(valid(p), "id") }, "id", "required"},
		{"missing type", 0, func(p string) []message.Header { return without(valid(p), "type") }, "type", "required"},
		{"repeated id, other case", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: strings.ToUpper(p) + "ID", Value: "2"})
		}, "id", "more than once"},
		{"bad time", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "time", Value: "now"})
		}, "time", "RFC 3339"},
		{"dash in extension name", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "my-ext", Value: "x"})
		}, "my-ext", "lower-case"},
		{"data as a header", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "data", Value: "x"})
		}, "data", "body"},
		{"repeated content-type", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: "content-type", Value: "a/b"}, message.Header{Key: "Content-Type", Value: "a/b"})
		}, "content-type", "more than once"},
		{"batch mode", 0, func(p string) []message.Header {
			return []message.Header{{Key: "content-type", Value: "application/cloudevents-batch+json"}}
		}, "content-type", "batch"},
		{"unsupported event format", 0, func(p string) []message.Header {
			return []message.Header{{Key: "content-type", Value: "application/cloudevents+avro"}}
		}, "content-type", "not supported"},
		{"control character", message.Kafka, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "a\r\nb"})
		}, "subject", "control character"},
		{"invalid UTF-8", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "a\xff"})
		}, "subject", "not valid UTF-8"},
		{"invalid UTF-8 in id", 0, func(p string) []message.Header {
			return append(without(valid(p), "id"), message.Header{Key: p + "id", Value: "a\xfeb"})
		}, "id", "not valid UTF-8"},
		{"encoded surrogate in an extension value", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "tenant", Value: "\xed\xa0\x80"})
		}, "tenant", "not valid UTF-8"},
		{"invalid UTF-8 in correlationid", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "correlationid", Value: "\xc0\xaf"})
		}, "correlationid", "not valid UTF-8"},
		{"invalid UTF-8 in content-type", 0, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: "content-type", Value: "text/\xff"})
		}, "datacontenttype", "not valid UTF-8"},
		{"invalid UTF-8 in a quoted value", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "\"a\xff\""})
		}, "subject", "not valid UTF-8"},
		{"percent-encoded invalid UTF-8 in an extension value", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "tenant", Value: "acme%FF"})
		}, "tenant", "UTF-8"},
		{"percent-encoded surrogate in id", message.NATS, func(p string) []message.Header {
			return append(without(valid(p), "id"), message.Header{Key: p + "id", Value: "%ED%A0%80"})
		}, "id", "UTF-8"},
		{"percent-encoded control character", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "a%0Ab"})
		}, "subject", "control character"},
		{"broken percent-encoding", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "100%"})
		}, "subject", "percent-encoding"},
		{"percent-encoded overlong UTF-8", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: "%C0%A0"})
		}, "subject", "UTF-8"},
		{"unterminated quote", message.NATS, func(p string) []message.Header {
			return append(valid(p), message.Header{Key: p + "subject", Value: `"abc`})
		}, "subject", "unterminated"},
		{"broken percent-encoding in specversion", message.NATS, func(p string) []message.Header {
			return append(without(valid(p), "specversion"), message.Header{Key: p + "specversion", Value: "1.0%"})
		}, "specversion", "percent-encoding"},
	}
	for _, tt := range tests {
		for _, b := range bindings {
			if tt.only != 0 && tt.only != b {
				continue
			}
			t.Run(b.String()+"/"+tt.name, func(t *testing.T) {
				m, err := b.Decode(tt.headers(b.Prefix()), nil)
				if err == nil {
					t.Fatalf("Decode = %+v, want an error", m)
				}
				if !errors.Is(err, message.ErrMalformed) {
					t.Errorf("errors.Is(%v, ErrMalformed) = false", err)
				}
				var de *message.DecodeError
				if !errors.As(err, &de) {
					t.Fatalf("%v is not a *DecodeError", err)
				}
				if de.Field != tt.wantField {
					t.Errorf("Field = %q, want %q (%v)", de.Field, tt.wantField, err)
				}
				if !strings.Contains(err.Error(), tt.wantIn) {
					t.Errorf("error %q does not contain %q", err, tt.wantIn)
				}
			})
		}
	}
}

func TestBinding_DecodeRefusesInputOverTheSizeLimit(t *testing.T) {
	for _, b := range bindings {
		m := &message.Message{ID: "1", Source: "s", Type: "t", Data: make([]byte, message.DefaultMaxSize)}
		hs, body, err := b.Encode(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.Decode(hs, body); !errors.Is(err, message.ErrTooLarge) || !errors.Is(err, message.ErrMalformed) {
			t.Errorf("%s: Decode over the default limit = %v, want ErrTooLarge", b, err)
		}
		// Headers count too.
		small := &message.Message{ID: "1", Source: "s", Type: "t", Extensions: map[string]string{"big": strings.Repeat("x", 100)}}
		hs, body, _ = b.Encode(small)
		if _, err := b.Decode(hs, body, message.MaxSize(100)); !errors.Is(err, message.ErrTooLarge) {
			t.Errorf("%s: Decode with 100-byte headers under MaxSize(100) = %v, want ErrTooLarge", b, err)
		}
		if _, err := b.Decode(hs, body, message.MaxSize(1000)); err != nil {
			t.Errorf("%s: Decode under MaxSize(1000) = %v", b, err)
		}
	}
}

func TestBinding_UnknownBindingIsAnErrorNotBadInput(t *testing.T) {
	var zero message.Binding
	m := &message.Message{ID: "1", Source: "s", Type: "t"}
	if _, _, err := zero.Encode(m); err == nil {
		t.Error("Encode with the zero Binding: want an error")
	}
	_, err := zero.Decode(nil, nil)
	if err == nil || errors.Is(err, message.ErrMalformed) {
		t.Errorf("Decode with the zero Binding = %v, want an error that is not ErrMalformed", err)
	}
	if _, _, err := message.NATS.Encode(&message.Message{}); !errors.Is(err, message.ErrInvalid) {
		t.Errorf("Encode of an invalid message = %v, want ErrInvalid", err)
	}
}
