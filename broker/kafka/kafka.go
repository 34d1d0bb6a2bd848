package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/troupedev/troupe/broker"
)

// ErrUnreachable is returned by [New] when no seed broker answers within
// [Config.DialTimeout].
var ErrUnreachable = errors.New("kafka: brokers unreachable")

// Config configures a [Broker].
type Config struct {
	// Brokers lists the seed brokers as host:port. Required.
	Brokers []string
	// ClientID names this client to the cluster, in its logs and quotas.
	// Default "troupe".
	ClientID string
	// Partitions is the partition count of the topics the broker creates
	// when they are missing. Messages with the same subject always land on
	// the same partition, so more partitions mean more parallelism across
	// subjects. Default 6.
	Partitions int
	// ReplicationFactor is the replication factor of the topics the broker
	// creates. Default -1: the cluster's default.
	ReplicationFactor int
	// SessionTimeout is how long the group coordinator waits for a
	// heartbeat before it declares a consumer dead and hands its partitions
	// to the other members. It bounds how long the records of a crashed
	// consumer wait before redelivery. It must lie within the cluster's
	// group.min.session.timeout.ms and group.max.session.timeout.ms.
	// Default 45s.
	SessionTimeout time.Duration
	// DialTimeout bounds each connection attempt, and the check in [New]
	// that a broker answers. Default 5s.
	DialTimeout time.Duration
	// Logger receives the broker's warnings and errors, and the client
	// library's. Default: discard.
	Logger *slog.Logger
	// Options are appended to the options of every client the broker
	// opens (the producer, and each subscription's group member), after
	// Troupe's own, so they can override them. This is where connection
	// settings go: kgo.DialTLSConfig(tlsConfig) for TLS,
	// kgo.SASL(scram.Auth{...}.AsSha512Mechanism()) for SASL. Default none.
	Options []kgo.Opt
}

func (cfg Config) withDefaults() Config {
	if cfg.ClientID == "" {
		cfg.ClientID = "troupe"
	}
	if cfg.Partitions == 0 {
		cfg.Partitions = 6
	}
	if cfg.ReplicationFactor == 0 {
		cfg.ReplicationFactor = -1
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

func (cfg Config) validate() error {
	var errs []error
	if len(cfg.Brokers) == 0 {
		errs = append(errs, errors.New("kafka: Brokers is required"))
	}
	for i, b := range cfg.Brokers {
		if strings.TrimSpace(b) == "" {
			errs = append(errs, fmt.Errorf("kafka: Brokers[%d] is empty", i))
		}
	}
	if cfg.Partitions < 0 || cfg.Partitions > math.MaxInt32 {
		errs = append(errs, fmt.Errorf("kafka: Partitions must be positive, got %d", cfg.Partitions))
	}
	if cfg.ReplicationFactor < -1 || cfg.ReplicationFactor > math.MaxInt16 {
		errs = append(errs, fmt.Errorf("kafka: ReplicationFactor must be -1 or positive, got %d", cfg.ReplicationFactor))
	}
	if cfg.SessionTimeout < 0 {
		errs = append(errs, fmt.Errorf("kafka: SessionTimeout must not be negative, got %s", cfg.SessionTimeout))
	}
	if cfg.DialTimeout < 0 {
		errs = append(errs, fmt.Errorf("kafka: DialTimeout must not be negative, got %s", cfg.DialTimeout))
	}
	return errors.Join(errs...)
}

// Broker publishes to and subscribes to Kafka topics. It implements
// [broker.Broker]. It is safe for concurrent use.
type Broker struct {
	cfg    Config
	client *kgo.Client // producer and admin requests
	admin  *kadm.Client
	log    *slog.Logger

	topicsMu sync.Mutex
	topics   map[string]bool // topics known to exist

	mu     sync.Mutex
	closed bool
	subs   map[*subscription]struct{}
}

var _ broker.Broker = (*Broker)(nil)

// New connects to the cluster at cfg.Brokers and returns a Broker. It checks
// that a broker answers a metadata request within cfg.DialTimeout and returns
// an error wrapping [ErrUnreachable] that names the addresses otherwise.
func New(ctx context.Context, cfg Config) (*Broker, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	opts := append(clientOptions(cfg),
		// The producer is idempotent (the client's default) and waits for
		// every in-sync replica, so an accepted message survives the loss
		// of the partition leader and a retried send is not duplicated.
		kgo.RequiredAcks(kgo.AllISRAcks()),
	)
	client, err := kgo.NewClient(append(opts, cfg.Options...)...)
	if err != nil {
		return nil, fmt.Errorf("kafka: new client: %w", err)
	}
	if err := ping(ctx, client, cfg.DialTimeout); err != nil {
		return nil, fmt.Errorf("%w: no answer from %s within %s: %w",
			ErrUnreachable, strings.Join(cfg.Brokers, ", "), cfg.DialTimeout, err)
	}
	return &Broker{
		cfg:    cfg,
		client: client,
		admin:  kadm.NewClient(client),
		log:    cfg.Logger,
		topics: make(map[string]bool),
		subs:   make(map[*subscription]struct{}),
	}, nil
}

// ping asks the cluster for metadata and waits for the answer until timeout
// or ctx ends; on failure it closes client. The client bounds a
// connection's first exchange by its own, longer request timeout, so ping
// does not rely on it to give up: closing the client ends the request.
func ping(ctx context.Context, client *kgo.Client, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- client.Ping(ctx) }()
	select {
	case err := <-errc:
		if err != nil {
			client.Close()
		}
		return err
	case <-ctx.Done():
		client.Close()
		<-errc
		return ctx.Err()
	}
}

// clientOptions returns the options every client of the broker starts with.
func clientOptions(cfg Config) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ClientID(cfg.ClientID),
		kgo.DialTimeout(cfg.DialTimeout),
		kgo.WithLogger(kgoLogger{cfg.Logger}),
	}
}

// Close stops every subscription and closes the broker's connections. The
// context of handler calls still running is canceled, and Close waits for
// them to return; what they settled is committed. Calls after Close return
// [broker.ErrClosed].
func (b *Broker) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	subs := make([]*subscription, 0, len(b.subs))
	for s := range b.subs {
		subs = append(subs, s)
	}
	b.mu.Unlock()

	var errs []error
	for _, s := range subs {
		s.cancelHandlers()
	}
	for _, s := range subs {
		if err := s.Stop(context.Background()); err != nil {
			errs = append(errs, err)
		}
	}
	b.client.Close()
	return errors.Join(errs...)
}

func (b *Broker) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// ensureTopic creates topic with the configured partitions and replication
// factor unless it exists. Topics are checked once per Broker.
func (b *Broker) ensureTopic(ctx context.Context, topic string) error {
	b.topicsMu.Lock()
	known := b.topics[topic]
	b.topicsMu.Unlock()
	if known {
		return nil
	}
	details, err := b.admin.ListTopics(ctx, topic)
	if err != nil {
		return fmt.Errorf("kafka: describe topic %q: %w", topic, err)
	}
	if d, ok := details[topic]; ok && !errors.Is(d.Err, kerr.UnknownTopicOrPartition) {
		// It exists; an error such as LeaderNotAvailable, while the
		// cluster elects leaders for a new topic, is the client's to retry.
		b.markTopic(topic)
		return nil
	}
	_, err = b.admin.CreateTopic(ctx, int32(b.cfg.Partitions), int16(b.cfg.ReplicationFactor), nil, topic)
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("kafka: create topic %q: %w", topic, err)
	}
	b.markTopic(topic)
	return nil
}

func (b *Broker) markTopic(topic string) {
	b.topicsMu.Lock()
	b.topics[topic] = true
	b.topicsMu.Unlock()
}

// kgoLogger passes the client library's warnings and errors to slog.
type kgoLogger struct{ log *slog.Logger }

func (l kgoLogger) Level() kgo.LogLevel { return kgo.LogLevelWarn }

func (l kgoLogger) Log(level kgo.LogLevel, msg string, keyvals ...any) {
	lvl := slog.LevelWarn
	if level == kgo.LogLevelError {
		lvl = slog.LevelError
	}
	l.log.Log(context.Background(), lvl, "kafka client: "+msg, keyvals...)
}
