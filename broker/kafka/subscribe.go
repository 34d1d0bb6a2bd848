package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/message"
)

// fetchMaxWait is how long a fetch waits on the broker for new records. It
// also bounds how late a partition resumed after a Nak's delay is fetched
// again, since the resumed partition joins the next fetch request. Kafka's
// own consumers default to the same value.
const fetchMaxWait = 500 * time.Millisecond

// Subscribe starts delivering cfg.Topic's records to h for the consumer group
// cfg.Group, creating the topic and cfg.DeadLetterTopic when they are
// missing, and returns without waiting for the group to assign partitions.
// A group that has never committed starts at the oldest record.
//
// The subscription is one member of the group. It commits a partition's
// offset only up to the first record not yet acked or dead-lettered; a
// Nak'ed or unsettled record is delivered again after its delay, before any
// later record of its partition, while other partitions go on. The package
// documentation describes how each part of the contract maps onto Kafka,
// including why cfg.AckWait is not used.
//
// The subscription runs until Stop, [Broker.Close] or the end of ctx. When
// ctx ends, it stops polling and cancels the handler's context, which
// carries ctx's values; once the handler returns, the subscription settles
// its deliveries, commits what is settled and leaves the group, and a later
// Stop returns at once. The handler's context also ends when the broker
// closes, or when Stop's context ends before the handler returns.
func (b *Broker) Subscribe(ctx context.Context, cfg broker.SubscribeConfig, h broker.Handler) (broker.Subscription, error) {
	cfg = cfg.WithDefaults()
	err := cfg.Validate()
	if h == nil {
		err = errors.Join(err, errors.New("subscribe: handler is required"))
	}
	if err != nil {
		return nil, err
	}
	if b.isClosed() {
		return nil, broker.ErrClosed
	}
	for _, topic := range []string{cfg.Topic, cfg.DeadLetterTopic} {
		if err := b.ensureTopic(ctx, topic); err != nil {
			return nil, b.closedOr(err)
		}
	}
	if err := ctx.Err(); err != nil {
		// The topics were known: nothing above noticed.
		return nil, fmt.Errorf("kafka: subscribe to %q as %q: %w", cfg.Topic, cfg.Group, err)
	}

	s := &subscription{
		b:       b,
		cfg:     cfg,
		h:       h,
		log:     b.log.With("topic", cfg.Topic, "group", cfg.Group),
		parts:   make(map[int32]*partState),
		pending: make(map[int32]position),
		done:    make(chan struct{}),
	}

	opts := append(clientOptions(b.cfg),
		kgo.ConsumerGroup(cfg.Group),
		kgo.ConsumeTopics(cfg.Topic),
		kgo.ConsumeStartOffset(kgo.NewOffset().AtStart()),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsRevoked(s.onRevoked),
		kgo.OnPartitionsLost(s.onLost),
		kgo.OnOffsetsFetched(s.onOffsetsFetched),
		kgo.FetchMaxWait(fetchMaxWait),
	)
	if st := b.cfg.SessionTimeout; st > 0 {
		opts = append(opts, kgo.SessionTimeout(st), kgo.HeartbeatInterval(min(3*time.Second, st/3)))
	}
	s.client, err = kgo.NewClient(append(opts, b.cfg.Options...)...)
	if err != nil {
		return nil, fmt.Errorf("kafka: subscribe to %q as %q: %w", cfg.Topic, cfg.Group, err)
	}

	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		s.client.Close()
		return nil, broker.ErrClosed
	}
	// Polling and the handler end with ctx; commits and dead letters do
	// not, so that what the handler settled is acted on after ctx ends.
	s.pollCtx, s.stopPolling = context.WithCancel(ctx)
	s.handlerCtx, s.cancelHandler = context.WithCancel(ctx)
	s.ioCtx, s.cancelIO = context.WithCancel(context.Background())
	b.subs[s] = struct{}{}
	b.mu.Unlock()

	go s.run()
	return s, nil
}

// subscription is one group member consuming one topic.
type subscription struct {
	b      *Broker
	cfg    broker.SubscribeConfig
	h      broker.Handler
	client *kgo.Client
	log    *slog.Logger

	pollCtx       context.Context // ends when the subscription stops polling, or Subscribe's ctx ends
	stopPolling   context.CancelFunc
	handlerCtx    context.Context // passed to the handler; ends with Subscribe's ctx too
	cancelHandler context.CancelFunc
	ioCtx         context.Context // commits and dead-letter publishes; outlives Subscribe's ctx
	cancelIO      context.CancelFunc

	closeOnce sync.Once
	done      chan struct{} // closed when run returns
	err       error         // set by run before done is closed

	// mu guards parts and pending, which the rebalance callbacks touch
	// from the client's goroutines.
	mu      sync.Mutex
	parts   map[int32]*partState
	pending map[int32]position // to commit
}

// position is a partition's next record to handle, and how many times it
// was delivered already (0 unless it is waiting for redelivery).
type position struct {
	kgo.EpochOffset
	attempts int
}

// attemptsMeta prefixes the offset commit metadata that carries how many
// times the record at the committed offset was delivered, so the count
// survives the partition moving to another member.
const attemptsMeta = "troupe.attempts="

// partState is what the subscription remembers about one assigned partition.
type partState struct {
	// memos holds what is known about records at or after the position to
	// commit: how often they were delivered, and the settlements of those
	// handled behind a record that waits for its redelivery.
	memos    map[int64]memo
	paused   bool      // rewound to a record that waits for its redelivery
	resumeAt time.Time // when to fetch the partition again
}

// memo is what the subscription remembers about one record.
type memo struct {
	attempts  int       // deliveries so far
	settled   bool      // acked or dead-lettered: not delivered again
	notBefore time.Time // Nak'ed: delivered again no sooner
}

// Stop stops fetching, waits for the handler call in flight to return, acts
// on its settlements, commits the settled offsets and leaves the group. If
// ctx ends first, Stop cancels the handler's context, closes the member
// without committing anything more, and returns ctx's error.
func (s *subscription) Stop(ctx context.Context) error {
	s.stopPolling()
	defer s.b.forget(s)
	select {
	case <-s.done:
		return s.err
	case <-ctx.Done():
	}
	s.cancelHandler()
	s.cancelIO()
	s.closeClient()
	return fmt.Errorf("kafka: stop subscription to %q as %q: %w", s.cfg.Topic, s.cfg.Group, ctx.Err())
}

// cancelHandlers stops polling and cancels the handler's context.
func (s *subscription) cancelHandlers() {
	s.stopPolling()
	s.cancelHandler()
}

func (b *Broker) forget(s *subscription) {
	b.mu.Lock()
	delete(b.subs, s)
	b.mu.Unlock()
}

// closeClient leaves the group (committing what is settled, in onRevoked)
// and closes the member's connections.
func (s *subscription) closeClient() {
	s.closeOnce.Do(s.client.CloseAllowingRebalance)
}

// run polls, hands batches to the handler and settles them until the
// subscription stops, then commits, leaves the group and lets go of the
// broker: once Subscribe's ctx has ended, nothing else waits for it.
func (s *subscription) run() {
	defer s.b.forget(s) // after done is closed, so that Close still waits for run
	defer close(s.done)
	defer s.closeClient()
	defer s.cancelIO()
	defer s.cancelHandler()
	defer s.stopPolling() // releases pollCtx's hold on Subscribe's ctx
	for {
		ctx, cancel := s.pollCtx, context.CancelFunc(func() {})
		if wait := s.resumeDue(time.Now()); wait > 0 {
			ctx, cancel = context.WithTimeout(s.pollCtx, wait)
		}
		fetches := s.client.PollRecords(ctx, s.cfg.MaxBatch)
		cancel()
		if s.pollCtx.Err() != nil || fetches.IsClientClosed() {
			// Records polled but not handled are not committed: the next
			// member of the group gets them.
			s.client.AllowRebalance()
			break
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				return
			}
			s.log.Warn("kafka: fetch failed", "partition", partition, "err", err)
		})
		if recs := fetches.Records(); len(recs) > 0 {
			s.process(recs)
		}
		s.client.AllowRebalance()
	}
	if err := s.commit(s.ioCtx, s.client); err != nil {
		s.err = err
	}
}

// entry is one polled record on its way through the handler.
type entry struct {
	rec     *kgo.Record
	attempt int              // this delivery's Attempt
	d       *broker.Delivery // nil unless handed to the handler

	decodeErr error     // the record is not a CloudEvent
	done      bool      // settled when delivered before; not handed to the handler
	waitUntil time.Time // Nak'ed before, delay not over; not handed to the handler
}

// process hands recs to the handler and acts on their settlements in
// partition order: the position to commit advances over settled records up
// to the first one to deliver again, where the partition is rewound and
// paused until that record's delay is over. The records handled behind it
// are remembered, so that those settled are not delivered again and those
// Nak'ed wait for their own delay.
func (s *subscription) process(recs []*kgo.Record) {
	now := time.Now()
	entries := make([]entry, 0, len(recs))
	waiting := make(map[int32]bool)
	s.mu.Lock()
	for _, r := range recs {
		st := s.parts[r.Partition]
		if st == nil {
			st = &partState{memos: make(map[int64]memo)}
			s.parts[r.Partition] = st
		}
		if st.paused || waiting[r.Partition] {
			continue // fetched before the partition was rewound, or behind a wait
		}
		m := st.memos[r.Offset]
		switch {
		case m.settled:
			entries = append(entries, entry{rec: r, done: true})
		case m.notBefore.After(now):
			entries = append(entries, entry{rec: r, attempt: m.attempts, waitUntil: m.notBefore})
			waiting[r.Partition] = true
		default:
			entries = append(entries, entry{rec: r, attempt: m.attempts + 1})
		}
	}
	s.mu.Unlock()

	batch := make([]*broker.Delivery, 0, len(entries))
	for i := range entries {
		e := &entries[i]
		if e.done || !e.waitUntil.IsZero() {
			continue
		}
		m, err := decode(e.rec)
		if err != nil {
			e.decodeErr = err
			continue
		}
		e.d = &broker.Delivery{Msg: m, Topic: e.rec.Topic, Attempt: e.attempt}
		batch = append(batch, e.d)
	}
	if len(batch) > 0 {
		s.call(batch)
	}

	held := make(map[int32]kgo.EpochOffset)
	for _, e := range entries {
		settled, until := e.done, e.waitUntil
		if !e.done && until.IsZero() {
			delay, redeliver := s.settle(e)
			settled, until = !redeliver, time.Now().Add(delay)
		}
		p := e.rec.Partition
		_, behind := held[p]
		switch {
		case behind:
			s.remember(e, settled, until)
		case settled:
			s.advance(e.rec)
		default:
			s.hold(e, until)
			held[p] = kgo.EpochOffset{Epoch: -1, Offset: e.rec.Offset}
		}
	}

	if err := s.commit(s.ioCtx, s.client); err != nil {
		s.log.Warn("kafka: commit failed; will retry", "err", err)
	}
	if len(held) > 0 {
		// Pause first, so that nothing is fetched from the old position,
		// then rewind to the record to redeliver. Both happen while the
		// poll blocks rebalances, so the partitions are still ours.
		s.client.PauseFetchPartitions(map[string][]int32{s.cfg.Topic: slices.Collect(maps.Keys(held))})
		s.client.SetOffsets(map[string]map[int32]kgo.EpochOffset{s.cfg.Topic: held})
	}
}

// call calls the handler. A panic is logged with its stack and leaves the
// deliveries the handler had not settled unsettled, so they are delivered
// again after NakDelay, counted, and dead-lettered once the panic has used
// up MaxDeliver attempts. Without the recover, a panic would end the process
// before the delivery count reached the commit, and the message would come
// back as the same attempt after every restart.
func (s *subscription) call(batch []*broker.Delivery) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("kafka: handler panicked; its unsettled deliveries will be redelivered",
				"panic", r, "deliveries", len(batch), "stack", string(debug.Stack()))
		}
	}()
	s.h(s.handlerCtx, batch)
}

// settle carries out e's settlement. It reports whether the record must be
// delivered again, and after which delay.
func (s *subscription) settle(e entry) (delay time.Duration, redeliver bool) {
	if e.decodeErr != nil {
		reason := e.decodeErr.Error()
		if err := s.deadLetterRecord(e.rec, reason, e.attempt); err != nil {
			s.log.Error("kafka: dead-letter undecodable record failed; will retry",
				"partition", e.rec.Partition, "offset", e.rec.Offset, "err", err)
			return s.cfg.NakDelay, true
		}
		return 0, false
	}
	settlement, delay, reason := e.d.Settlement()
	switch settlement {
	case broker.Acked:
		return 0, false
	case broker.DeadLettered:
	default: // Naked, Unsettled
		if e.attempt < s.cfg.MaxDeliver {
			if settlement == broker.Unsettled || delay <= 0 {
				delay = s.cfg.NakDelay
			}
			return delay, true
		}
		reason = fmt.Sprintf("not handled after %d deliveries", e.attempt)
	}
	m := broker.DeadLetterMessage(e.d, s.cfg.Group, reason)
	if err := s.b.publish(s.ioCtx, s.cfg.DeadLetterTopic, m); err != nil {
		s.log.Error("kafka: dead-letter failed; will retry",
			"partition", e.rec.Partition, "offset", e.rec.Offset, "id", e.d.Msg.ID, "err", err)
		return s.cfg.NakDelay, true
	}
	return 0, false
}

// hold makes e's record the partition's next delivery, no sooner than
// until, and the position to commit.
func (s *subscription) hold(e entry, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.parts[e.rec.Partition]
	if st == nil {
		return // no longer ours
	}
	st.memos[e.rec.Offset] = memo{attempts: e.attempt}
	st.paused = true
	st.resumeAt = until
	s.pending[e.rec.Partition] = position{
		EpochOffset: kgo.EpochOffset{Epoch: e.rec.LeaderEpoch, Offset: e.rec.Offset},
		attempts:    e.attempt,
	}
}

// remember notes the settlement of e's record, handled behind a record that
// waits for its redelivery.
func (s *subscription) remember(e entry, settled bool, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.parts[e.rec.Partition]
	if st == nil {
		return // no longer ours
	}
	m := memo{attempts: e.attempt, settled: settled}
	if !settled {
		m.notBefore = until
	}
	st.memos[e.rec.Offset] = m
}

// advance moves the partition's position to commit past r, which is settled.
func (s *subscription) advance(r *kgo.Record) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.parts[r.Partition]
	if st == nil {
		return // no longer ours
	}
	for off := range st.memos {
		if off <= r.Offset {
			delete(st.memos, off)
		}
	}
	s.pending[r.Partition] = position{EpochOffset: kgo.EpochOffset{Epoch: r.LeaderEpoch, Offset: r.Offset + 1}}
}

// resumeDue resumes fetching the partitions whose redelivery delay has
// passed, and returns how long until the next one is due (0 if none waits).
func (s *subscription) resumeDue(now time.Time) time.Duration {
	var (
		resume []int32
		next   time.Time
	)
	s.mu.Lock()
	for p, st := range s.parts {
		switch {
		case !st.paused:
		case !now.Before(st.resumeAt):
			st.paused = false
			resume = append(resume, p)
		case next.IsZero() || st.resumeAt.Before(next):
			next = st.resumeAt
		}
	}
	s.mu.Unlock()
	if len(resume) > 0 {
		s.client.ResumeFetchPartitions(map[string][]int32{s.cfg.Topic: resume})
	}
	if next.IsZero() {
		return 0
	}
	return max(next.Sub(now), time.Millisecond)
}

// commit commits the positions not yet committed. The position of a
// partition waiting for a redelivery carries the delivery count in its
// commit metadata.
func (s *subscription) commit(ctx context.Context, cl *kgo.Client) error {
	s.mu.Lock()
	if len(s.pending) == 0 {
		s.mu.Unlock()
		return nil
	}
	positions := maps.Clone(s.pending)
	s.mu.Unlock()

	offsets := make(map[int32]kgo.EpochOffset, len(positions))
	for p, pos := range positions {
		offsets[p] = pos.EpochOffset
	}
	ctx = kgo.PreCommitFnContext(ctx, func(req *kmsg.OffsetCommitRequest) error {
		for i := range req.Topics {
			if req.Topics[i].Topic != s.cfg.Topic {
				continue
			}
			for j := range req.Topics[i].Partitions {
				rp := &req.Topics[i].Partitions[j]
				if pos := positions[rp.Partition]; pos.attempts > 0 {
					meta := attemptsMeta + strconv.Itoa(pos.attempts)
					rp.Metadata = &meta
				}
			}
		}
		return nil
	})
	var errs []error
	cl.CommitOffsetsSync(ctx, map[string]map[int32]kgo.EpochOffset{s.cfg.Topic: offsets},
		func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
			if err != nil {
				errs = append(errs, err)
				return
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			for _, t := range resp.Topics {
				for _, p := range t.Partitions {
					if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
						errs = append(errs, fmt.Errorf("partition %d: %w", p.Partition, err))
						continue
					}
					if cur, ok := s.pending[p.Partition]; ok && cur == positions[p.Partition] {
						delete(s.pending, p.Partition)
					}
				}
			}
		})
	if len(errs) > 0 {
		return fmt.Errorf("kafka: commit offsets of group %q on %q: %w", s.cfg.Group, s.cfg.Topic, errors.Join(errs...))
	}
	return nil
}

// onOffsetsFetched reads the delivery counts that the partitions' previous
// owners left in the commit metadata. The client calls it for newly
// assigned partitions before fetching from them.
func (s *subscription) onOffsetsFetched(_ context.Context, _ *kgo.Client, resp *kmsg.OffsetFetchResponse) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	note := func(topic string, partition int32, offset int64, meta *string, code int16) {
		if topic != s.cfg.Topic || code != 0 || offset < 0 || meta == nil || !strings.HasPrefix(*meta, attemptsMeta) {
			return
		}
		n, err := strconv.Atoi(strings.TrimPrefix(*meta, attemptsMeta))
		if err != nil || n <= 0 {
			return
		}
		if _, known := s.parts[partition]; !known {
			s.parts[partition] = &partState{memos: map[int64]memo{offset: {attempts: n}}}
		}
	}
	for _, t := range resp.Topics { // OffsetFetch v0-v7
		for _, p := range t.Partitions {
			note(t.Topic, p.Partition, p.Offset, p.Metadata, p.ErrorCode)
		}
	}
	for _, g := range resp.Groups { // v8+
		for _, t := range g.Topics {
			topic := t.Topic
			if topic == "" {
				// v10+ names topics by id; the member consumes one topic.
				topic = s.cfg.Topic
			}
			for _, p := range t.Partitions {
				note(topic, p.Partition, p.Offset, p.Metadata, p.ErrorCode)
			}
		}
	}
	return nil
}

// onRevoked commits what is settled before the partitions go to another
// member, then forgets them. The client calls it when no poll is being
// processed (BlockRebalanceOnPoll).
func (s *subscription) onRevoked(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
	if err := s.commit(ctx, cl); err != nil {
		s.log.Warn("kafka: commit before rebalance failed; the partitions' settled records will be redelivered", "err", err)
	}
	s.forgetPartitions(cl, revoked[s.cfg.Topic])
}

// onLost forgets partitions taken away without a chance to commit.
func (s *subscription) onLost(_ context.Context, cl *kgo.Client, lost map[string][]int32) {
	s.forgetPartitions(cl, lost[s.cfg.Topic])
}

// forgetPartitions drops the state of partitions this member no longer owns.
// Offsets still uncommitted are dropped too: committing them later could
// rewind the new owner's progress.
func (s *subscription) forgetPartitions(cl *kgo.Client, parts []int32) {
	var resume []int32
	s.mu.Lock()
	for _, p := range parts {
		if st := s.parts[p]; st != nil && st.paused {
			resume = append(resume, p)
		}
		delete(s.parts, p)
		delete(s.pending, p)
	}
	s.mu.Unlock()
	if len(resume) > 0 {
		// Pauses outlive assignments; a partition assigned again later
		// starts from its committed offset, unpaused.
		cl.ResumeFetchPartitions(map[string][]int32{s.cfg.Topic: resume})
	}
}

// decode reads r as a CloudEvent in Kafka binary mode.
func decode(r *kgo.Record) (*message.Message, error) {
	headers := make([]message.Header, len(r.Headers))
	for i, h := range r.Headers {
		headers[i] = message.Header{Key: h.Key, Value: string(h.Value)}
	}
	return message.Kafka.Decode(headers, r.Value)
}

// deadLetterRecord publishes r unchanged to the dead-letter topic with the
// dead-letter extension headers added.
func (s *subscription) deadLetterRecord(r *kgo.Record, reason string, attempt int) error {
	ext := map[string]string{
		broker.ExtDeadLetterReason:   reason,
		broker.ExtDeadLetterTopic:    r.Topic,
		broker.ExtDeadLetterGroup:    s.cfg.Group,
		broker.ExtDeadLetterAttempts: strconv.Itoa(attempt),
	}
	headerPrefix := message.Kafka.Prefix()
	out := &kgo.Record{Topic: s.cfg.DeadLetterTopic, Key: r.Key, Value: r.Value}
	for _, h := range r.Headers {
		if name, ok := strings.CutPrefix(h.Key, headerPrefix); ok {
			if _, replaced := ext[name]; replaced {
				continue
			}
		}
		out.Headers = append(out.Headers, h)
	}
	for _, name := range []string{broker.ExtDeadLetterReason, broker.ExtDeadLetterTopic, broker.ExtDeadLetterGroup, broker.ExtDeadLetterAttempts} {
		out.Headers = append(out.Headers, kgo.RecordHeader{Key: headerPrefix + name, Value: []byte(ext[name])})
	}
	if err := s.b.ensureTopic(s.ioCtx, s.cfg.DeadLetterTopic); err != nil {
		return err
	}
	return s.b.client.ProduceSync(s.ioCtx, out).FirstErr()
}
