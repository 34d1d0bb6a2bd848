package saga_test

import (
	"errors"
	"testing"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/saga"
)

// A command keeps its saga attributes through both wire encodings.
func TestNewCommand_SurvivesTheStructuredAndBinaryEncodings(t *testing.T) {
	m, err := saga.NewCommand("/services/order", "shop.customer.reserve-credit", "saga-1", "reserve-credit", saga.Compensation, "orders.replies", map[string]int{"amount": 30})
	if err != nil {
		t.Fatal(err)
	}
	if m.Subject != "saga-1" || m.CorrelationID != "saga-1" || m.ID == "" {
		t.Fatalf("subject %q correlation %q id %q: want the saga id twice and an id", m.Subject, m.CorrelationID, m.ID)
	}
	env, err := message.EncodeJSON(m)
	if err != nil {
		t.Fatal(err)
	}
	fromJSON, err := message.DecodeJSON(env)
	if err != nil {
		t.Fatal(err)
	}
	hs, body, err := message.NATS.Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	fromBinary, err := message.NATS.Decode(hs, body)
	if err != nil {
		t.Fatal(err)
	}
	for name, got := range map[string]*message.Message{"json": fromJSON, "binary": fromBinary} {
		c, err := saga.ParseCommand(got)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.SagaID != "saga-1" || c.Step != "reserve-credit" || c.Op != saga.Compensation || c.ReplyTo != "orders.replies" {
			t.Fatalf("%s: %+v", name, c)
		}
	}
}

func TestNewCommand_RefusesMissingAttributes(t *testing.T) {
	for name, args := range map[string][3]string{
		"no saga id":  {"", "step", "replies"},
		"no step":     {"saga", "", "replies"},
		"no reply to": {"saga", "step", ""},
	} {
		if _, err := saga.NewCommand("/s", "t", args[0], args[1], saga.Action, args[2], nil); !errors.Is(err, saga.ErrNotACommand) {
			t.Errorf("%s: %v, want ErrNotACommand", name, err)
		}
	}
	if _, err := saga.NewCommand("/s", "t", "saga", "step", saga.Op(7), "replies", nil); !errors.Is(err, saga.ErrNotACommand) {
		t.Errorf("unknown op: %v, want ErrNotACommand", err)
	}
}

func TestParseReply_RefusesWhatIsNotAReply(t *testing.T) {
	good := message.New("/s", saga.ReplyType, nil)
	good.Extensions = map[string]string{saga.ExtSagaID: "s", saga.ExtStep: "st", saga.ExtOp: "action", saga.ExtOutcome: "success"}
	if r, err := saga.ParseReply(good); err != nil || r.Outcome != saga.Succeeded || r.Op != saga.Action {
		t.Fatalf("a good reply: %+v, %v", r, err)
	}
	bad := func(edit func(m *message.Message)) *message.Message {
		m := good.Clone()
		edit(m)
		return m
	}
	for name, m := range map[string]*message.Message{
		"nil":            nil,
		"other type":     bad(func(m *message.Message) { m.Type = "shop.order.created" }),
		"no saga id":     bad(func(m *message.Message) { delete(m.Extensions, saga.ExtSagaID) }),
		"unknown op":     bad(func(m *message.Message) { m.Extensions[saga.ExtOp] = "redo" }),
		"unknown result": bad(func(m *message.Message) { m.Extensions[saga.ExtOutcome] = "maybe" }),
	} {
		if _, err := saga.ParseReply(m); !errors.Is(err, saga.ErrNotAReply) {
			t.Errorf("%s: %v, want ErrNotAReply", name, err)
		}
	}
}
