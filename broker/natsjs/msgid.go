package natsjs

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"strings"

	"github.com/troupedev/troupe/message"
)

// The server drops a message whose Nats-Msg-Id it has already stored in the
// same stream within the stream's dedup window. CloudEvents only promises
// that (source, id) is unique, and a stream can hold several topics (one an
// operator made for "shop.>"), so the dedup id names the topic, the id and
// the source; dead letters also name the topic they were consumed from and
// the group that gave up. The ids are readable, so that an operator can
// tell what a stored message is from its Nats-Msg-Id:
//
//	shop.orders:9b2e…@/services/order                         a message
//	shop.orders.dlq:9b2e…@/services/order;from=shop.orders;group=billing
//	shop.orders.dlq:stream=shop_orders;seq=42;from=shop.orders;group=billing
//
// The last form is the dead letter of a message that could not be decoded,
// named by its place in its stream. Topics and groups cannot contain ':',
// '@' or ';', and the id and source are escaped so that they contain neither
// '@' nor ';', so the three forms never collide.

// maxIDPart bounds the id and the source as written in a dedup id. A longer
// one (once escaped) is written as its digest, so that dedup ids stay short
// however long the attributes: "sha256:" and the first 16 bytes of its
// SHA-256 in hex.
const maxIDPart = 64

// digestPrefix starts a digest in a dedup id. An attribute that itself
// starts with it is written with its ':' escaped.
const digestPrefix = "sha256:"

// msgID returns the dedup id of m published to topic: "<topic>:<id>@<source>".
// It depends on nothing else, so a retried publish of the same message has
// the same dedup id and is dropped.
func msgID(topic string, m *message.Message) string {
	id, source := idPart(m.ID), idPart(m.Source)
	var b strings.Builder
	b.Grow(len(topic) + 1 + len(id) + 1 + len(source))
	b.WriteString(topic)
	b.WriteByte(':')
	b.WriteString(id)
	b.WriteByte('@')
	b.WriteString(source)
	return b.String()
}

// deadLetterMsgID returns the dedup id of the dead letter, published to
// dlqTopic, of m that group gave up on when consuming topic:
// "<dlqTopic>:<id>@<source>;from=<topic>;group=<group>". Each group leaves
// one dead letter per message and topic, even when it dead-letters the
// message again because its termination did not reach the server.
func deadLetterMsgID(dlqTopic, topic, group string, m *message.Message) string {
	return msgID(dlqTopic, m) + ";from=" + topic + ";group=" + group
}

// rawDeadLetterMsgID returns the dedup id of the dead letter of a message
// that could not be decoded, named by its stream and sequence:
// "<dlqTopic>:stream=<stream>;seq=<seq>;from=<topic>;group=<group>".
func rawDeadLetterMsgID(dlqTopic, stream string, seq uint64, topic, group string) string {
	return dlqTopic + ":stream=" + stream + ";seq=" + strconv.FormatUint(seq, 10) + ";from=" + topic + ";group=" + group
}

// idPart returns s as written in a dedup id: percent-escaped like the NATS
// binding's header values (controls, space, non-ASCII, '"' and '%'), plus
// '@' and ';', which separate the parts; or its digest when that is longer
// than maxIDPart bytes.
func idPart(s string) string {
	n := 0 // bytes to escape
	for i := 0; i < len(s); i++ {
		if escapeInID(s[i]) {
			n++
		}
	}
	looksLikeDigest := strings.HasPrefix(s, digestPrefix)
	if looksLikeDigest {
		n++ // its ':'
	}
	if len(s)+2*n > maxIDPart {
		sum := sha256.Sum256([]byte(s))
		return digestPrefix + hex.EncodeToString(sum[:16])
	}
	if n == 0 {
		return s
	}
	const hexDigits = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case escapeInID(c), looksLikeDigest && i == len(digestPrefix)-1:
			b = append(b, '%', hexDigits[c>>4], hexDigits[c&15])
		default:
			b = append(b, c)
		}
	}
	return string(b)
}

// escapeInID reports whether idPart escapes c.
func escapeInID(c byte) bool {
	return c <= ' ' || c >= 0x7f || c == '"' || c == '%' || c == '@' || c == ';'
}
