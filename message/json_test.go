package message_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
)

func TestJSON_RoundTripKeepsEveryAttributeAndDataByteForByte(t *testing.T) {
	for _, tt := range roundTripCases() {
		t.Run(tt.name, func(t *testing.T) {
			b, err := message.EncodeJSON(tt.msg)
			if err != nil {
				t.Fatalf("EncodeJSON: %v", err)
			}
			if !json.Valid(b) {
				t.Fatalf("EncodeJSON wrote invalid JSON: %s", b)
			}
			got, err := message.DecodeJSON(b)
			if err != nil {
				t.Fatalf("DecodeJSON(%s): %v", b, err)
			}
			if !got.Equal(tt.msg) {
				t.Fatalf("round trip changed the message\n got: %+v\nwant: %+v\njson: %s", got, tt.msg, b)
			}
		})
	}
}

func TestEncodeJSON_ChoosesTheDataMember(t *testing.T) {
	tests := []struct {
		name, contentType string
		data              string
		want              string // the payload member as written
	}{
		{"JSON embedded", "application/json", `{"a":1}`, `"data":{"a":1}`},
		{"JSON content type with parameters", "Application/JSON; charset=utf-8", `[1]`, `"data":[1]`},
		{"+json suffix", "application/cloudevents+json", `{}`, `"data":{}`},
		{"absent content type, JSON data", "", `{"a":1}`, `"data":{"a":1}`},
		{"absent content type, other data", "", "plain", `"data_base64":"cGxhaW4="`},
		{"JSON content type, invalid JSON", "application/json", `{"a":`, `"data_base64":"eyJhIjo="`},
		{"JSON with surrounding space", "application/json", " {} ", `"data_base64":"IHt9IA=="`},
		{"JSON with invalid UTF-8", "application/json", "\"\xff\"", `"data_base64":"Iv8i"`},
		{"JSON null, which would read as no data", "application/json", "null", `"data_base64":"bnVsbA=="`},
		{"JSON null, no content type", "", "null", `"data_base64":"bnVsbA=="`},
		{"text null", "text/plain", "null", `"data":"null"`},
		{"text as a string", "text/plain", "a \"b\"\n", `"data":"a \"b\"\n"`},
		{"text with invalid UTF-8", "text/plain", "a\xff", `"data_base64":"Yf8="`},
		{"binary", "application/octet-stream", "\x00\x01", `"data_base64":"AAE="`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &message.Message{ID: "1", Source: "s", Type: "t", DataContentType: tt.contentType, Data: []byte(tt.data)}
			b, err := message.EncodeJSON(m)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte(tt.want)) {
				t.Errorf("EncodeJSON = %s, want it to contain %s", b, tt.want)
			}
		})
	}
}

func TestEncodeJSON_WritesFixedOrderAndRFC3339Time(t *testing.T) {
	m := &message.Message{
		ID: "1", Source: "/s", Type: "t", Subject: "sub",
		Time:          time.Date(2018, 4, 5, 17, 31, 0, 500000000, time.FixedZone("", -7*3600)),
		CorrelationID: "c", Extensions: map[string]string{"zeta": "z", "alpha": "<&>"},
	}
	b, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"sub",` +
		`"time":"2018-04-05T17:31:00.5-07:00","correlationid":"c","alpha":"<&>","zeta":"z"}`
	if string(b) != want {
		t.Errorf("EncodeJSON =\n%s\nwant\n%s", b, want)
	}
}

func TestEncodeJSON_WritesOffsetsWithSecondsInUTC(t *testing.T) {
	// A zone offset of +00:00:30 cannot be written in RFC 3339.
	at := time.Date(2025, 1, 1, 0, 0, 30, 0, time.FixedZone("odd", 30))
	m := &message.Message{ID: "1", Source: "s", Type: "t", Time: at}
	b, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"time":"2025-01-01T00:00:00Z"`)) {
		t.Errorf("EncodeJSON = %s", b)
	}
	got, err := message.DecodeJSON(b)
	if err != nil || !got.Time.Equal(at) {
		t.Errorf("decoded time %v, %v; want %v", got.Time, err, at)
	}
}

func TestEncodeJSON_RefusesInvalidMessages(t *testing.T) {
	_, err := message.EncodeJSON(&message.Message{ID: "1"})
	if !errors.Is(err, message.ErrInvalid) {
		t.Fatalf("EncodeJSON = %v, want ErrInvalid", err)
	}
	for _, field := range []string{`"source"`, `"type"`} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error %q does not name %s", err, field)
		}
	}
	if _, err := message.EncodeJSON(nil); !errors.Is(err, message.ErrInvalid) {
		t.Errorf("EncodeJSON(nil) = %v, want ErrInvalid", err)
	}
}

// The examples of the CloudEvents JSON format specification, section 3.2.
func TestDecodeJSON_SpecExamples(t *testing.T) {
	at := time.Date(2018, 4, 5, 17, 31, 0, 0, time.UTC)
	ext := map[string]string{"comexampleextension1": "value", "comexampleothervalue": "5"}
	tests := []struct {
		name string
		in   string
		want *message.Message
	}{
		{"binary data", `{
			"specversion" : "1.0",
			"type" : "com.example.someevent",
			"source" : "/mycontext",
			"id" : "A234-1234-1234",
			"time" : "2018-04-05T17:31:00Z",
			"comexampleextension1" : "value",
			"comexampleothervalue" : 5,
			"datacontenttype" : "application/vnd.apache.thrift.binary",
			"data_base64" : "AAECAw=="
		}`, &message.Message{ID: "A234-1234-1234", Source: "/mycontext", Type: "com.example.someevent", Time: at,
			DataContentType: "application/vnd.apache.thrift.binary", Data: []byte{0, 1, 2, 3}, Extensions: ext}},
		{"XML string data", `{
			"specversion" : "1.0",
			"type" : "com.example.someevent",
			"source" : "/mycontext",
			"id" : "B234-1234-1234",
			"time" : "2018-04-05T17:31:00Z",
			"comexampleextension1" : "value",
			"comexampleothervalue" : 5,
			"unsetextension": null,
			"datacontenttype" : "application/xml",
			"data" : "<much wow=\"xml\"/>"
		}`, &message.Message{ID: "B234-1234-1234", Source: "/mycontext", Type: "com.example.someevent", Time: at,
			DataContentType: "application/xml", Data: []byte(`<much wow="xml"/>`), Extensions: ext}},
		{"JSON object data", `{
			"specversion" : "1.0",
			"type" : "com.example.someevent",
			"source" : "/mycontext",
			"subject": null,
			"id" : "C234-1234-1234",
			"time" : "2018-04-05T17:31:00Z",
			"comexampleextension1" : "value",
			"comexampleothervalue" : 5,
			"datacontenttype" : "application/json",
			"data" : {
				"appinfoA" : "abc",
				"appinfoB" : 123,
				"appinfoC" : true
			}
		}`, &message.Message{ID: "C234-1234-1234", Source: "/mycontext", Type: "com.example.someevent", Time: at,
			DataContentType: "application/json", Extensions: ext,
			Data: []byte("{\n\t\t\t\t\"appinfoA\" : \"abc\",\n\t\t\t\t\"appinfoB\" : 123,\n\t\t\t\t\"appinfoC\" : true\n\t\t\t}")}},
		{"JSON string data, no content type", `{
			"specversion" : "1.0",
			"type" : "com.example.someevent",
			"source" : "/mycontext",
			"subject": null,
			"id" : "D234-1234-1234",
			"time" : "2018-04-05T17:31:00Z",
			"comexampleextension1" : "value",
			"comexampleothervalue" : 5,
			"data" : "I'm just a string"
		}`, &message.Message{ID: "D234-1234-1234", Source: "/mycontext", Type: "com.example.someevent", Time: at,
			Data: []byte(`"I'm just a string"`), Extensions: ext}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := message.DecodeJSON([]byte(tt.in))
			if err != nil {
				t.Fatalf("DecodeJSON: %v", err)
			}
			if !got.Equal(tt.want) {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestDecodeJSON_ReadsExtensionsAndNulls(t *testing.T) {
	in := `{"specversion":"1.0","id":"1","source":"s","type":"t",
		"correlationid":"c","causationid":null,"traceparent":"00-x",
		"flag":true,"off":false,"n":-1.5e3,"gone":null,"time":null,"data_base64":null,"data":null}`
	got, err := message.DecodeJSON([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := &message.Message{ID: "1", Source: "s", Type: "t", CorrelationID: "c", TraceParent: "00-x",
		Extensions: map[string]string{"flag": "true", "off": "false", "n": "-1.5e3"}}
	if !got.Equal(want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

func TestDecodeJSON_RejectsBadInputNamingTheField(t *testing.T) {
	const head = `"specversion":"1.0","id":"1","source":"s","type":"t"`
	tests := []struct {
		name      string
		in        string
		wantField string
		wantIn    string // a fragment of the error message
	}{
		{"empty input", ``, "", "empty input"},
		{"not JSON", `hello`, "", "invalid JSON"},
		{"array", `[{}]`, "", "got array"},
		{"string", `"x"`, "", "got string"},
		{"null", `null`, "", "got null"},
		{"truncated", `{"specversion":"1.0"`, "", "invalid JSON"},
		{"trailing data", `{` + head + `} {}`, "", "after top-level value"},
		{"trailing garbage", `{` + head + `}x`, "", "after top-level value"},
		{"whitespace only", " \n\t", "", "empty input"},
		{"missing specversion", `{"id":"1","source":"s","type":"t"}`, "specversion", "required"},
		{"unknown specversion", `{"specversion":"0.3","id":"1","source":"s","type":"t"}`, "specversion", `"0.3" is not supported`},
		{"numeric specversion", `{"specversion":1.0,"id":"1","source":"s","type":"t"}`, "specversion", "must be a JSON string, got number"},
		{"missing id", `{"specversion":"1.0","source":"s","type":"t"}`, "id", "required"},
		{"empty source", `{"specversion":"1.0","id":"1","source":"","type":"t"}`, "source", "required"},
		{"null type", `{"specversion":"1.0","id":"1","source":"s","type":null}`, "type", "required"},
		{"numeric id", `{"specversion":"1.0","id":1,"source":"s","type":"t"}`, "id", "got number"},
		{"object subject", `{` + head + `,"subject":{}}`, "subject", "got object"},
		{"bad time", `{` + head + `,"time":"yesterday"}`, "time", "RFC 3339"},
		{"empty time", `{` + head + `,"time":""}`, "time", "RFC 3339"},
		{"numeric time", `{` + head + `,"time":1700000000}`, "time", "got number"},
		{"data and data_base64", `{` + head + `,"data":{},"data_base64":"AA=="}`, "data", "both present"},
		{"bad base64", `{` + head + `,"data_base64":"!!"}`, "data_base64", "base64"},
		{"numeric data_base64", `{` + head + `,"data_base64":5}`, "data_base64", "got number"},
		{"repeated id", `{` + head + `,"id":"2"}`, "id", "more than once"},
		{"upper-case extension", `{` + head + `,"Tenant":"x"}`, "Tenant", "lower-case"},
		{"dashed extension", `{` + head + `,"my-ext":"x"}`, "my-ext", "lower-case"},
		{"object extension", `{` + head + `,"ext":{"a":1}}`, "ext", "string, number or boolean"},
		{"array extension", `{` + head + `,"ext":[]}`, "ext", "got array"},
		{"control character", `{` + head + `,"subject":"a\u0000b"}`, "subject", "control character"},
		{"control character in extension", `{` + head + `,"ext":"a\nb"}`, "ext", "control character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := message.DecodeJSON([]byte(tt.in))
			if err == nil {
				t.Fatalf("DecodeJSON = %+v, want an error", m)
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
			if tt.wantField != "" && !strings.Contains(err.Error(), `field "`+tt.wantField+`"`) {
				t.Errorf("error %q does not name the field", err)
			}
		})
	}
}

func TestDecodeJSON_RefusesInputOverTheSizeLimit(t *testing.T) {
	m := &message.Message{ID: "1", Source: "s", Type: "t", Data: bytes.Repeat([]byte("x"), message.DefaultMaxSize)}
	b, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	_, err = message.DecodeJSON(b)
	if !errors.Is(err, message.ErrTooLarge) || !errors.Is(err, message.ErrMalformed) {
		t.Fatalf("DecodeJSON of %d bytes = %v, want ErrTooLarge", len(b), err)
	}
	if got, err := message.DecodeJSON(b, message.MaxSize(len(b))); err != nil || !got.Equal(m) {
		t.Fatalf("DecodeJSON with MaxSize(len) = %v", err)
	}
	small, _ := message.EncodeJSON(&message.Message{ID: "1", Source: "s", Type: "t"})
	if _, err := message.DecodeJSON(small, message.MaxSize(len(small)-1)); !errors.Is(err, message.ErrTooLarge) {
		t.Fatalf("DecodeJSON over MaxSize = %v, want ErrTooLarge", err)
	}
	if _, err := message.DecodeJSON(small, message.MaxSize(0), nil); err != nil {
		t.Fatalf("MaxSize(0) and a nil option should keep the default: %v", err)
	}
}

func TestDecodeJSON_FindsARepeatedMemberAmongManyQuickly(t *testing.T) {
	// A hostile envelope with 50k members must not cost a comparison of
	// every pair, and the repeat at the end must still be found.
	var b strings.Builder
	b.WriteString(`{"specversion":"1.0","id":"1","source":"s","type":"t"`)
	for i := range 50000 {
		b.WriteString(`,"e` + strconv.Itoa(i) + `":"v"`)
	}
	b.WriteString(`,"e0":"again"}`)
	start := time.Now()
	_, err := message.DecodeJSON([]byte(b.String()))
	var de *message.DecodeError
	if !errors.As(err, &de) || de.Field != "e0" {
		t.Fatalf("DecodeJSON = %v, want a repeated e0", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("DecodeJSON of 50k members took %v", d)
	}
}

func TestDecodeJSON_NullDataIsNoData(t *testing.T) {
	const head = `"specversion":"1.0","id":"1","source":"s","type":"t"`
	tests := []struct {
		name string
		in   string
		want []byte
	}{
		{"JSON content type", `{` + head + `,"datacontenttype":"application/json","data":null}`, nil},
		{"no content type", `{` + head + `,"data":null}`, nil},
		{"text content type", `{` + head + `,"datacontenttype":"text/plain","data":null}`, nil},
		{"binary content type", `{` + head + `,"datacontenttype":"application/octet-stream","data":null}`, nil},
		{"both null", `{` + head + `,"data":null,"data_base64":null}`, nil},
		{"null data before data_base64", `{` + head + `,"data":null,"data_base64":"AAE="}`, []byte{0, 1}},
		{"null data after data_base64", `{` + head + `,"data_base64":"AAE=","data" : null }`, []byte{0, 1}},
		{"null data_base64 next to data", `{` + head + `,"data_base64":null,"data":[1]}`, []byte("[1]")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := message.DecodeJSON([]byte(tt.in))
			if err != nil {
				t.Fatalf("DecodeJSON: %v", err)
			}
			if !bytes.Equal(m.Data, tt.want) || (tt.want == nil && m.Data != nil) {
				t.Fatalf("Data = %q, want %q", m.Data, tt.want)
			}
			b, err := message.EncodeJSON(m)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == nil && (bytes.Contains(b, []byte(`"data":`)) || bytes.Contains(b, []byte(`"data_base64":`))) {
				t.Errorf("re-encoded with a payload member: %s", b)
			}
		})
	}
}

func TestDecodeJSON_RejectsInvalidUTF8RatherThanRepairingIt(t *testing.T) {
	const head = `"specversion":"1.0","id":"1","source":"s","type":"t"`
	tests := []struct {
		name      string
		in        string
		wantField string
		wantIn    string
	}{
		{"raw byte in id", `{"specversion":"1.0","id":"a` + "\xff" + `b","source":"s","type":"t"}`, "id", "not valid UTF-8 at byte 1"},
		{"raw byte in source", `{"specversion":"1.0","id":"1","source":"` + "\xc3" + `","type":"t"}`, "source", "not valid UTF-8"},
		{"raw byte in type", `{"specversion":"1.0","id":"1","source":"s","type":"` + "\x80" + `"}`, "type", "not valid UTF-8"},
		{"encoded surrogate in subject", `{` + head + `,"subject":"` + "\xed\xa0\x80" + `"}`, "subject", "not valid UTF-8"},
		{"overlong encoding in datacontenttype", `{` + head + `,"datacontenttype":"` + "\xc0\xaf" + `"}`, "datacontenttype", "not valid UTF-8"},
		{"raw byte in dataschema", `{` + head + `,"dataschema":"` + "\xfe" + `"}`, "dataschema", "not valid UTF-8"},
		{"raw byte in correlationid", `{` + head + `,"correlationid":"` + "\xff" + `"}`, "correlationid", "not valid UTF-8"},
		{"raw byte in causationid", `{` + head + `,"causationid":"` + "\xff" + `"}`, "causationid", "not valid UTF-8"},
		{"raw byte in traceparent", `{` + head + `,"traceparent":"` + "\xff" + `"}`, "traceparent", "not valid UTF-8"},
		{"raw byte in time", `{` + head + `,"time":"` + "\xff" + `"}`, "time", "not valid UTF-8"},
		{"raw byte in specversion", `{"specversion":"1.0` + "\xff" + `","id":"1","source":"s","type":"t"}`, "specversion", "not valid UTF-8"},
		{"raw byte in extension value", `{` + head + `,"tenant":"` + "\xff" + `"}`, "tenant", "not valid UTF-8"},
		{"raw byte next to escapes", `{` + head + `,"tenant":"\n\"` + "\xff" + `\u00e9"}`, "tenant", "not valid UTF-8 at byte 4"},
		{"raw byte in an escaped member name's value", `{` + head + `,"\u0074enant":"` + "\xff" + `"}`, "tenant", "not valid UTF-8"},
		{"lone high surrogate", `{` + head + `,"tenant":"a\ud800b"}`, "tenant", `unpaired surrogate \ud800`},
		{"lone low surrogate", `{` + head + `,"tenant":"\udc00"}`, "tenant", `unpaired surrogate \udc00`},
		{"high surrogate at the end", `{` + head + `,"subject":"x\ud83d"}`, "subject", `unpaired surrogate \ud83d`},
		{"high surrogate before a non-surrogate escape", `{` + head + `,"subject":"\ud83d\u0041"}`, "subject", `unpaired surrogate \ud83d`},
		{"two high surrogates", `{` + head + `,"subject":"\ud83d\ud83d"}`, "subject", `unpaired surrogate \ud83d`},
		{"surrogates in the wrong order", `{` + head + `,"subject":"\ude00\ud83d"}`, "subject", `unpaired surrogate \ude00`},
		{"lone surrogate in id", `{"specversion":"1.0","id":"\uDFFF","source":"s","type":"t"}`, "id", `unpaired surrogate \udfff`},
		{"raw byte in a member name", `{` + head + `,"ext` + "\xff" + `":"x"}`, "", `member name "ext\xff" is not valid UTF-8`},
		{"lone surrogate in a member name", `{` + head + `,"ext\ud800":"x"}`, "", `member name "ext\\ud800" contains the unpaired surrogate`},
		{"raw byte in text data", `{` + head + `,"datacontenttype":"text/plain","data":"a` + "\xff" + `"}`, "data", "not valid UTF-8"},
		{"lone surrogate in text data", `{` + head + `,"datacontenttype":"text/plain","data":"\ud800"}`, "data", "unpaired surrogate"},
		{"raw byte in JSON data", `{` + head + `,"datacontenttype":"application/json","data":{"a":"` + "\xff" + `"}}`, "data", "not valid UTF-8 at byte 6"},
		{"raw byte in JSON data, no content type", `{` + head + `,"data":["` + "\xff" + `"]}`, "data", "not valid UTF-8"},
		{"raw byte in non-string data of another type", `{` + head + `,"datacontenttype":"application/xml","data":["` + "\xff" + `"]}`, "data", "not valid UTF-8"},
		{"raw byte in data_base64", `{` + head + `,"data_base64":"AA` + "\xff" + `"}`, "data_base64", "not valid UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := message.DecodeJSON([]byte(tt.in))
			if err == nil {
				t.Fatalf("DecodeJSON = %+v, want an error", m)
			}
			var de *message.DecodeError
			if !errors.As(err, &de) || !errors.Is(err, message.ErrMalformed) {
				t.Fatalf("DecodeJSON = %v, want a *DecodeError matching ErrMalformed", err)
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

func TestDecodeJSON_NeverDecodesTwoDifferentIDsToOne(t *testing.T) {
	// encoding/json reads every one of these ids as "a\ufffdb"; only the
	// two that truly spell U+FFFD may decode, and they decode alike.
	ids := map[string]bool{ // JSON text of the id -> whether it is valid
		`"a` + "\xff" + `b"`:         false,
		`"a` + "\xfe" + `b"`:         false,
		`"a` + "\xed\xa0\x80" + `b"`: false, // an encoded surrogate
		`"a\ud800b"`:                 false,
		`"a\udc00b"`:                 false,
		`"a\ufffdb"`:                 true,
		`"a` + "\ufffd" + `b"`:       true,
	}
	for id, valid := range ids {
		m, err := message.DecodeJSON([]byte(`{"specversion":"1.0","id":` + id + `,"source":"s","type":"t"}`))
		switch {
		case valid && err != nil:
			t.Errorf("id %q: DecodeJSON = %v", id, err)
		case valid && m.ID != "a\ufffdb":
			t.Errorf("id %q decoded as %q", id, m.ID)
		case !valid && err == nil:
			t.Errorf("id %q decoded as %q, want it refused", id, m.ID)
		}
	}
}

func TestDecodeJSON_KeepsJSONDataVerbatimEscapesIncluded(t *testing.T) {
	// Data is opaque: an escape encoding/json would repair is kept as
	// written, and valid surrogate pairs in attributes are decoded.
	in := `{"specversion":"1.0","id":"1","source":"s","type":"t","subject":"\ud83d\ude00 \ufffd \/",` +
		`"datacontenttype":"application/json","data":{"a":"\ud800"}}`
	m, err := message.DecodeJSON([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if m.Subject != "😀 \ufffd /" {
		t.Errorf("Subject = %q", m.Subject)
	}
	if string(m.Data) != `{"a":"\ud800"}` {
		t.Errorf("Data = %q", m.Data)
	}
	b, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"data":{"a":"\ud800"}`)) {
		t.Errorf("EncodeJSON = %s, want the data embedded as it was", b)
	}
}
