package natsjs

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalidName is returned for a topic or group name the broker cannot map
// to NATS subjects, streams and consumers.
var ErrInvalidName = errors.New("natsjs: invalid name")

// maxNameLen bounds topic and group names, so that their escaped forms fit
// the server's 255-byte limit on stream and consumer names.
const maxNameLen = 127

// checkName reports whether name is a valid topic or group: dot-separated
// non-empty tokens of ASCII letters, digits, '-' and '_', at most 127 bytes.
// These names are valid NATS subjects and also valid Kafka topics, so an
// application can move between brokers.
func checkName(kind, name string) error {
	if name == "" {
		return fmt.Errorf("%w: %s is empty", ErrInvalidName, kind)
	}
	if len(name) > maxNameLen {
		return fmt.Errorf("%w: %s %q is longer than %d bytes", ErrInvalidName, kind, name, maxNameLen)
	}
	for tok := range strings.SplitSeq(name, ".") {
		if tok == "" {
			return fmt.Errorf("%w: %s %q has an empty token (leading, trailing or double dot)", ErrInvalidName, kind, name)
		}
		for _, r := range tok {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return fmt.Errorf("%w: %s %q contains %q; use letters, digits, '-', '_' and '.'", ErrInvalidName, kind, name, r)
			}
		}
	}
	return nil
}

// escapeName turns a valid topic or group name into a stream or consumer
// name, which may not contain '.': '.' becomes '_', '_' becomes "-_", and '-'
// becomes "--". The mapping is one-to-one (read '-' as an escape), so two
// topics never share a stream: "shop.order-created" is stream
// "shop_order--created", and "shop_orders" is "shop-_orders".
func escapeName(name string) string {
	if !strings.ContainsAny(name, ".-_") {
		return name
	}
	var b strings.Builder
	b.Grow(len(name) + 8)
	for i := 0; i < len(name); i++ {
		switch c := name[i]; c {
		case '.':
			b.WriteByte('_')
		case '_':
			b.WriteString("-_")
		case '-':
			b.WriteString("--")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
