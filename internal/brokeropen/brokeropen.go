// Package brokeropen opens a broker from the short specs the troupe command
// accepts: "nats" (embedded), "nats://host:port", "kafka" (an in-process
// three-broker cluster speaking the Kafka protocol) and
// "kafka://host:port[,host:port...]".
package brokeropen

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/kafka"
	"github.com/troupedev/troupe/broker/natsjs"
)

// Opened is an open broker and what it runs on.
type Opened struct {
	// Broker is the open broker.
	Broker broker.Broker
	// Description says what the broker is, for reports ("embedded NATS
	// JetStream, file storage in DIR").
	Description string

	close func() error
}

// Close closes the broker and anything started for it.
func (o *Opened) Close() error { return o.close() }

// Usage lists the accepted specs.
const Usage = `"nats" (embedded NATS JetStream), "nats://HOST:PORT", "kafka" (in-process Kafka-protocol cluster), "kafka://HOST:PORT[,HOST:PORT]"`

// ErrUnknownSpec is returned for a spec that names no known broker.
var ErrUnknownSpec = errors.New("unknown broker")

// Open opens the broker named by spec. dataDir holds the embedded NATS
// server's files.
func Open(ctx context.Context, spec, dataDir string, log *slog.Logger) (*Opened, error) {
	switch {
	case spec == "nats" || spec == "":
		dir := filepath.Join(dataDir, "nats")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("broker data dir: %w", err)
		}
		b, err := natsjs.New(ctx, natsjs.Config{DataDir: dir, Logger: log})
		if err != nil {
			return nil, err
		}
		return &Opened{Broker: b, Description: "embedded NATS JetStream, file storage in " + dir, close: b.Close}, nil
	case strings.HasPrefix(spec, "nats://") || strings.HasPrefix(spec, "tls://"):
		b, err := natsjs.New(ctx, natsjs.Config{URL: spec, Logger: log})
		if err != nil {
			return nil, err
		}
		return &Opened{Broker: b, Description: "NATS JetStream at " + redact(spec), close: b.Close}, nil
	case spec == "kafka":
		c, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.AllowAutoTopicCreation())
		if err != nil {
			return nil, fmt.Errorf("start in-process Kafka cluster: %w", err)
		}
		b, err := kafka.New(ctx, kafka.Config{Brokers: c.ListenAddrs(), Logger: log})
		if err != nil {
			c.Close()
			return nil, err
		}
		return &Opened{
			Broker:      b,
			Description: "in-process Kafka-protocol cluster (3 brokers, in memory)",
			close: func() error {
				err := b.Close()
				c.Close()
				return err
			},
		}, nil
	case strings.HasPrefix(spec, "kafka://"):
		addrs := strings.Split(strings.TrimPrefix(spec, "kafka://"), ",")
		b, err := kafka.New(ctx, kafka.Config{Brokers: addrs, Logger: log})
		if err != nil {
			return nil, err
		}
		return &Opened{Broker: b, Description: "Kafka at " + strings.Join(addrs, ","), close: b.Close}, nil
	}
	return nil, fmt.Errorf("%w %q: use %s", ErrUnknownSpec, spec, Usage)
}

// redact returns the URL spec with any password replaced, for descriptions
// that end up in reports.
func redact(spec string) string {
	u, err := url.Parse(spec)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}
