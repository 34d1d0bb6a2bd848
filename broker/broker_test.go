package broker_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestSubscribeConfig_DefaultsFillOnlyUnsetFields(t *testing.T) {
	got := broker.SubscribeConfig{Topic: "shop.orders", Group: "billing", MaxDeliver: 9}.WithDefaults()
	want := broker.SubscribeConfig{
		Topic: "shop.orders", Group: "billing", MaxBatch: 100, AckWait: 30 * time.Second,
		NakDelay: time.Second, MaxDeliver: 9, DeadLetterTopic: "shop.orders.dlq",
	}
	if got != want {
		t.Errorf("WithDefaults = %+v, want %+v", got, want)
	}
}

func TestSubscribeConfig_ValidateReportsEveryProblem(t *testing.T) {
	err := broker.SubscribeConfig{DeadLetterTopic: ""}.Validate()
	for _, w := range []string{"Topic is required", "Group is required"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("Validate() = %v, want it to say %q", err, w)
		}
	}
	if err := (broker.SubscribeConfig{Topic: "t", Group: "g", DeadLetterTopic: "t"}).Validate(); err == nil {
		t.Error("Validate accepted a dead-letter topic equal to the topic")
	}
	if err := (broker.SubscribeConfig{Topic: "t", Group: "g"}).Validate(); err != nil {
		t.Errorf("Validate(valid) = %v", err)
	}
}

func TestDeadLetterMessage_CarriesReasonAndLeavesOriginalAlone(t *testing.T) {
	m := message.New("/s", "t", []byte("x"))
	m.Extensions = map[string]string{"tenant": "acme"}
	d := &broker.Delivery{Msg: m, Topic: "shop.orders", Attempt: 3}
	dl := broker.DeadLetterMessage(d, "billing", "bad input")
	want := map[string]string{
		"tenant":                     "acme",
		broker.ExtDeadLetterReason:   "bad input",
		broker.ExtDeadLetterTopic:    "shop.orders",
		broker.ExtDeadLetterGroup:    "billing",
		broker.ExtDeadLetterAttempts: "3",
	}
	for k, v := range want {
		if dl.Extensions[k] != v {
			t.Errorf("dead letter extension %s = %q, want %q", k, dl.Extensions[k], v)
		}
	}
	if dl.ID != m.ID {
		t.Errorf("dead letter id %q, want the original's %q", dl.ID, m.ID)
	}
	if len(m.Extensions) != 1 {
		t.Errorf("original message changed: %v", m.Extensions)
	}
}

func TestDelivery_SettlementIsTheLastCall(t *testing.T) {
	d := &broker.Delivery{}
	if s, _, _ := d.Settlement(); s != broker.Unsettled {
		t.Fatalf("new delivery settled as %v", s)
	}
	d.Nak(time.Minute)
	d.DeadLetter("poison")
	if s, _, reason := d.Settlement(); s != broker.DeadLettered || reason != "poison" {
		t.Errorf("Settlement = %v %q, want deadlettered \"poison\"", s, reason)
	}
	d.Nak(2 * time.Second)
	if s, delay, _ := d.Settlement(); s != broker.Naked || delay != 2*time.Second {
		t.Errorf("Settlement = %v %v, want naked 2s", s, delay)
	}
}

func TestPublishError_NamesFirstFailureAndUnwraps(t *testing.T) {
	errA, errB := errors.New("a"), errors.New("b")
	err := error(&broker.PublishError{Topic: "t", Failed: map[int]error{5: errB, 2: errA}, Total: 10})
	if got := err.Error(); !strings.Contains(got, "2 of 10") || !strings.Contains(got, "message 2: a") {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(err, errA) || !errors.Is(err, errB) {
		t.Error("errors.Is does not see the per-message errors")
	}
}
