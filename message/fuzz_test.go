package message_test

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/troupedev/troupe/message"
)

// The fuzz targets prove, for any input: decoding never panics; it fails
// only with a *DecodeError matching ErrMalformed; and whatever decodes
// encodes again, in every mode, to a message equal to the decoded one.
// FuzzDecodeJSON also proves that what decodes was UTF-8 throughout, that
// every string attribute reads as encoding/json reads it (so no byte was
// repaired into U+FFFD), and that a null "data" gives no data.
// testdata/fuzz holds their corpus, which plain `go test` runs.

func FuzzDecodeJSON(f *testing.F) {
	for _, seed := range []string{
		`{"specversion":"1.0","id":"1","source":"/s","type":"t"}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x","time":"2018-04-05T17:31:00+02:00",` +
			`"datacontenttype":"application/json","dataschema":"https://x/s.json","correlationid":"c","causationid":"k",` +
			`"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","tenant":"acme","n":5,"b":true,"z":null,` +
			`"data":{"a":[1,2,{"b":null}]}}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"h\u00e9llo\n"}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"application/octet-stream","data_base64":"AAEC/w=="}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"I'm just a string"}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/xml","data":{"not":"a string"}}`,
		`{"specversion":"0.3","id":"1","source":"/s","type":"t"}`,
		`{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}`,
		`{"specversion":"1.0","id":1,"source":"/s","type":"t","data":{},"data_base64":""}`,
		`[1, "two", {"three": 3}]`,
		``,
		`{"specversion":"1.0","id":"a` + "\xff" + `","source":"/s","type":"t"}`,
		`{"specversion":"1.0","id":"a\ud800","source":"/s","type":"t","e":"\ud83d\ude00"}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":null}`,
		`{"specversion":"1.0","id":"1","source":"/s","type":"t","data":null,"data_base64":"AA=="}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := message.DecodeJSON(in)
		// encoding/json is the reference for syntax and for the values of
		// the members the decoder splits off itself.
		var ref map[string]json.RawMessage
		refErr := json.Unmarshal(in, &ref)
		if err != nil {
			checkDecodeError(t, err)
			if refErr == nil && strings.Contains(err.Error(), "invalid JSON") {
				t.Fatalf("DecodeJSON calls valid JSON invalid: %v", err)
			}
			return
		}
		if refErr != nil {
			t.Fatalf("DecodeJSON accepted what encoding/json refuses: %v", refErr)
		}
		if !utf8.Valid(in) {
			t.Fatalf("DecodeJSON accepted input that is not UTF-8: %q", in)
		}
		for name, raw := range ref {
			got, ok := stringAttribute(m, name)
			if !ok || len(raw) == 0 || raw[0] != '"' {
				continue
			}
			var want string
			if err := json.Unmarshal(raw, &want); err != nil || got != want {
				t.Fatalf("%s = %q, encoding/json reads %q (%v)", name, got, want, err)
			}
		}
		if string(ref["data"]) == "null" && (ref["data_base64"] == nil || string(ref["data_base64"]) == "null") && m.Data != nil {
			t.Fatalf(`"data":null decoded as Data %q, want none`, m.Data)
		}
		checkReencodes(t, m)
	})
}

func FuzzDecodeBinary(f *testing.F) {
	const (
		natsHeaders  = "ce-specversion: 1.0\nce-id: 1\nce-source: /s\nce-type: t\n"
		kafkaHeaders = "ce_specversion: 1.0\nce_id: 1\nce_source: /s\nce_type: t\n"
	)
	f.Add(false, natsHeaders+"ce-time: 2018-04-05T03:56:24Z\nce-datacontenttype: application/json\nce-tenant: acme", []byte(`{"a":1}`))
	f.Add(false, natsHeaders+"ce-subject: Euro%20%E2%82%AC%20%F0%9F%98%80\nce-x: \"quoted \\\" value\"", []byte{})
	f.Add(false, natsHeaders+"Nats-Msg-Id: 1\nContent-Type: text/plain\nCE-CorrelationID: c", []byte("hello"))
	f.Add(true, kafkaHeaders+"content-type: application/octet-stream\nce_traceparent: 00-x\nce_causationid: k", []byte{0, 1, 0xff})
	f.Add(true, kafkaHeaders+"ce_subject: Euro € 😀\nce_dataschema: https://x/s.json", []byte(nil))
	f.Add(true, "content-type: application/cloudevents+json; charset=UTF-8",
		[]byte(`{"specversion":"1.0","id":"1","source":"/s","type":"t","data":[1]}`))
	f.Add(false, "content-type: application/cloudevents-batch+json", []byte(`[]`))
	f.Add(true, kafkaHeaders+"ce_id: 2\nce_my-ext: x\nce_data: x", []byte(nil))
	f.Add(true, kafkaHeaders+"ce_tenant: a\xff\ncontent-type: text/plain", []byte("b\xff"))
	f.Add(false, natsHeaders+"ce-tenant: a%FF\nce-note: \"\xed\xa0\x80\"", []byte("b\xff"))
	f.Fuzz(func(t *testing.T, kafka bool, headerBlock string, body []byte) {
		b := message.NATS
		if kafka {
			b = message.Kafka
		}
		hs := parseHeaderBlock(headerBlock)
		m, err := b.Decode(hs, body)
		if err != nil {
			checkDecodeError(t, err)
			return
		}
		checkReencodes(t, m)
	})
}

// stringAttribute returns the string attribute that the JSON member name
// sets, and false for the members that are not one.
func stringAttribute(m *message.Message, name string) (string, bool) {
	switch name {
	case "specversion", "time", "data", "data_base64":
		return "", false
	case "id":
		return m.ID, true
	case "source":
		return m.Source, true
	case "type":
		return m.Type, true
	case "subject":
		return m.Subject, true
	case "datacontenttype":
		return m.DataContentType, true
	case "dataschema":
		return m.DataSchema, true
	case "correlationid":
		return m.CorrelationID, true
	case "causationid":
		return m.CausationID, true
	case "traceparent":
		return m.TraceParent, true
	}
	v, ok := m.Extensions[name]
	return v, ok
}

// parseHeaderBlock reads fuzz input as headers: one "key: value" a line.
func parseHeaderBlock(block string) []message.Header {
	if block == "" {
		return nil
	}
	var hs []message.Header
	for line := range strings.SplitSeq(block, "\n") {
		key, value, _ := strings.Cut(line, ":")
		hs = append(hs, message.Header{Key: key, Value: strings.TrimPrefix(value, " ")})
	}
	return hs
}

func checkDecodeError(t *testing.T, err error) {
	t.Helper()
	var de *message.DecodeError
	if !errors.As(err, &de) || !errors.Is(err, message.ErrMalformed) {
		t.Fatalf("decode failed with %T %v, want a *DecodeError matching ErrMalformed", err, err)
	}
	if de.Error() == "" {
		t.Fatal("empty error message")
	}
}

// checkReencodes checks that m, just decoded, is valid and survives every
// codec: JSON, NATS and Kafka.
func checkReencodes(t *testing.T, m *message.Message) {
	t.Helper()
	if err := m.Validate(); err != nil {
		t.Fatalf("decoded message is invalid: %v\n%+v", err, m)
	}
	noLimit := message.MaxSize(math.MaxInt)

	j, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatalf("EncodeJSON of a decoded message: %v\n%+v", err, m)
	}
	got, err := message.DecodeJSON(j, noLimit)
	if err != nil {
		t.Fatalf("DecodeJSON(EncodeJSON(m)): %v\njson: %s", err, j)
	}
	if !got.Equal(m) {
		t.Fatalf("JSON round trip changed the message\n got: %+v\nwant: %+v\njson: %s", got, m, j)
	}
	if j2, _ := message.EncodeJSON(got); string(j2) != string(j) {
		t.Fatalf("EncodeJSON is not stable:\n%s\n%s", j, j2)
	}

	for _, b := range []message.Binding{message.NATS, message.Kafka} {
		hs, body, err := b.Encode(m)
		if err != nil {
			t.Fatalf("%s: Encode of a decoded message: %v\n%+v", b, err, m)
		}
		got, err := b.Decode(hs, body, noLimit)
		if err != nil {
			t.Fatalf("%s: Decode(Encode(m)): %v\nheaders: %q", b, err, hs)
		}
		if !got.Equal(m) {
			t.Fatalf("%s: round trip changed the message\n got: %+v\nwant: %+v\nheaders: %q", b, got, m, hs)
		}
	}
}
