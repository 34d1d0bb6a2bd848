package message_test

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/message"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// roundTripCases are messages every codec must carry unchanged.
func roundTripCases() []struct {
	name string
	msg  *message.Message
} {
	at := time.Date(2025, 7, 1, 12, 30, 45, 123456789, time.UTC)
	plus2 := time.Date(2018, 4, 5, 17, 31, 0, 0, time.FixedZone("", 2*3600))
	full := &message.Message{
		ID:              "0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b",
		Source:          "/services/order",
		Type:            "shop.order.created",
		Subject:         "order-42",
		Time:            at,
		DataContentType: "application/json",
		DataSchema:      "https://schemas.example.com/order-created.json",
		Data:            []byte(`{"order":"42","total":1250,"lines":[{"sku":"tea","qty":2}]}`),
		CorrelationID:   "0197c6a1-0000-7000-8000-000000000001",
		CausationID:     "0197c6a1-0000-7000-8000-000000000002",
		TraceParent:     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		Extensions:      map[string]string{"tenant": "acme", "priority": "5", "deadletterreason": "handler said no"},
	}
	return []struct {
		name string
		msg  *message.Message
	}{
		{"every attribute", full},
		{"required attributes only", &message.Message{ID: "1", Source: "s", Type: "t"}},
		{"time with an offset", &message.Message{ID: "1", Source: "s", Type: "t", Time: plus2}},
		{"binary data", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/octet-stream", Data: []byte{0, 1, 2, 0xff, 0xfe, '\n'}}},
		{"binary data without content type", &message.Message{ID: "1", Source: "s", Type: "t",
			Data: []byte{0xde, 0xad, 0xbe, 0xef}}},
		{"JSON data without content type", &message.Message{ID: "1", Source: "s", Type: "t",
			Data: []byte(`{"a":[1,2,3]}`)}},
		{"JSON with a trailing newline", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/json", Data: []byte("{\"a\":1}\n")}},
		{"JSON content type, data not JSON", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/json", Data: []byte("not json")}},
		{"JSON string data", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/json", Data: []byte(`"I'm just a string"`)}},
		{"JSON null data", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/json", Data: []byte(`null`)}},
		{"+json suffix with parameters", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/vnd.shop.order+json; charset=utf-8", Data: []byte(`[true,false]`)}},
		{"text data", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "text/plain; charset=utf-8", Data: []byte("hello \"world\"\n\ttabs\\ and é ☕")}},
		{"XML data", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/xml", Data: []byte(`<much wow="xml"/>`)}},
		{"unicode and spaces in attributes", &message.Message{ID: " id with spaces ", Source: "/ünïcode/☕",
			Type: "t%20\"quoted\"", Subject: "100% done 😀", Extensions: map[string]string{"note": "  padded  "}}},
		{"empty extension value", &message.Message{ID: "1", Source: "s", Type: "t",
			Extensions: map[string]string{"empty": ""}}},
		{"long extension name", &message.Message{ID: "1", Source: "s", Type: "t",
			Extensions: map[string]string{"averyveryverylongextensionname42": "x"}}},
		{"content type that is a CloudEvents format", &message.Message{ID: "1", Source: "s", Type: "t",
			DataContentType: "application/cloudevents+json", Data: []byte(`{"specversion":"1.0"}`)}},
	}
}

func TestNewID_SortsByCreationOrder(t *testing.T) {
	const n = 10000
	ids := make([]string, n)
	for i := range ids {
		ids[i] = message.NewID()
	}
	for i := 1; i < n; i++ {
		if ids[i] <= ids[i-1] {
			t.Fatalf("id %d %q does not sort after id %d %q", i, ids[i], i-1, ids[i-1])
		}
	}
}

func TestNew_SetsIDTimeAndPayload(t *testing.T) {
	before := time.Now()
	m := message.New("/services/order", "shop.order.created", []byte("x"))
	if m.ID == "" || m.Source != "/services/order" || m.Type != "shop.order.created" || string(m.Data) != "x" {
		t.Fatalf("New = %+v", m)
	}
	if m.Time.Before(before.Add(-time.Second)) || m.Time.After(time.Now().Add(time.Second)) {
		t.Errorf("Time = %v, want about now", m.Time)
	}
	if err := m.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestNewJSON_EncodesDataAndSetsContentType(t *testing.T) {
	m, err := message.NewJSON("/s", "t", map[string]int{"a": 1})
	if err != nil {
		t.Fatal(err)
	}
	if m.DataContentType != "application/json" || string(m.Data) != `{"a":1}` {
		t.Fatalf("got %q %q", m.DataContentType, m.Data)
	}
	if _, err := message.NewJSON("/s", "t", make(chan int)); err == nil {
		t.Fatal("NewJSON of a channel: want an error")
	}
}

func TestCausedBy_CarriesCorrelationCausationAndTrace(t *testing.T) {
	cause := &message.Message{ID: "cmd-1", CorrelationID: "saga-7", TraceParent: "00-aa-bb-01"}
	m := (&message.Message{ID: "reply-1"}).CausedBy(cause)
	if m.CausationID != "cmd-1" || m.CorrelationID != "saga-7" || m.TraceParent != "00-aa-bb-01" {
		t.Fatalf("CausedBy = %+v", m)
	}

	// A cause that starts a transaction gives its own id as correlation id.
	first := &message.Message{ID: "order-created"}
	next := (&message.Message{ID: "reserve-credit", TraceParent: "00-own"}).CausedBy(first)
	if next.CorrelationID != "order-created" || next.CausationID != "order-created" {
		t.Errorf("CausedBy first = %+v", next)
	}
	if next.TraceParent != "00-own" {
		t.Errorf("CausedBy replaced an existing TraceParent: %q", next.TraceParent)
	}
}

func TestClone_SharesNothing(t *testing.T) {
	m := roundTripCases()[0].msg
	c := m.Clone()
	if !c.Equal(m) {
		t.Fatal("clone differs")
	}
	c.Data[0] = 'X'
	c.Extensions["tenant"] = "other"
	if m.Data[0] == 'X' || m.Extensions["tenant"] != "acme" {
		t.Fatal("changing the clone changed the original")
	}
}

func TestEqual(t *testing.T) {
	base := &message.Message{ID: "1", Source: "s", Type: "t", Time: time.Date(2025, 1, 1, 10, 0, 0, 0, time.UTC)}
	sameInstant := base.Clone()
	sameInstant.Time = base.Time.In(time.FixedZone("", 3600))
	emptyVsNil := base.Clone()
	emptyVsNil.Data, emptyVsNil.Extensions = []byte{}, map[string]string{}
	otherExt := base.Clone()
	otherExt.Extensions = map[string]string{"a": "b"}
	if !base.Equal(sameInstant) || !base.Equal(emptyVsNil) {
		t.Error("Equal is false for equal messages")
	}
	if base.Equal(otherExt) || base.Equal(nil) {
		t.Error("Equal is true for different messages")
	}
	var nilMsg *message.Message
	if !nilMsg.Equal(nil) {
		t.Error("nil does not equal nil")
	}
}

func TestValidate_ReportsEveryMissingRequiredAttributeAtOnce(t *testing.T) {
	err := (&message.Message{}).Validate()
	if !errors.Is(err, message.ErrInvalid) {
		t.Fatalf("Validate = %v, want ErrInvalid", err)
	}
	var fields []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var fe *message.FieldError
		if !errors.As(e, &fe) {
			t.Fatalf("%v is not a *FieldError", e)
		}
		fields = append(fields, fe.Field)
	}
	if want := []string{"id", "source", "type"}; !slices.Equal(fields, want) {
		t.Errorf("fields = %q, want %q", fields, want)
	}
}

func TestValidate_Rules(t *testing.T) {
	valid := func(edit func(m *message.Message)) *message.Message {
		m := &message.Message{ID: "1", Source: "s", Type: "t"}
		edit(m)
		return m
	}
	tests := []struct {
		name      string
		msg       *message.Message
		wantField string // "" for a valid message
	}{
		{"valid", valid(func(*message.Message) {}), ""},
		{"control character in subject", valid(func(m *message.Message) { m.Subject = "a\nb" }), "subject"},
		{"DEL in type", valid(func(m *message.Message) { m.Type = "a\x7f" }), "type"},
		{"C1 control in source", valid(func(m *message.Message) { m.Source = "a\u0085" }), "source"},
		{"invalid UTF-8 in id", valid(func(m *message.Message) { m.ID = "a\xffb" }), "id"},
		{"encoded surrogate in subject", valid(func(m *message.Message) { m.Subject = "\xed\xa0\x80" }), "subject"},
		{"truncated UTF-8 in dataschema", valid(func(m *message.Message) { m.DataSchema = "https://x/\xe2\x82" }), "dataschema"},
		{"invalid UTF-8 in extension value", valid(func(m *message.Message) { m.Extensions = map[string]string{"tenant": "\xc0\xaf"} }), "tenant"},
		{"noncharacter in traceparent", valid(func(m *message.Message) { m.TraceParent = "\ufffe" }), "traceparent"},
		{"year beyond 9999", valid(func(m *message.Message) { m.Time = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) }), "time"},
		{"negative year", valid(func(m *message.Message) { m.Time = time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC) }), "time"},
		{"upper-case extension name", valid(func(m *message.Message) { m.Extensions = map[string]string{"Tenant": "x"} }), "Tenant"},
		{"dash in extension name", valid(func(m *message.Message) { m.Extensions = map[string]string{"my-ext": "x"} }), "my-ext"},
		{"empty extension name", valid(func(m *message.Message) { m.Extensions = map[string]string{"": "x"} }), ""},
		{"extension named like a core attribute", valid(func(m *message.Message) { m.Extensions = map[string]string{"subject": "x"} }), "subject"},
		{"extension named data", valid(func(m *message.Message) { m.Extensions = map[string]string{"data": "x"} }), "data"},
		{"extension that has a field", valid(func(m *message.Message) { m.Extensions = map[string]string{"correlationid": "x"} }), "correlationid"},
		{"control character in extension value", valid(func(m *message.Message) { m.Extensions = map[string]string{"ok": "\x00"} }), "ok"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.msg.Validate()
			if tt.name == "valid" {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			var fe *message.FieldError
			if !errors.As(err, &fe) || !errors.Is(err, message.ErrInvalid) {
				t.Fatalf("Validate = %v, want a *FieldError", err)
			}
			if fe.Field != tt.wantField {
				t.Errorf("Field = %q, want %q (%v)", fe.Field, tt.wantField, err)
			}
			if !strings.Contains(err.Error(), fe.Reason) {
				t.Errorf("Error() %q lacks the reason %q", err, fe.Reason)
			}
		})
	}
	if err := (*message.Message)(nil).Validate(); !errors.Is(err, message.ErrInvalid) {
		t.Errorf("nil Validate = %v", err)
	}
}

func TestEncode_RefusesInvalidUTF8AttributesButNotInvalidUTF8Data(t *testing.T) {
	encoders := map[string]func(*message.Message) error{
		"json": func(m *message.Message) error { _, err := message.EncodeJSON(m); return err },
	}
	for _, b := range []message.Binding{message.NATS, message.Kafka} {
		encoders[b.String()] = func(m *message.Message) error { _, _, err := b.Encode(m); return err }
	}
	bad := &message.Message{ID: "1", Source: "s", Type: "t", Extensions: map[string]string{"tenant": "acme\xff"}}
	// Data is bytes: anything goes, whatever the content type says.
	data := &message.Message{ID: "1", Source: "s", Type: "t", DataContentType: "text/plain", Data: []byte("a\xffb")}
	for name, encode := range encoders {
		var fe *message.FieldError
		if err := encode(bad); !errors.As(err, &fe) || fe.Field != "tenant" || !strings.Contains(fe.Reason, "UTF-8") {
			t.Errorf("%s: encode of an invalid UTF-8 extension = %v, want a *FieldError for tenant", name, err)
		}
		if err := encode(data); err != nil {
			t.Errorf("%s: encode of invalid UTF-8 data = %v, want nil", name, err)
		}
	}
}
