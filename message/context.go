package message

import "context"

// causeKey is the context key of the message being handled.
type causeKey struct{}

// WithCause returns a context carrying m as the message being handled.
// Messages written while handling it (to an outbox, say) take their
// correlation id, causation id and trace parent from it; see [CauseFrom].
func WithCause(ctx context.Context, m *Message) context.Context {
	return context.WithValue(ctx, causeKey{}, m)
}

// CauseFrom returns the message being handled that ctx carries, or nil.
func CauseFrom(ctx context.Context) *Message {
	m, _ := ctx.Value(causeKey{}).(*Message)
	return m
}

// InheritCause sets, on each of msgs that lacks them, the correlation id,
// causation id and trace parent of the message ctx carries (see
// [WithCause]). Messages that already have a causation id are left alone.
func InheritCause(ctx context.Context, msgs ...*Message) {
	cause := CauseFrom(ctx)
	if cause == nil {
		return
	}
	for _, m := range msgs {
		if m.CausationID != "" {
			continue
		}
		corr, tp := m.CorrelationID, m.TraceParent
		m.CausedBy(cause)
		if corr != "" {
			m.CorrelationID = corr
		}
		if tp != "" {
			m.TraceParent = tp
		}
	}
}
