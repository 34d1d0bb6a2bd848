package kafka

import (
	"context"
	"errors"
	"fmt"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// Publish sends msgs to topic and returns once every in-sync replica has
// them. It creates topic if it is missing.
//
// Each message becomes one record in CloudEvents binary mode: its attributes
// are "ce_" headers and its data is the record value. The record key is the
// message's Subject (its ID when Subject is empty), so the messages of one
// subject share a partition and keep their order, while messages without a
// Subject spread over the partitions in no order relative to each other.
//
// When some messages fail, Publish returns a *[broker.PublishError] naming
// them; the others were accepted. A message that cannot be encoded, or that
// is larger than the producer's batch limit, fails before anything is sent,
// and the later messages of its Subject in the call are not sent either
// ([broker.ErrNotSent]), so they never overtake it. Once records are handed
// to the producer, its idempotent, ordered retries keep a partition in
// order: a batch that fails for good fails the records behind it too. After [Broker.Close] it returns
// [broker.ErrClosed].
func (b *Broker) Publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	if b.isClosed() {
		return broker.ErrClosed
	}
	return b.publish(ctx, topic, msgs...)
}

// publish is Publish without the closed check, for dead-lettering while the
// broker closes its subscriptions.
func (b *Broker) publish(ctx context.Context, topic string, msgs ...*message.Message) error {
	if topic == "" {
		return errors.New("kafka: publish: topic is required")
	}
	if len(msgs) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("kafka: publish to %q: %w", topic, err)
	}
	if err := b.ensureTopic(ctx, topic); err != nil {
		return b.closedOr(err)
	}

	failed := make(map[int]error)
	records := make([]*kgo.Record, 0, len(msgs))
	index := make([]int, 0, len(msgs)) // index[i] is the batch index of records[i]
	maxBytes := b.batchMaxBytes()
	blocked := make(map[string]int) // subject -> index of its first failed message
	for i, m := range msgs {
		if m != nil && m.Subject != "" {
			if first, ok := blocked[m.Subject]; ok {
				failed[i] = fmt.Errorf("%w: behind message %d of subject %q", broker.ErrNotSent, first, m.Subject)
				continue
			}
		}
		r, err := newRecord(topic, m)
		if err == nil {
			if n := recordSize(r); n > maxBytes {
				err = fmt.Errorf("kafka: message %q: about %d bytes, over the producer's batch limit of %d (kgo.ProducerBatchMaxBytes): %w",
					m.ID, n, maxBytes, message.ErrTooLarge)
			}
		}
		if err != nil {
			failed[i] = err
			if m != nil && m.Subject != "" {
				blocked[m.Subject] = i
			}
			continue
		}
		records = append(records, r)
		index = append(index, i)
	}
	if len(records) > 0 {
		results := b.client.ProduceSync(ctx, records...)
		for i, res := range results {
			if res.Err != nil {
				failed[index[i]] = b.closedOr(res.Err)
			}
		}
	}
	if len(failed) > 0 {
		return &broker.PublishError{Topic: topic, Failed: failed, Total: len(msgs)}
	}
	return nil
}

// batchMaxBytes is the producer's limit on one record batch, which no single
// record may exceed.
func (b *Broker) batchMaxBytes() int {
	if v, ok := b.client.OptValue(kgo.ProducerBatchMaxBytes).(int32); ok && v > 0 {
		return int(v)
	}
	return 1000012 // franz-go's default
}

// recordSize estimates r's encoded size in a batch from above: its key,
// value and headers plus a fixed allowance for lengths, offsets and
// timestamps. A record under the producer's limit by this estimate fits.
func recordSize(r *kgo.Record) int {
	n := 64 + len(r.Key) + len(r.Value)
	for _, h := range r.Headers {
		n += 10 + len(h.Key) + len(h.Value)
	}
	return n
}

// newRecord encodes m as a record for topic.
func newRecord(topic string, m *message.Message) (*kgo.Record, error) {
	if m == nil {
		return nil, errors.New("kafka: nil message")
	}
	headers, value, err := message.Kafka.Encode(m)
	if err != nil {
		return nil, fmt.Errorf("kafka: message %q: %w", m.ID, err)
	}
	key := m.Subject
	if key == "" {
		key = m.ID
	}
	r := &kgo.Record{
		Topic:   topic,
		Key:     []byte(key),
		Value:   value,
		Headers: make([]kgo.RecordHeader, len(headers)),
	}
	for i, h := range headers {
		r.Headers[i] = kgo.RecordHeader{Key: h.Key, Value: []byte(h.Value)}
	}
	return r, nil
}

// closedOr returns err, or broker.ErrClosed wrapping it when the client was
// closed under the call.
func (b *Broker) closedOr(err error) error {
	if errors.Is(err, kgo.ErrClientClosed) {
		return fmt.Errorf("%w: %w", broker.ErrClosed, err)
	}
	return err
}
