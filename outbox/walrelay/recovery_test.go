package walrelay_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox/walrelay"
)

// brokerDown is a publisher that refuses everything, as an unreachable
// broker does, and reports each refusal on failures (if set).
func brokerDown(failures chan<- struct{}) publisherFunc {
	return func(context.Context, string, ...*message.Message) error {
		if failures != nil {
			select {
			case failures <- struct{}{}:
			default:
			}
		}
		return errors.New("broker down")
	}
}

// An outbox row whose envelope does not decode, committed before the slot
// existed among good rows, is skipped and left undelivered; the good rows
// written before the slot are published all the same, in order, followed by
// those streamed after it.
func TestRelay_PublishesPreSlotRowsDespiteAnUndecodableOne(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	subs := subjects(2)
	before := d.writeNumbered(t, subs, 0, 5, 5)
	if _, err := d.db.Exec(context.Background(),
		"INSERT INTO troupe_outbox (id, topic, subject, partition, envelope, created_at) VALUES ('bad', $1, 'x', 0, '\\x7b'::bytea, now())",
		topic); err != nil {
		t.Fatal(err)
	}
	ch := make(chan string, 64)
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, Logger: slog.New(logWatch{ch})})
	c := collect(t, b)
	waitLog(t, ch, "cannot be published", 20*time.Second)
	after := d.writeNumbered(t, subs, 5, 1, 2)
	want := append(before, after...)
	sameIDs(t, c.waitCount(t, len(want), 20*time.Second), want)
	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 1 }) // the bad row, for an operator
}

// A relay that creates the slot and stops (cleanly) while the broker is
// down has published none of the rows written before the slot existed; the
// next relay, which finds the slot, publishes them before the streamed ones.
func TestRelay_PublishesPreSlotRowsAfterTheFirstRelayStoppedWithTheBrokerDown(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	subs := subjects(2)
	before := d.writeNumbered(t, subs, 0, 5, 5)
	failures := make(chan struct{}, 1)
	rr := startRelay(t, walrelay.Config{URL: d.url, Publisher: brokerDown(failures), SlotName: d.slot,
		RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	for range 3 {
		<-failures // it holds the slot and tries to publish the pre-slot rows
	}
	rr.stop(t)

	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot})
	c := collect(t, b)
	after := d.writeNumbered(t, subs, 5, 1, 2)
	want := append(before, after...)
	sameIDs(t, c.waitCount(t, len(want), 20*time.Second), want)
	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 0 })
}

// A relay restarted while the broker is down loses nothing: it confirms no
// position the broker did not acknowledge, so after the broker returns the
// next relay delivers every message, in order.
func TestRelay_RestartWhileBrokerDownLosesNothing(t *testing.T) {
	d := newTestDB(t)
	createSlotOnly(t, d) // every row comes from the WAL
	failures := make(chan struct{}, 1)
	rr := startRelay(t, walrelay.Config{URL: d.url, Publisher: brokerDown(failures), SlotName: d.slot, BatchSize: 20,
		RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond})
	subs := subjects(3)
	want := d.writeNumbered(t, subs, 0, 30, 5)
	for range 5 {
		<-failures
	}
	rr.stop(t)

	b := startNATS(t, t.TempDir(), "")
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, BatchSize: 20})
	c := collect(t, b)
	got := c.waitCount(t, len(want), 20*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, subs, 30)
}

// A message larger than the broker accepts can never be published: the
// relay logs it, leaves its row undelivered for an operator, and relays the
// rest, whether the row was written before the slot existed or streamed.
func TestRelay_SkipsAMessageTheBrokerCanNeverTakeAndRelaysTheRest(t *testing.T) {
	d := newTestDB(t)
	b := startNATS(t, t.TempDir(), "")
	huge := func(subject string) *message.Message {
		m := newMsg(subject, 0)
		m.DataContentType = "application/octet-stream"
		m.Data = bytes.Repeat([]byte{'x'}, 2<<20) // over the broker's 1 MiB payload limit
		return m
	}
	first := []*message.Message{newMsg("order-0", 0), huge("order-1"), newMsg("order-0", 1)}
	d.write(t, first...) // before the slot
	ch := make(chan string, 64)
	startRelay(t, walrelay.Config{URL: d.url, Publisher: b, SlotName: d.slot, Logger: slog.New(logWatch{ch}),
		RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	c := collect(t, b)
	waitLog(t, ch, "streaming", 20*time.Second)
	second := []*message.Message{newMsg("order-0", 2), huge("order-1"), newMsg("order-0", 3)}
	d.write(t, second...) // streamed
	third := newMsg("order-0", 4)
	d.write(t, third)
	want := []*message.Message{first[0], first[2], second[0], second[2], third}
	got := c.waitCount(t, len(want), 20*time.Second)
	sameIDs(t, got, want)
	perSubjectInOrder(t, got, []string{"order-0"}, 5)
	waitCond(t, 10*time.Second, func() bool { return d.undelivered(t) == 2 }) // the two huge rows
	waitLag(t, d, 16<<10, 20*time.Second)
}
