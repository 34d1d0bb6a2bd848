package message_test

import (
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
)

// benchMessage is a typical saga command: all the usual attributes and a
// 200-byte JSON payload.
func benchMessage() *message.Message {
	return &message.Message{
		ID:              "0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b",
		Source:          "/services/order",
		Type:            "shop.credit.reserve",
		Subject:         "customer-1234",
		Time:            time.Date(2025, 7, 1, 12, 0, 0, 123456789, time.UTC),
		DataContentType: "application/json",
		Data: []byte(`{"orderId":"0197c6a1-0000-7000-8000-000000000042","customerId":"customer-1234",` +
			`"amount":{"value":125000,"currency":"EUR"},"lines":[{"sku":"tea-001","qty":2},{"sku":"cup-007","qty":1}]}`),
		CorrelationID: "0197c6a1-0000-7000-8000-000000000001",
		CausationID:   "0197c6a1-0000-7000-8000-000000000002",
		TraceParent:   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		Extensions:    map[string]string{"tenant": "acme"},
	}
}

func BenchmarkEncodeJSON(b *testing.B) {
	m := benchMessage()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := message.EncodeJSON(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeJSON(b *testing.B) {
	in, err := message.EncodeJSON(benchMessage())
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := message.DecodeJSON(in); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeBinary(b *testing.B) {
	m := benchMessage()
	for _, bd := range []message.Binding{message.NATS, message.Kafka} {
		b.Run(bd.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := bd.Encode(m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeBinary(b *testing.B) {
	for _, bd := range []message.Binding{message.NATS, message.Kafka} {
		hs, body, err := bd.Encode(benchMessage())
		if err != nil {
			b.Fatal(err)
		}
		b.Run(bd.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := bd.Decode(hs, body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
