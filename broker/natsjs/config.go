package natsjs

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config configures a [Broker]. The zero value is not valid: set URL to use a
// remote server, or DataDir (or Server) to use an embedded one.
type Config struct {
	// URL of a remote NATS server (or a comma-separated list of a cluster's
	// servers) with JetStream enabled, such as "nats://nats.internal:4222".
	// Empty means embedded: the broker starts a server in this process, or
	// joins Server.
	URL string

	// ConnectTimeout bounds connecting to URL, and the embedded server's
	// start. Default 5s.
	ConnectTimeout time.Duration

	// DataDir is where the embedded server keeps its JetStream files. It is
	// created if missing. Required when embedded, unless Server is set;
	// ignored with URL.
	DataDir string

	// ListenAddr, if set, makes the embedded server also accept TCP clients
	// on this host:port, such as "127.0.0.1:4222" ("127.0.0.1:0" picks a free
	// port; see [Broker.ClientURL]), so that other processes and the nats
	// command line tool can connect. An empty host means 127.0.0.1.
	// Default: no listener; clients in this process connect in-process.
	ListenAddr string

	// Server, if set, is an embedded server already running in this process,
	// typically another Broker's [Broker.Server]: the broker connects to it
	// in-process instead of starting its own, and does not shut it down on
	// Close. DataDir, ListenAddr, SyncInterval and SyncAlways are then
	// ignored.
	Server *server.Server

	// SyncInterval is how often the embedded server flushes its JetStream
	// files to disk with fsync. Default (zero): the server's own default, two
	// minutes.
	//
	// Durability: Publish returns once the server has written the messages
	// to its files, so a crash of this process loses nothing that Publish
	// acknowledged (the operating system still holds the writes). A crash of
	// the operating system or a power loss can lose what was written since
	// the last sync. Set SyncAlways to close that window at the cost of one
	// fsync per write.
	SyncInterval time.Duration

	// SyncAlways makes the embedded server fsync every write before
	// acknowledging it: nothing acknowledged is lost even to a power loss,
	// and each Publish waits for the disk. Default false.
	SyncAlways bool

	// Replicas is the number of copies of each stream the broker creates, for
	// a clustered server. Default 1; at most 5.
	Replicas int

	// DedupWindow is how long the server remembers the Nats-Msg-Id of
	// each stored message, to drop a message re-published to the same
	// topic with the same source and id (see the package documentation).
	// It applies to the streams the broker creates. Default 2 minutes; at
	// most MaxAge.
	DedupWindow time.Duration

	// MaxAge is how long a stream keeps its messages. Streams use limits
	// retention: a message stays for MaxAge whether or not consumer groups
	// have acknowledged it, so every group reads every message, a group
	// created later starts from the oldest kept message, and a group can be
	// replayed. A group that stays away longer than MaxAge misses what
	// expired meanwhile. Default 7 days.
	MaxAge time.Duration

	// PublishTimeout bounds how long Publish waits for the server to
	// acknowledge a batch when its context has no earlier deadline.
	// Default 30s.
	PublishTimeout time.Duration

	// Logger receives the broker's log and the embedded server's (its
	// start-up notices at Debug level, its warnings and errors as such).
	// Default: discard.
	Logger *slog.Logger
}

// Defaults of [Config] fields.
const (
	DefaultConnectTimeout = 5 * time.Second
	DefaultDedupWindow    = 2 * time.Minute
	DefaultMaxAge         = 7 * 24 * time.Hour
	DefaultPublishTimeout = 30 * time.Second
)

// withDefaults returns cfg with every unset field given its default.
func (cfg Config) withDefaults() Config {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.DedupWindow <= 0 {
		cfg.DedupWindow = DefaultDedupWindow
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.PublishTimeout <= 0 {
		cfg.PublishTimeout = DefaultPublishTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg
}

// embedded reports whether cfg asks for an embedded server of its own.
func (cfg Config) embedded() bool { return cfg.URL == "" && cfg.Server == nil }

// validate reports every problem with cfg (after defaults) at once.
func (cfg Config) validate() error {
	var errs []error
	if cfg.URL != "" && cfg.Server != nil {
		errs = append(errs, errors.New("natsjs: set URL or Server, not both"))
	}
	if cfg.embedded() && cfg.DataDir == "" {
		errs = append(errs, errors.New("natsjs: DataDir is required for an embedded server (or set URL for a remote one)"))
	}
	if cfg.ListenAddr != "" {
		if !cfg.embedded() {
			errs = append(errs, errors.New("natsjs: ListenAddr applies only to the broker's own embedded server"))
		} else if _, _, err := splitListenAddr(cfg.ListenAddr); err != nil {
			errs = append(errs, err)
		}
	}
	if cfg.Replicas > 5 {
		errs = append(errs, fmt.Errorf("natsjs: Replicas is %d, at most 5", cfg.Replicas))
	}
	if cfg.SyncInterval < 0 {
		errs = append(errs, fmt.Errorf("natsjs: SyncInterval is negative (%v)", cfg.SyncInterval))
	}
	if cfg.DedupWindow > cfg.MaxAge {
		errs = append(errs, fmt.Errorf("natsjs: DedupWindow %v is longer than MaxAge %v", cfg.DedupWindow, cfg.MaxAge))
	}
	return errors.Join(errs...)
}

// splitListenAddr parses a host:port listen address; port 0 becomes the
// server's "random port".
func splitListenAddr(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("natsjs: ListenAddr %q: %w", addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("natsjs: ListenAddr %q: port must be 0-65535", addr)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return host, port, nil
}
