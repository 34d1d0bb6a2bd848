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

	failed := make(map[int]error)
	out := make([]*nats.Msg, 0, len(msgs))
	index := make([]int, 0, len(msgs)) // position in msgs of each of out
	for i, m := range msgs {
		nm, err := encode(topic, m, "")
		if err != nil {
			failed[i] = err
			continue
		}
		out = append(out, nm)
		index = append(index, i)
	}

	if len(out) == 1 {
		if _, err := b.js.PublishMsg(ctx, out[0]); err != nil {
			failed[index[0]] = b.publishFailed(topic, err)
		}
	} else {
		for start := 0; start < len(out); start += publishWindow {
			end := min(start+publishWindow, len(out))
			b.publishAsync(ctx, topic, out[start:end], index[start:end], failed)
		}
	}
	if len(failed) > 0 {
		return &broker.PublishError{Topic: topic, Failed: failed, Total: len(msgs)}
	}
	return nil
}

// publishAsync publishes out without waiting between messages, then waits
// for every acknowledgement, recording failures in failed by index.
func (b *Broker) publishAsync(ctx context.Context, topic string, out []*nats.Msg, index []int, failed map[int]error) {
	stallWait := b.cfg.PublishTimeout
	if d, ok := ctx.Deadline(); ok {
		stallWait = max(time.Until(d), time.Millisecond)
	}
	futures := make([]jetstream.PubAckFuture, len(out))
	for i, nm := range out {
		f, err := b.js.PublishMsgAsync(nm, jetstream.WithStallWait(stallWait))
		if err != nil {
			failed[index[i]] = b.publishFailed(topic, err)
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
			failed[index[i]] = b.publishFailed(topic, err)
		case <-ctx.Done():
			// Take what has arrived meanwhile; the rest is unknown.
			select {
			case <-f.Ok():
			case err := <-f.Err():
				failed[index[i]] = b.publishFailed(topic, err)
			default:
				failed[index[i]] = fmt.Errorf("no acknowledgement: %w", ctx.Err())
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
