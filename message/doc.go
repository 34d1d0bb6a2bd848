// Package message is Troupe's envelope: the [Message] every event, command
// and reply travels in, and the codecs that put it on the wire.
//
// # The envelope
//
// A Message is a CloudEvents 1.0 event. Its required attributes are id (a
// UUIDv7 from [NewID], so ids sort by creation time), source (the context
// that produced it, such as "/services/order") and type (a stable wire name,
// such as "shop.order.created", never derived from a Go type name);
// specversion is always "1.0". The optional attributes are subject (the
// entity the message is about, which brokers use as the ordering and
// partitioning key), time, datacontenttype, dataschema, and the payload,
// data, which Troupe never interprets.
//
// Three extension attributes have fields of their own, because every part of
// Troupe reads them: correlationid ties together all messages of one
// business transaction, causationid is the id of the message that caused
// this one (see [Message.CausedBy]), and traceparent carries the W3C trace
// context. Any other extension lives in [Message.Extensions]. Extension
// values are strings on the Go side.
//
// [Message.Validate] checks a message against the CloudEvents rules and
// reports every problem at once; the encoders refuse invalid messages, and
// the decoders apply the same rules, so whatever decodes also encodes.
//
// # Two modes
//
// Structured mode puts the whole message in one JSON document, media type
// [StructuredContentType]: [EncodeJSON] and [DecodeJSON]. It suits storage
// (an outbox row, an event store), HTTP bodies, and brokers without headers.
//
// Binary mode puts each attribute in a broker header and the payload, as is,
// in the body, so consumers read data without a second decoding and brokers
// can route on headers. A [Binding] maps between the two: [NATS] uses
// "ce-" header keys with percent-encoded values, [Kafka] uses "ce_" keys and
// the content-type header for datacontenttype. Headers are the neutral
// [Header] type, which each broker adapter copies to its client's own.
// [Binding.Decode] also accepts structured-mode messages, recognised by a
// content-type header of application/cloudevents+json, so consumers read
// what any conforming producer sends.
//
// # Bad input
//
// A broker delivers whatever was published, so the decoders treat input as
// hostile: they never panic, they refuse input over a size limit before
// parsing it ([DefaultMaxSize], 1 MiB, or [MaxSize]), and they report the
// first problem as a [*DecodeError] naming the attribute at fault. Every
// DecodeError matches [ErrMalformed] with errors.Is, and one for oversized
// input also matches [ErrTooLarge]; a consumer dead-letters such a message
// with the error as its reason rather than retrying it. Text is never
// repaired: an attribute that is not valid UTF-8 is refused, not given
// U+FFFD in place of its bad bytes, so two different ids cannot decode to
// one id that an inbox would then take for a duplicate.
package message
