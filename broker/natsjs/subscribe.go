package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// pullWait bounds one pull request: the server ends it after 90% of
// pullWait when it has not brought MaxBatch messages by then, and the client
// gives up on it after pullWait. Stop does not cancel the pull in flight,
// which would lose the messages already on their way, but waits for its
// end, so Stop takes up to pullWait; an idle subscription makes one pull
// request per pullWait.
const pullWait = time.Second

// retryWait is the pause after a failed fetch before the next one.
const retryWait = 500 * time.Millisecond

// Subscribe consumes cfg.Topic through a durable pull consumer named after
// cfg.Group (escaped like a stream name; see the package documentation),
// created or updated to cfg's AckWait. Members of a group share the
// consumer, so they share its messages and its position.
//
// The subscription pulls up to cfg.MaxBatch messages at a time and calls h
// with those that have arrived, then settles each: Ack, NakWithDelay, or a
// dead letter (the message, with the reason, published to
// cfg.DeadLetterTopic; then the original is terminated). From their arrival
// until their settlement, the messages are kept in progress at the server
// every AckWait/3, so a handler slower than AckWait does not have them
// redelivered to other members meanwhile. Delivery.Attempt is the server's
// delivery count. A message that cannot be decoded is dead-lettered as it
// is, its headers and body unchanged plus the dead-letter extensions,
// without calling h.
//
// ctx governs the subscription's life: when it ends, the subscription stops
// and the context passed to h is canceled. Stop ends it gracefully.
func (b *Broker) Subscribe(ctx context.Context, cfg broker.SubscribeConfig, h broker.Handler) (broker.Subscription, error) {
	if err := b.checkOpen(); err != nil {
		return nil, fmt.Errorf("natsjs: subscribe to %q: %w", cfg.Topic, err)
	}
	cfg = cfg.WithDefaults()
	if err := errors.Join(cfg.Validate(), checkSubscribeNames(cfg)); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, errors.New("natsjs: subscribe: nil handler")
	}
	cons, err := b.consumer(ctx, cfg)
	if err != nil {
		return nil, err
	}

	runCtx, cancelRun := context.WithCancel(ctx)
	fetchCtx, cancelFetch := context.WithCancel(runCtx)
	s := &subscription{
		b:           b,
		cfg:         cfg,
		h:           h,
		cons:        cons,
		log:         b.log.With("topic", cfg.Topic, "group", cfg.Group),
		runCtx:      runCtx,
		cancelRun:   cancelRun,
		fetchCtx:    fetchCtx,
		cancelFetch: cancelFetch,
		done:        make(chan struct{}),
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		cancelRun()
		return nil, fmt.Errorf("natsjs: subscribe to %q: %w", cfg.Topic, broker.ErrClosed)
	}
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	go s.run()
	return s, nil
}

// consumer creates or updates the durable consumer of cfg's group on the
// stream of cfg's topic.
func (b *Broker) consumer(ctx context.Context, cfg broker.SubscribeConfig) (jetstream.Consumer, error) {
	stream, err := b.stream(ctx, cfg.Topic)
	if err != nil {
		return nil, err
	}
	durable := escapeName(cfg.Group)
	if stream != escapeName(cfg.Topic) {
		// The stream holds other topics too: keep this group's consumer apart
		// from the same group's consumers of those topics.
		durable = escapeName(cfg.Group + "." + cfg.Topic)
	}
	cons, err := b.js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{
		Durable:       durable,
		Description:   fmt.Sprintf("Troupe group %s on topic %s", cfg.Group, cfg.Topic),
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       cfg.AckWait,
		// The subscription dead-letters after cfg.MaxDeliver attempts itself.
		// A server-side limit would strand a message whose last attempt
		// ended without settlement (a crash): the server would stop
		// delivering it, and nobody would dead-letter it.
		MaxDeliver:    -1,
		FilterSubject: cfg.Topic,
		ReplayPolicy:  jetstream.ReplayInstantPolicy,
	})
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		b.forgetStream(cfg.Topic) // deleted behind our back; made again next time
	}
	if err != nil {
		return nil, fmt.Errorf("natsjs: consumer %q on stream %q for group %q: %w", durable, stream, cfg.Group, err)
	}
	return cons, nil
}

// checkSubscribeNames checks the names in cfg the broker maps to NATS.
func checkSubscribeNames(cfg broker.SubscribeConfig) error {
	var errs []error
	if cfg.Topic != "" {
		errs = append(errs, checkName("topic", cfg.Topic))
	}
	if cfg.Group != "" {
		errs = append(errs, checkName("group", cfg.Group))
	}
	if cfg.DeadLetterTopic != "" {
		errs = append(errs, checkName("dead-letter topic", cfg.DeadLetterTopic))
	}
	return errors.Join(errs...)
}

// subscription is one running Subscribe.
type subscription struct {
	b    *Broker
	cfg  broker.SubscribeConfig
	h    broker.Handler
	cons jetstream.Consumer
	log  *slog.Logger

	runCtx      context.Context // passed to h, and cancels pulls; canceled by Close or when Stop gives up
	cancelRun   context.CancelFunc
	fetchCtx    context.Context // canceled by Stop: pull no more
	cancelFetch context.CancelFunc
	done        chan struct{} // closed when run has returned
}

// Stop makes no new pull request, waits for the handler call in flight to
// return and its deliveries to be settled, and flushes the settlements to
// the server.
//
// The pull request in flight is not canceled but left to end, which takes
// at most about a second (see pullWait): messages the server sends for it
// are still received rather than lost on the way, and those not handed to
// the handler are Nak'ed with a delay that lasts until the pull has ended,
// so the group gets them again within that second rather than after
// AckWait. Such a message has been delivered, so its next delivery counts
// one attempt more.
//
// When ctx ends first, Stop cancels the handler's context and the pull, and
// returns ctx's error; the subscription still settles and ends in the
// background. Messages that were on their way to a canceled pull come back
// after AckWait, as do those of a handler that does not return.
func (s *subscription) Stop(ctx context.Context) error {
	s.cancelFetch()
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		s.cancelRun()
		return fmt.Errorf("natsjs: stop subscription of group %q to %q: %w", s.cfg.Group, s.cfg.Topic, ctx.Err())
	}
}

// run pulls and handles messages until fetchCtx ends.
func (s *subscription) run() {
	defer func() {
		s.cancelRun()
		if err := s.b.nc.FlushTimeout(time.Second); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			s.log.Warn("natsjs: flush settlements", "err", err)
		}
		s.b.mu.Lock()
		delete(s.b.subs, s)
		s.b.mu.Unlock()
		close(s.done)
	}()
	for s.fetchCtx.Err() == nil {
		err := s.fetch()
		if err == nil || s.fetchCtx.Err() != nil {
			continue
		}
		s.log.Warn("natsjs: fetch failed; retrying", "err", err, "retry_in", retryWait)
		select {
		case <-s.fetchCtx.Done():
			continue
		case <-time.After(retryWait):
		}
		if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) ||
			errors.Is(err, nats.ErrNoResponders) {
			// Deleted behind our back: make it again. The group starts over
			// from the oldest message; at least once still holds.
			if cons, err := s.b.consumer(s.fetchCtx, s.cfg); err != nil {
				s.log.Warn("natsjs: recreate consumer", "err", err)
			} else {
				s.cons = cons
				s.log.Warn("natsjs: consumer was deleted; recreated it, the group starts over")
			}
		}
	}
}

// fetch makes one pull request and handles what it brings, calling the
// handler with the messages that have arrived each time, never more than
// MaxBatch. Stop does not cancel the pull request (see pullWait); the end
// of runCtx does.
func (s *subscription) fetch() error {
	ctx, cancel := context.WithTimeout(s.runCtx, pullWait)
	defer cancel()
	batch, err := s.cons.Fetch(s.cfg.MaxBatch, jetstream.FetchContext(ctx))
	if err != nil {
		return err
	}
	end, _ := ctx.Deadline()
	p := startPull(s.runCtx, s.log, batch.Messages(), s.cfg.AckWait)
	defer p.close()
	for {
		got, ok := p.next()
		if !ok {
			break
		}
		if s.fetchCtx.Err() != nil {
			// Arrived after Stop began: hand them back to the group. Not at
			// once, or the server would send them straight back to this
			// pull, which stays open until it expires, and each bounce
			// would count an attempt.
			delay := max(time.Until(end), 10*time.Millisecond)
			for _, m := range got {
				p.release(m)
				_ = m.NakWithDelay(delay)
			}
			continue
		}
		s.handle(p, got)
	}
	if err := batch.Error(); err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// handle decodes msgs, calls the handler, and settles each message,
// releasing it from p just before.
func (s *subscription) handle(p *pull, msgs []jetstream.Msg) {
	deliveries := make([]*broker.Delivery, 0, len(msgs))
	raws := make([]jetstream.Msg, 0, len(msgs))
	for _, jm := range msgs {
		attempt := 1
		if md, err := jm.Metadata(); err == nil {
			attempt = int(md.NumDelivered)
		}
		m, err := message.NATS.Decode(headers(jm.Headers()), jm.Data())
		if err != nil {
			s.deadLetterRaw(p, jm, attempt, "cannot decode: "+err.Error())
			continue
		}
		d := &broker.Delivery{Msg: m, Topic: s.cfg.Topic, Attempt: attempt}
		if attempt > s.cfg.MaxDeliver {
			// The last attempt ended unsettled, by a crash or AckWait.
			s.deadLetter(p, jm, d, fmt.Sprintf("not settled within %d deliveries", s.cfg.MaxDeliver))
			continue
		}
		deliveries = append(deliveries, d)
		raws = append(raws, jm)
	}
	if len(deliveries) == 0 {
		return
	}
	// The handler gets a slice of its own: it may reorder it (sort it by
	// entity, as the saga orchestrator does), and raws[i] must stay the
	// message of deliveries[i], or a settlement would reach another message
	// (an Ack meant for a handled message would drop one that failed).
	s.call(slices.Clone(deliveries))
	for i, d := range deliveries {
		s.settle(p, raws[i], d)
	}
}

// call calls the handler. A panic is logged and leaves the deliveries the
// handler had not settled unsettled, so they are redelivered and, if the
// panic repeats, dead-lettered.
func (s *subscription) call(deliveries []*broker.Delivery) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("natsjs: handler panicked; its unsettled deliveries will be redelivered",
				"panic", r, "stack", string(debug.Stack()))
		}
	}()
	s.h(s.runCtx, deliveries)
}

// settle tells the server what became of d. An acknowledgement that does not
// reach the server (connection lost) only means the message is delivered
// again after AckWait, so acks are sent without waiting for a reply; Stop
// and Close flush them.
func (s *subscription) settle(p *pull, jm jetstream.Msg, d *broker.Delivery) {
	settlement, delay, reason := d.Settlement()
	var err error
	switch settlement {
	case broker.Acked:
		p.release(jm)
		err = jm.Ack()
	case broker.DeadLettered:
		s.deadLetter(p, jm, d, reason)
	default:
		if d.Attempt >= s.cfg.MaxDeliver {
			what := "nak'ed"
			if settlement == broker.Unsettled {
				what = "left unsettled"
			}
			s.deadLetter(p, jm, d, fmt.Sprintf("%s on attempt %d of %d", what, d.Attempt, s.cfg.MaxDeliver))
			return
		}
		if delay <= 0 {
			delay = s.cfg.NakDelay
		}
		p.release(jm)
		err = jm.NakWithDelay(delay)
	}
	if err != nil {
		s.log.Warn("natsjs: settle failed; the server redelivers after AckWait",
			"id", d.Msg.ID, "settlement", settlement, "err", err)
	}
}

// deadLetter publishes d's message to the dead-letter topic with reason, and
// terminates the original. If the dead letter cannot be published, the
// original is Nak'ed so that a later delivery tries again. The original is
// kept in progress while the dead letter is published.
func (s *subscription) deadLetter(p *pull, jm jetstream.Msg, d *broker.Delivery, reason string) {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	dm := broker.DeadLetterMessage(d, s.cfg.Group, reason)
	ctx, cancel := context.WithTimeout(context.Background(), s.b.cfg.PublishTimeout)
	defer cancel()
	// One dead letter per message, topic and group, even if this one is
	// retried.
	id := deadLetterMsgID(s.cfg.DeadLetterTopic, s.cfg.Topic, s.cfg.Group, d.Msg)
	err := s.b.publishOne(ctx, s.cfg.DeadLetterTopic, dm, id)
	s.finishDeadLetter(p, jm, d.Msg.ID, reason, err)
}

// deadLetterRaw dead-letters a message that cannot be decoded: its headers
// and body as they are, plus the dead-letter extensions as headers.
func (s *subscription) deadLetterRaw(p *pull, jm jetstream.Msg, attempt int, reason string) {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	nm := nats.NewMsg(s.cfg.DeadLetterTopic)
	for k, vs := range jm.Headers() {
		if k != jetstream.MsgIDHeader {
			nm.Header[k] = vs
		}
	}
	nm.Data = jm.Data()
	for _, h := range s.deadLetterHeaders(reason, attempt) {
		nm.Header.Set(h.Key, h.Value)
	}
	// A message whose place in its stream is unknown has no identity to
	// dedup by: its dead letter then goes without a dedup id.
	if md, err := jm.Metadata(); err == nil {
		nm.Header.Set(jetstream.MsgIDHeader,
			rawDeadLetterMsgID(s.cfg.DeadLetterTopic, md.Stream, md.Sequence.Stream, s.cfg.Topic, s.cfg.Group))
	}

	ctx, cancel := context.WithTimeout(context.Background(), s.b.cfg.PublishTimeout)
	defer cancel()
	err := func() error {
		if _, err := s.b.stream(ctx, s.cfg.DeadLetterTopic); err != nil {
			return err
		}
		return s.b.publishMsg(ctx, s.cfg.DeadLetterTopic, nm)
	}()
	s.finishDeadLetter(p, jm, "", reason, err)
}

// deadLetterHeaders returns the dead-letter extensions as NATS binding
// headers, encoded by the codec itself.
func (s *subscription) deadLetterHeaders(reason string, attempt int) []message.Header {
	carrier := &message.Message{ID: "-", Source: "-", Type: "-", Extensions: map[string]string{
		broker.ExtDeadLetterReason:   reason,
		broker.ExtDeadLetterTopic:    s.cfg.Topic,
		broker.ExtDeadLetterGroup:    s.cfg.Group,
		broker.ExtDeadLetterAttempts: fmt.Sprint(attempt),
	}}
	hs, _, err := message.NATS.Encode(carrier)
	if err != nil {
		s.log.Error("natsjs: encode dead-letter headers", "err", err)
		return nil
	}
	prefix := message.NATS.Prefix()
	out := hs[:0]
	for _, h := range hs {
		if strings.HasPrefix(strings.ToLower(h.Key), prefix+"deadletter") {
			out = append(out, h)
		}
	}
	return out
}

// finishDeadLetter settles the original of a dead letter: terminated once
// the dead letter is stored, Nak'ed for another try otherwise.
func (s *subscription) finishDeadLetter(p *pull, jm jetstream.Msg, id, reason string, publishErr error) {
	p.release(jm)
	if publishErr != nil {
		s.log.Error("natsjs: dead letter not published; the message will be delivered again",
			"id", id, "reason", reason, "dead_letter_topic", s.cfg.DeadLetterTopic, "err", publishErr)
		if err := jm.NakWithDelay(s.cfg.NakDelay); err != nil {
			s.log.Warn("natsjs: nak failed; the server redelivers after AckWait", "id", id, "err", err)
		}
		return
	}
	s.log.Info("natsjs: dead-lettered", "id", id, "reason", reason, "dead_letter_topic", s.cfg.DeadLetterTopic)
	if err := jm.TermWithReason(reason); err != nil {
		s.log.Warn("natsjs: terminate failed; the message will be dead-lettered again (deduplicated)", "id", id, "err", err)
	}
}
