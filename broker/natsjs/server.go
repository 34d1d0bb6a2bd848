package natsjs

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/nats-io/nats-server/v2/server"
)

// startServer starts the embedded server that cfg describes and waits until
// it accepts clients.
func startServer(cfg Config) (*server.Server, error) {
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("natsjs: create DataDir %q: %w", cfg.DataDir, err)
	}
	opts := &server.Options{
		ServerName:   "troupe",
		JetStream:    true,
		StoreDir:     cfg.DataDir,
		SyncInterval: cfg.SyncInterval,
		SyncAlways:   cfg.SyncAlways,
		NoSigs:       true,
		DontListen:   cfg.ListenAddr == "",
	}
	if cfg.ListenAddr != "" {
		host, port, err := splitListenAddr(cfg.ListenAddr)
		if err != nil {
			return nil, err
		}
		opts.Host, opts.Port = host, port
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("natsjs: embedded server in %q: %w", cfg.DataDir, err)
	}
	srv.SetLogger(serverLog{cfg.Logger.With("component", "nats-server")}, false, false)
	srv.Start()
	if !srv.ReadyForConnections(cfg.ConnectTimeout) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("natsjs: embedded server in %q (listen %q) not ready within %v; see the log for why",
			cfg.DataDir, cfg.ListenAddr, cfg.ConnectTimeout)
	}
	if !srv.JetStreamEnabled() {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("natsjs: embedded server could not enable JetStream in %q; see the log for why", cfg.DataDir)
	}
	return srv, nil
}

// serverLog passes the embedded server's log to a slog.Logger.
type serverLog struct{ l *slog.Logger }

func (s serverLog) logf(level slog.Level, format string, v ...any) {
	if s.l.Enabled(context.Background(), level) {
		s.l.Log(context.Background(), level, fmt.Sprintf(format, v...))
	}
}

func (s serverLog) Noticef(format string, v ...any) { s.logf(slog.LevelDebug, format, v...) }
func (s serverLog) Warnf(format string, v ...any)   { s.logf(slog.LevelWarn, format, v...) }
func (s serverLog) Fatalf(format string, v ...any)  { s.logf(slog.LevelError, format, v...) }
func (s serverLog) Errorf(format string, v ...any)  { s.logf(slog.LevelError, format, v...) }
func (s serverLog) Debugf(format string, v ...any)  { s.logf(slog.LevelDebug, format, v...) }
func (s serverLog) Tracef(format string, v ...any)  { s.logf(slog.LevelDebug-4, format, v...) }
