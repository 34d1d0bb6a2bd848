package message

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"time"

	"github.com/google/uuid"
)

// SpecVersion is the CloudEvents specification version Troupe writes and accepts.
const SpecVersion = "1.0"

// Message is one CloudEvents 1.0 event: an event, a command or a reply.
//
// The required CloudEvents attributes are ID, Source and Type (specversion is
// always [SpecVersion]). Subject names the entity the message is about (an
// order id, say); brokers keep messages with the same topic and subject in
// publish order. Data is the payload, opaque to Troupe, described by
// DataContentType.
//
// CorrelationID ties every message of one business transaction together (a
// saga, or a choreographed flow); CausationID is the ID of the message that
// caused this one; TraceParent is a W3C trace context header value.
type Message struct {
	// ID identifies the message. Consumers deduplicate by it, so a retried
	// publish must reuse it. [New] sets a UUIDv7, which sorts by creation time.
	ID string
	// Source identifies the context that produced the message, such as
	// "/services/order". Required.
	Source string
	// Type is the message's stable wire name, such as "shop.order.created".
	// Never derive it from a Go type name. Required.
	Type string
	// Subject is the entity the message is about, such as an order id. It is
	// the ordering and partitioning key on brokers. Optional.
	Subject string
	// Time is when the occurrence happened. Optional; [New] sets it to now.
	Time time.Time
	// DataContentType is the media type of Data, such as "application/json".
	// Optional.
	DataContentType string
	// DataSchema is the URI of the schema Data adheres to. Optional.
	DataSchema string
	// Data is the payload.
	Data []byte

	// CorrelationID ties all messages of one business transaction together.
	CorrelationID string
	// CausationID is the ID of the message that caused this one.
	CausationID string
	// TraceParent is the W3C traceparent of the span that produced the message.
	TraceParent string

	// Extensions holds further CloudEvents extension attributes, keyed by their
	// lower-case names. The three above are not repeated here. Extension values
	// are strings; numbers and booleans read from JSON are kept as their text.
	Extensions map[string]string
}

// NewID returns a new message id: a UUIDv7 string, so ids sort by creation time.
func NewID() string {
	return uuid.Must(uuid.NewV7()).String()
}

// New returns a message with a fresh sortable ID, the given source and type,
// the current time, and data as its payload.
func New(source, typ string, data []byte) *Message {
	return &Message{
		ID:     NewID(),
		Source: source,
		Type:   typ,
		Time:   time.Now().UTC(),
		Data:   data,
	}
}

// NewJSON returns a message like [New] whose data is v encoded as JSON.
func NewJSON(source, typ string, v any) (*Message, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %s data as JSON: %w", typ, err)
	}
	m := New(source, typ, b)
	m.DataContentType = "application/json"
	return m, nil
}

// CausedBy sets m's correlation id and causation id from the message that
// caused it (a cause without a correlation id starts the transaction, so
// its own id is used), takes the cause's trace parent when m has none, and
// returns m.
func (m *Message) CausedBy(cause *Message) *Message {
	m.CausationID = cause.ID
	m.CorrelationID = cause.CorrelationID
	if m.CorrelationID == "" {
		m.CorrelationID = cause.ID
	}
	if m.TraceParent == "" {
		m.TraceParent = cause.TraceParent
	}
	return m
}

// Clone returns a deep copy of m.
func (m *Message) Clone() *Message {
	c := *m
	if m.Data != nil {
		c.Data = append([]byte(nil), m.Data...)
	}
	if m.Extensions != nil {
		c.Extensions = make(map[string]string, len(m.Extensions))
		for k, v := range m.Extensions {
			c.Extensions[k] = v
		}
	}
	return &c
}

// Equal reports whether m and o carry the same attributes and data. Times are
// compared with [time.Time.Equal], so the same instant in two time zones is
// equal; nil and empty Data are equal, and so are nil and empty Extensions.
func (m *Message) Equal(o *Message) bool {
	if m == nil || o == nil {
		return m == o
	}
	return m.ID == o.ID &&
		m.Source == o.Source &&
		m.Type == o.Type &&
		m.Subject == o.Subject &&
		m.Time.Equal(o.Time) &&
		m.DataContentType == o.DataContentType &&
		m.DataSchema == o.DataSchema &&
		bytes.Equal(m.Data, o.Data) &&
		m.CorrelationID == o.CorrelationID &&
		m.CausationID == o.CausationID &&
		m.TraceParent == o.TraceParent &&
		maps.Equal(m.Extensions, o.Extensions)
}
