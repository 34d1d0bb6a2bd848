package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/message"
)

// Publisher sends messages to a topic.
type Publisher interface {
	// Publish sends msgs to topic as one batch and returns once the broker has
	// durably accepted every one of them.
	//
	// Messages with a non-empty Subject keep their publish order per
	// (topic, Subject). Messages without a Subject may be delivered in any
	// order relative to each other: brokers may spread them for throughput
	// (the Kafka broker keys them by ID, over every partition).
	//
	// A broker that deduplicates drops a message whose (Source, ID) it has
	// already accepted on the same topic within its dedup window, so a
	// retried Publish of the same messages has no second effect there; the
	// pair is the key because CloudEvents ids are unique only within their
	// source. Whether a broker deduplicates is its
	// brokertest.Features.DedupByID: the NATS JetStream broker does, within
	// its configured dedup window; the Kafka broker does not, so a retried
	// Publish delivers the message again, and consumers absorb the
	// duplicate with an inbox.
	//
	// When some messages fail, Publish returns a *PublishError naming them;
	// the others were accepted. Once a message with a Subject fails before
	// the broker has taken it (it cannot be encoded, is too large, or the
	// connection refuses it), Publish does not send the later messages of
	// the batch with the same Subject, and reports them failed with
	// [ErrNotSent]: they never overtake the failed one. Messages of other
	// subjects go on. A failure the broker reports only in its
	// acknowledgement (a missing or negative ack) can come too late to hold
	// anything back: later messages of the subject may already be stored,
	// and a resend of the failed one then lands behind them. Per-subject
	// order is kept across such failures only as far as the broker itself
	// keeps it (see each broker's documentation).
	Publish(ctx context.Context, topic string, msgs ...*message.Message) error
}

// Subscriber delivers a topic's messages to a durable consumer group.
type Subscriber interface {
	// Subscribe starts delivering cfg.Topic's messages to h for the consumer
	// group cfg.Group, and returns once the subscription is established. The
	// group's position survives restarts: a new subscription with the same
	// group resumes after the last acknowledged message. Several
	// subscriptions with the same group share the messages.
	//
	// Delivery is at least once: a message is redelivered until acknowledged,
	// after a Nak's delay, or once AckWait passes without settlement (for
	// example when the consumer crashed). After MaxDeliver attempts the
	// message goes to the dead-letter topic.
	//
	// The subscription runs until its Stop, the broker's Close, or the end
	// of ctx, whichever comes first; pass a context that lives as long as
	// the subscription should, not one scoped to a request or with a
	// timeout meant for setting up. When ctx ends, the subscription stops
	// fetching and cancels the context of the handler call in flight;
	// once that call returns, its deliveries are settled as the handler
	// settled them (those it left unsettled are redelivered to the group
	// later) and the subscription's goroutines end. A later Stop then
	// returns promptly.
	Subscribe(ctx context.Context, cfg SubscribeConfig, h Handler) (Subscription, error)
}

// Broker is a Publisher and Subscriber that can be closed.
type Broker interface {
	Publisher
	Subscriber
	// Close stops every subscription and releases the broker's connections.
	Close() error
}

// Subscription is a running subscription.
type Subscription interface {
	// Stop stops fetching new messages, waits for the handler calls in
	// flight to return (or ctx to end), settles their deliveries, and
	// releases the subscription. The group's position is kept.
	Stop(ctx context.Context) error
}

// Handler handles a batch of deliveries from one subscription. Batches keep
// per-(topic, subject) order for messages with a Subject, and a subscription
// does not call its handler again until the previous call has returned.
//
// The handler settles each delivery with Ack, Nak or DeadLetter. A delivery
// left unsettled when the handler returns is Nak'ed with the subscription's
// default redelivery delay, so a handler that returns early never loses a
// message. Settlements take effect after the handler returns.
//
// The batch slice is the handler's: it may reorder it (sort it by entity,
// so that concurrent handlers lock rows in one order). Each settlement
// belongs to its Delivery, wherever the handler moved it.
//
// A handler that panics does not end the subscription or the process: the
// broker recovers, logs the panic with its stack at Error level, and treats
// the call as returned. What the handler settled before panicking stands;
// the deliveries it had not settled are unsettled, so they are redelivered
// with Attempt counting up and, if the panic repeats, dead-lettered after
// MaxDeliver attempts.
type Handler func(ctx context.Context, batch []*Delivery)

// SubscribeConfig configures a subscription.
type SubscribeConfig struct {
	// Topic to consume. Required.
	Topic string
	// Group is the durable consumer group. Subscriptions with the same group
	// share the topic's messages and its position. Required.
	Group string
	// MaxBatch is the most deliveries passed to one handler call. Default 100.
	MaxBatch int
	// AckWait is how long a delivery may go without a sign of life from its
	// consumer before the broker redelivers it (to this or another member of
	// the group). A live subscription keeps the deliveries it is handling
	// alive, however long the handler takes; AckWait bounds how long a
	// crashed consumer's messages wait. Default 30s. (Kafka has no such
	// timer: a crashed member's records return when the group rebalances.)
	AckWait time.Duration
	// NakDelay is the redelivery delay of a Nak with no delay of its own, and
	// of a delivery left unsettled. Default 1s.
	NakDelay time.Duration
	// MaxDeliver is how many times a message is delivered before it goes to
	// the dead-letter topic. Default 5.
	MaxDeliver int
	// DeadLetterTopic receives messages that were dead-lettered or ran out of
	// attempts, with the reason in the [ExtDeadLetterReason] extension.
	// Default: Topic + ".dlq".
	DeadLetterTopic string
}

// Extension attributes set on a dead-lettered message.
const (
	// ExtDeadLetterReason holds why the message was dead-lettered.
	ExtDeadLetterReason = "deadletterreason"
	// ExtDeadLetterTopic holds the topic the message was consumed from.
	ExtDeadLetterTopic = "deadlettertopic"
	// ExtDeadLetterGroup holds the consumer group that gave up on it.
	ExtDeadLetterGroup = "deadlettergroup"
	// ExtDeadLetterAttempts holds how many deliveries were made.
	ExtDeadLetterAttempts = "deadletterattempts"
)

// WithDefaults returns cfg with every unset field given its default.
func (cfg SubscribeConfig) WithDefaults() SubscribeConfig {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 100
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 30 * time.Second
	}
	if cfg.NakDelay <= 0 {
		cfg.NakDelay = time.Second
	}
	if cfg.MaxDeliver <= 0 {
		cfg.MaxDeliver = 5
	}
	if cfg.DeadLetterTopic == "" && cfg.Topic != "" {
		cfg.DeadLetterTopic = cfg.Topic + ".dlq"
	}
	return cfg
}

// Validate reports every problem with cfg at once.
func (cfg SubscribeConfig) Validate() error {
	var errs []error
	if cfg.Topic == "" {
		errs = append(errs, errors.New("subscribe: Topic is required"))
	}
	if cfg.Group == "" {
		errs = append(errs, errors.New("subscribe: Group is required"))
	}
	if cfg.DeadLetterTopic != "" && cfg.DeadLetterTopic == cfg.Topic {
		errs = append(errs, fmt.Errorf("subscribe: DeadLetterTopic must differ from Topic %q", cfg.Topic))
	}
	return errors.Join(errs...)
}

// Settlement says what happens to a delivery after its handler returns.
type Settlement int

// The settlements of a delivery.
const (
	// Unsettled: the handler has not settled the delivery; it is Nak'ed with
	// the default delay.
	Unsettled Settlement = iota
	// Acked: the message has been handled and is not delivered again.
	Acked
	// Naked: the message is redelivered after a delay.
	Naked
	// DeadLettered: the message goes to the dead-letter topic now.
	DeadLettered
)

// String returns the settlement's name.
func (s Settlement) String() string {
	switch s {
	case Unsettled:
		return "unsettled"
	case Acked:
		return "acked"
	case Naked:
		return "naked"
	case DeadLettered:
		return "deadlettered"
	}
	return fmt.Sprintf("settlement(%d)", int(s))
}

// Delivery is one delivery of a message to a subscription's handler.
type Delivery struct {
	// Msg is the delivered message.
	Msg *message.Message
	// Topic is the topic it was consumed from.
	Topic string
	// Attempt counts deliveries of this message to the group, from 1.
	Attempt int

	settlement Settlement
	delay      time.Duration
	reason     string
}

// Ack marks the message handled: it is not delivered to the group again.
func (d *Delivery) Ack() { d.settlement = Acked }

// Nak asks for redelivery after delay (the subscription's NakDelay when
// delay is zero). Once MaxDeliver attempts are used up, the message goes to
// the dead-letter topic instead.
func (d *Delivery) Nak(delay time.Duration) {
	d.settlement = Naked
	d.delay = delay
}

// DeadLetter sends the message to the dead-letter topic now, with reason.
// Use it for poison messages that no retry can fix.
func (d *Delivery) DeadLetter(reason string) {
	d.settlement = DeadLettered
	d.reason = reason
}

// Settlement returns how the handler settled the delivery, the Nak delay,
// and the dead-letter reason. Broker implementations call it after the
// handler returns.
func (d *Delivery) Settlement() (s Settlement, delay time.Duration, reason string) {
	return d.settlement, d.delay, d.reason
}

// DeadLetterMessage returns the copy of d's message to publish on the
// dead-letter topic, carrying reason, topic, group and attempts as
// extensions. Broker implementations use it so every broker dead-letters
// alike.
func DeadLetterMessage(d *Delivery, group, reason string) *message.Message {
	m := d.Msg.Clone()
	if m.Extensions == nil {
		m.Extensions = make(map[string]string, 4)
	}
	m.Extensions[ExtDeadLetterReason] = reason
	m.Extensions[ExtDeadLetterTopic] = d.Topic
	m.Extensions[ExtDeadLetterGroup] = group
	m.Extensions[ExtDeadLetterAttempts] = fmt.Sprint(d.Attempt)
	return m
}

// PublishError reports the messages of a batch that a broker did not accept.
type PublishError struct {
	// Topic the batch was sent to.
	Topic string
	// Failed maps each failed message's index in the batch to its error.
	Failed map[int]error
	// Total is the batch size.
	Total int
}

// Error describes how many messages failed and the first error.
func (e *PublishError) Error() string {
	first := -1
	for i := range e.Failed {
		if first < 0 || i < first {
			first = i
		}
	}
	if first < 0 {
		return fmt.Sprintf("publish to %q: no failures", e.Topic)
	}
	return fmt.Sprintf("publish to %q: %d of %d messages failed; message %d: %v",
		e.Topic, len(e.Failed), e.Total, first, e.Failed[first])
}

// Unwrap returns the per-message errors, so errors.Is sees through them.
func (e *PublishError) Unwrap() []error {
	errs := make([]error, 0, len(e.Failed))
	for _, err := range e.Failed {
		errs = append(errs, err)
	}
	return errs
}

// ErrClosed is returned by calls on a closed broker.
var ErrClosed = errors.New("broker: closed")

// ErrNotSent marks, in a [PublishError], a message that Publish did not send
// because an earlier message of the batch with the same Subject failed:
// sending it would have let it overtake that message. Resend it after the
// failed one.
var ErrNotSent = errors.New("broker: not sent, held back behind a failed message of the same subject")
