package message_test

import (
	"context"
	"testing"

	"github.com/troupedev/troupe/message"
)

func TestInheritCause_CarriesCorrelationCausationAndTrace(t *testing.T) {
	in := message.New("/svc/customer", "shop.credit.reserve", nil)
	in.CorrelationID = "saga-1"
	in.TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := message.WithCause(context.Background(), in)
	if message.CauseFrom(ctx) != in {
		t.Fatal("CauseFrom does not return the message WithCause stored")
	}

	reply := message.New("/svc/customer", "shop.credit.reserved", nil)
	own := message.New("/svc/customer", "shop.audit", nil)
	own.CorrelationID = "audit-7"
	already := message.New("/svc/customer", "shop.other", nil)
	already.CausationID = "someone-else"
	message.InheritCause(ctx, reply, own, already)

	if reply.CausationID != in.ID || reply.CorrelationID != "saga-1" || reply.TraceParent != in.TraceParent {
		t.Errorf("reply = causation %q correlation %q trace %q, want %q %q %q",
			reply.CausationID, reply.CorrelationID, reply.TraceParent, in.ID, "saga-1", in.TraceParent)
	}
	if own.CausationID != in.ID || own.CorrelationID != "audit-7" {
		t.Errorf("a message's own correlation id was replaced: %q", own.CorrelationID)
	}
	if already.CausationID != "someone-else" || already.CorrelationID != "" {
		t.Errorf("a message with a causation id was changed: %+v", already)
	}
}

func TestInheritCause_NoCauseChangesNothing(t *testing.T) {
	m := message.New("/svc", "t", nil)
	message.InheritCause(context.Background(), m)
	if m.CausationID != "" || m.CorrelationID != "" {
		t.Errorf("message changed without a cause: %+v", m)
	}
}
