package natsjs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// publishWindow is how many asynchronous publishes a batch keeps
// outstanding before it waits for their acknowledgements.
const publishWindow = 1024

// Publish sends msgs to topic's subject in binary mode (the CloudEvents NATS
// binding: attributes in "ce-" headers, data as the body) and returns once
// the server has stored every one. The Nats-Msg-Id header carries the
// topic, the message's id and its source ("shop.orders:<id>@<source>"; see
// the package documentation), so the server drops a message re-published
// to the same topic within Config.DedupWindow, and only such a message: two
// sources may use the same id. A batch goes out as asynchronous publishes,
// in order, and Publish waits for all their acknowledgements; messages that
// could not be encoded or were not acknowledged are reported in a
// *broker.PublishError.
//
// Once a message fails before it is sent (it cannot be encoded, exceeds the
// server's maximum payload, or the connection refuses it), the later
// messages of the batch with the same non-empty Subject are not sent; they
// are reported as failed with [broker.ErrNotSent], so they never reach the
// stream ahead of the failed one. The same holds for the asynchronous
// windows of a large batch: a window starts only once the previous one is
// acknowledged, and skips the subjects that failed there. Within one window,
// a message the server refuses only in its acknowledgement may already have
// later messages of its subject stored behind it.
func (b *Broker) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	if err := b.checkOpen(); err != nil {
		return fmt.Errorf("natsjs: publish to %q: %w", topic, err)
	}
	if err := checkName("topic", topic); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("natsjs: publish to %q: %w", topic, err)
	}
	if len(msgs) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, b.cfg.PublishTimeout)
	defer cancel()
	if _, err := b.stream(ctx, topic); err != nil {
		return err
	}

	bt := &batch{topic: topic, msgs: msgs, failed: make(map[int]error), blocked: make(map[string]int)}
	out := make([]*nats.Msg, 0, len(msgs))
	index := make([]int, 0, len(msgs)) // position in msgs of each of out
	for i, m := range msgs {
		if bt.heldBack(i) {
			continue
		}
		nm, err := encode(topic, m, "")
		if err != nil {
			bt.fail(i, err)
			continue
		}
		out = append(out, nm)
		index = append(index, i)
	}

	if len(out) == 1 {
		if _, err := b.js.PublishMsg(ctx, out[0]); err != nil {
			bt.fail(index[0], b.publishFailed(topic, err))
		}
	} else {
		for start := 0; start < len(out); start += publishWindow {
			end := min(start+publishWindow, len(out))
			b.publishAsync(ctx, bt, out[start:end], index[start:end])
		}
	}
	if len(bt.failed) > 0 {
		return &broker.PublishError{Topic: topic, Failed: bt.failed, Total: len(msgs)}
	}
	return nil
}

// batch is the state of one Publish call: its failures by index, and the
// subjects whose later messages are held back behind a failed one.
type batch struct {
	topic   string
	msgs    []*message.Message
	failed  map[int]error
	blocked map[string]int // subject -> index of its first failed message
}

// subject returns the Subject of message i, "" for a nil message.
func (bt *batch) subject(i int) string {
	if m := bt.msgs[i]; m != nil {
		return m.Subject
	}
	return ""
}

// fail records that message i failed with err; the later messages of its
// subject are held back.
func (bt *batch) fail(i int, err error) {
	bt.failed[i] = err
	if s := bt.subject(i); s != "" {
		if _, ok := bt.blocked[s]; !ok {
			bt.blocked[s] = i
		}
	}
}

// heldBack reports whether message i must not be sent because an earlier
// message of its subject failed, and records it as not sent if so.
func (bt *batch) heldBack(i int) bool {
	s := bt.subject(i)
	if s == "" {
		return false
	}
	j, ok := bt.blocked[s]
	if !ok || j >= i {
		return false
	}
	bt.failed[i] = fmt.Errorf("held back behind message %d of the same subject %q: %w", j, s, broker.ErrNotSent)
	return true
}

// publishAsync publishes out without waiting between messages, skipping
// those held back behind a failure of their subject, then waits for every
// acknowledgement, recording failures in bt.
func (b *Broker) publishAsync(ctx context.Context, bt *batch, out []*nats.Msg, index []int) {
	stallWait := b.cfg.PublishTimeout
	if d, ok := ctx.Deadline(); ok {
		stallWait = max(time.Until(d), time.Millisecond)
	}
	futures := make([]jetstream.PubAckFuture, len(out))
	for i, nm := range out {
		if bt.heldBack(index[i]) {
			continue
		}
		f, err := b.js.PublishMsgAsync(nm, jetstream.WithStallWait(stallWait))
		if err != nil {
			bt.fail(index[i], b.publishFailed(bt.topic, err))
			continue
		}
		futures[i] = f
	}
	for i, f := range futures {
		if f == nil {
			continue
		}
		select {
		case <-f.Ok():
		case err := <-f.Err():
			bt.fail(index[i], b.publishFailed(bt.topic, err))
		case <-ctx.Done():
			// Take what has arrived meanwhile; the rest is unknown.
			select {
			case <-f.Ok():
			case err := <-f.Err():
				bt.fail(index[i], b.publishFailed(bt.topic, err))
			default:
				bt.fail(index[i], fmt.Errorf("no acknowledgement: %w", ctx.Err()))
			}
		}
	}
}

// publishFailed notes a failed publish: a missing stream is looked up again
// next time.
func (b *Broker) publishFailed(topic string, err error) error {
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
		b.forgetStream(topic)
		return fmt.Errorf("no stream stores subject %q: %w", topic, err)
	}
	if errors.Is(err, nats.ErrConnectionClosed) && b.checkOpen() != nil {
		return broker.ErrClosed
	}
	return err
}

// publishOne publishes one message with an explicit dedup id and waits for
// the server to store it.
func (b *Broker) publishOne(ctx context.Context, topic string, m *message.Message, id string) error {
	if _, err := b.stream(ctx, topic); err != nil {
		return err
	}
	nm, err := encode(topic, m, id)
	if err != nil {
		return err
	}
	return b.publishMsg(ctx, topic, nm)
}

// publishMsg publishes nm and waits for the server to store it.
func (b *Broker) publishMsg(ctx context.Context, topic string, nm *nats.Msg) error {
	if _, err := b.js.PublishMsg(ctx, nm); err != nil {
		return fmt.Errorf("natsjs: publish to %q: %w", topic, b.publishFailed(topic, err))
	}
	return nil
}

// encode returns m as a NATS message on subject in binary mode, with id as
// its dedup id; an empty id means m's own (see msgID).
func encode(subject string, m *message.Message, id string) (*nats.Msg, error) {
	hs, body, err := message.NATS.Encode(m)
	if err != nil {
		return nil, err
	}
	nm := &nats.Msg{Subject: subject, Header: make(nats.Header, len(hs)+1), Data: body}
	for _, h := range hs {
		nm.Header.Add(h.Key, h.Value)
	}
	if id == "" {
		id = msgID(subject, m)
	}
	nm.Header.Set(jetstream.MsgIDHeader, id)
	return nm, nil
}

// headers returns a NATS message's headers in the codec's form.
func headers(h nats.Header) []message.Header {
	hs := make([]message.Header, 0, len(h))
	for k, vs := range h {
		for _, v := range vs {
			hs = append(hs, message.Header{Key: k, Value: v})
		}
	}
	return hs
}
