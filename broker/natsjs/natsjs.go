package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/troupedev/troupe/broker"
)

// Broker is a [broker.Broker] on NATS JetStream. It is safe for concurrent
// use.
type Broker struct {
	cfg       Config
	log       *slog.Logger
	srv       *server.Server // the embedded server, own or shared; nil when remote
	ownServer bool
	nc        *nats.Conn
	js        jetstream.JetStream

	// streamMu serialises stream lookups and creation, which happen once
	// per topic.
	streamMu sync.Mutex

	mu      sync.Mutex
	closed  bool
	streams map[string]string // topic → stream name
	subs    map[*subscription]struct{}
}

var _ broker.Broker = (*Broker)(nil)

// New connects to the server cfg names, starting an embedded one when
// cfg.URL and cfg.Server are empty, and checks that JetStream is available.
// ctx bounds the start only; the broker runs until Close.
func New(ctx context.Context, cfg Config) (*Broker, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	b := &Broker{
		cfg:     cfg,
		log:     cfg.Logger,
		streams: make(map[string]string),
		subs:    make(map[*subscription]struct{}),
	}
	opts := []nats.Option{
		nats.Name("troupe"),
		nats.Timeout(cfg.ConnectTimeout),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			b.log.Warn("nats: asynchronous error", "subject", subject, "err", err)
		}),
	}
	url := cfg.URL
	switch {
	case cfg.Server != nil:
		b.srv = cfg.Server
	case cfg.URL == "":
		srv, err := startServer(cfg)
		if err != nil {
			return nil, err
		}
		b.srv, b.ownServer = srv, true
	default:
		opts = append(opts,
			nats.MaxReconnects(-1),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				if err != nil {
					b.log.Warn("nats: disconnected", "err", err)
				}
			}),
			nats.ReconnectHandler(func(nc *nats.Conn) {
				b.log.Info("nats: reconnected", "server", nc.ConnectedUrlRedacted())
			}),
		)
	}
	if b.srv != nil {
		url = b.srv.ClientURL()
		opts = append(opts, nats.InProcessServer(b.srv))
	}

	fail := func(err error) (*Broker, error) {
		if b.nc != nil {
			b.nc.Close()
		}
		b.shutdownServer()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return fail(fmt.Errorf("natsjs: connect: %w", err))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return fail(fmt.Errorf("natsjs: connect to %s: %w", b.describeServer(), err))
	}
	b.nc = nc
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(publishWindow*4))
	if err != nil {
		return fail(fmt.Errorf("natsjs: %w", err))
	}
	b.js = js
	actx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	defer cancel()
	if _, err := js.AccountInfo(actx); err != nil {
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			return fail(fmt.Errorf("natsjs: %s does not have JetStream enabled: %w", b.describeServer(), err))
		}
		return fail(fmt.Errorf("natsjs: JetStream at %s: %w", b.describeServer(), err))
	}
	return b, nil
}

// describeServer names the server the broker uses, for error messages:
// the URL without its password, or the embedded server's directory.
func (b *Broker) describeServer() string {
	switch {
	case b.cfg.URL != "":
		return redactURL(b.cfg.URL)
	case b.ownServer:
		return fmt.Sprintf("the embedded server (DataDir %q)", b.cfg.DataDir)
	default:
		return "the shared embedded server"
	}
}

// redactURL hides the passwords and tokens in a comma-separated URL list.
func redactURL(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		u, err := url.Parse(strings.TrimSpace(p))
		if err != nil || u.User == nil {
			continue
		}
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		} else {
			u.User = url.User("xxxxx")
		}
		parts[i] = u.String()
	}
	return strings.Join(parts, ",")
}

// Server returns the embedded server the broker uses, to share it with other
// brokers in this process through [Config].Server; nil when the broker uses a
// remote server.
func (b *Broker) Server() *server.Server { return b.srv }

// ClientURL returns the URL at which other processes reach the broker's
// server: the embedded server's TCP listener (see [Config].ListenAddr), or
// Config.URL. It is empty for an embedded server without a listener.
func (b *Broker) ClientURL() string {
	if b.cfg.URL != "" {
		return b.cfg.URL
	}
	if b.srv == nil || b.srv.Addr() == nil {
		return ""
	}
	return b.srv.ClientURL()
}

// Close stops every subscription (canceling the context of running handler
// calls and waiting for them to return), closes the connection, and shuts
// the broker's own embedded server down, waiting until it has. A handler
// that ignores its context delays Close. Calls after the first return nil.
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

	for _, s := range subs {
		s.cancelRun()
	}
	for _, s := range subs {
		<-s.done
	}
	if err := b.nc.FlushTimeout(time.Second); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		b.log.Warn("natsjs: flush on close", "err", err)
	}
	b.nc.Close()
	b.shutdownServer()
	return nil
}

// shutdownServer shuts the broker's own embedded server down and waits.
func (b *Broker) shutdownServer() {
	if b.ownServer && b.srv != nil {
		b.srv.Shutdown()
		b.srv.WaitForShutdown()
	}
}

// checkOpen returns broker.ErrClosed once Close has been called.
func (b *Broker) checkOpen() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return broker.ErrClosed
	}
	return nil
}

// stream returns the name of the stream that stores topic, creating one
// named after the topic (see escapeName) on first use. A stream that already
// captures the topic's subject, such as one an operator created for
// "orders.>", is used as it is.
func (b *Broker) stream(ctx context.Context, topic string) (string, error) {
	b.mu.Lock()
	name, ok := b.streams[topic]
	b.mu.Unlock()
	if ok {
		return name, nil
	}

	b.streamMu.Lock()
	defer b.streamMu.Unlock()
	b.mu.Lock()
	name, ok = b.streams[topic]
	b.mu.Unlock()
	if ok {
		return name, nil
	}

	name, err := b.js.StreamNameBySubject(ctx, topic)
	switch {
	case err == nil:
		if name != escapeName(topic) {
			b.log.Info("natsjs: topic stored in an existing stream", "topic", topic, "stream", name)
		}
	case errors.Is(err, jetstream.ErrStreamNotFound):
		name = escapeName(topic)
		_, err = b.js.CreateStream(ctx, jetstream.StreamConfig{
			Name:        name,
			Description: "Troupe topic " + topic,
			Subjects:    []string{topic},
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
			Storage:     jetstream.FileStorage,
			Replicas:    b.cfg.Replicas,
			MaxAge:      b.cfg.MaxAge,
			Duplicates:  b.cfg.DedupWindow,
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			// Created meanwhile with other settings (another process with
			// another Config, or an operator's change): use it as it is.
			b.log.Warn("natsjs: stream exists with a different configuration; using it", "topic", topic, "stream", name)
			err = nil
		}
		if err != nil {
			return "", fmt.Errorf("natsjs: create stream %q for topic %q: %w", name, topic, err)
		}
		b.log.Debug("natsjs: created stream", "topic", topic, "stream", name)
	default:
		return "", fmt.Errorf("natsjs: look up the stream of topic %q: %w", topic, err)
	}

	b.mu.Lock()
	b.streams[topic] = name
	b.mu.Unlock()
	return name, nil
}

// forgetStream drops topic's cached stream, so that the next use looks it up
// (and creates it) again: for a stream deleted behind the broker's back.
func (b *Broker) forgetStream(topic string) {
	b.mu.Lock()
	delete(b.streams, topic)
	b.mu.Unlock()
}
