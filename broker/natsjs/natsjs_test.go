package natsjs

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/brokertest"
	"github.com/troupedev/troupe/message"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wait bounds every wait in these tests; a passing run never reaches it.
const wait = 20 * time.Second

// newBroker returns a broker for cfg, closed when the test ends.
func newBroker(t testing.TB, cfg Config) *Broker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	b, err := New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// embeddedFactory returns brokers that share one embedded server per test:
// the server's owner lives as long as the test, so the suite can close a
// client without losing the server.
func embeddedFactory() brokertest.Factory {
	var mu sync.Mutex
	owners := make(map[*testing.T]*Broker)
	return func(t *testing.T) broker.Broker {
		mu.Lock()
		owner, ok := owners[t]
		if !ok {
			owner = newBroker(t, Config{DataDir: t.TempDir()})
			owners[t] = owner
			t.Cleanup(func() {
				mu.Lock()
				delete(owners, t)
				mu.Unlock()
			})
		}
		mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		b, err := New(ctx, Config{Server: owner.Server()})
		if err != nil {
			t.Fatalf("New sharing the embedded server: %v", err)
		}
		return b
	}
}

func TestBroker_Conformance(t *testing.T) {
	brokertest.Run(t, embeddedFactory(), brokertest.Features{DedupByID: true, AttemptsSurviveCrash: true})
}

// collect returns a handler that acks every delivery and sends its message on
// the returned channel.
func collect() (broker.Handler, <-chan *broker.Delivery) {
	ch := make(chan *broker.Delivery, 1024)
	return func(_ context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			d.Ack()
			ch <- d
		}
	}, ch
}

// receive reads deliveries from ch until every id in want has arrived, and
// returns every delivery read.
func receive(t *testing.T, ch <-chan *broker.Delivery, want []*message.Message) []*broker.Delivery {
	t.Helper()
	missing := make(map[string]bool, len(want))
	for _, m := range want {
		missing[m.ID] = true
	}
	var all []*broker.Delivery
	timeout := time.After(wait)
	for len(missing) > 0 {
		select {
		case d := <-ch:
			all = append(all, d)
			delete(missing, d.Msg.ID)
		case <-timeout:
			t.Fatalf("%d of %d messages not received within %v", len(missing), len(want), wait)
		}
	}
	return all
}

func numbered(n int, subject string) []*message.Message {
	msgs := make([]*message.Message, n)
	for i := range msgs {
		msgs[i] = message.New("/test", "test.numbered", fmt.Appendf(nil, "%d", i))
		msgs[i].Subject = subject
	}
	return msgs
}

func publishAll(t *testing.T, b *Broker, topic string, batch int, msgs []*message.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	for start := 0; start < len(msgs); start += batch {
		if err := b.Publish(ctx, topic, msgs[start:min(start+batch, len(msgs))]...); err != nil {
			t.Fatalf("Publish: %v", err)
		}
	}
}

func subscribe(t *testing.T, b *Broker, cfg broker.SubscribeConfig, h broker.Handler) broker.Subscription {
	t.Helper()
	sub, err := b.Subscribe(t.Context(), cfg, h)
	if err != nil {
		t.Fatalf("Subscribe: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		_ = sub.Stop(ctx)
	})
	return sub
}

func stopSub(t *testing.T, sub broker.Subscription) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := sub.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}

// TestEmbedded_RestartLosesNoAcknowledgedMessage: every message Publish
// acknowledged is there after the embedded server restarts on the same
// DataDir, and a group resumes after its last ack.
func TestEmbedded_RestartLosesNoAcknowledgedMessage(t *testing.T) {
	const topic = "shop.orders"
	dir := t.TempDir()
	early, late := numbered(50, "order-1"), numbered(150, "order-1")

	before := newBroker(t, Config{DataDir: dir})
	publishAll(t, before, topic, 25, early)
	h, got := collect()
	sub := subscribe(t, before, broker.SubscribeConfig{Topic: topic, Group: "billing"}, h)
	receive(t, got, early)
	stopSub(t, sub)
	publishAll(t, before, topic, 50, late)
	if err := before.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	after := newBroker(t, Config{DataDir: dir})
	// A new group reads the stream from the start: all 200 are stored.
	h, audit := collect()
	subscribe(t, after, broker.SubscribeConfig{Topic: topic, Group: "audit"}, h)
	all := receive(t, audit, append(append([]*message.Message(nil), early...), late...))
	if len(all) != len(early)+len(late) {
		t.Errorf("new group got %d deliveries, want %d", len(all), len(early)+len(late))
	}
	// The old group resumes after its acks: only the late ones, in order.
	h, billing := collect()
	subscribe(t, after, broker.SubscribeConfig{Topic: topic, Group: "billing"}, h)
	for i, d := range receive(t, billing, late) {
		if d.Msg.ID != late[i].ID {
			t.Fatalf("billing delivery %d is %s (%s), want late message %d", i, d.Msg.ID, d.Msg.Data, i)
		}
	}
}

// TestEmbedded_ListenerServesOtherProcesses: with ListenAddr, a client that
// connects by URL over TCP publishes to and consumes from the embedded
// server.
func TestEmbedded_ListenerServesOtherProcesses(t *testing.T) {
	const topic = "signup.users"
	host := newBroker(t, Config{DataDir: t.TempDir(), ListenAddr: "127.0.0.1:0"})
	url := host.ClientURL()
	if !strings.HasPrefix(url, "nats://127.0.0.1:") {
		t.Fatalf("ClientURL = %q, want a loopback nats:// URL", url)
	}
	remote := newBroker(t, Config{URL: url})
	if remote.Server() != nil {
		t.Errorf("a broker connected by URL reports an embedded server")
	}

	toRemote, toHost := numbered(3, "u1"), numbered(3, "u2")
	h, got := collect()
	subscribe(t, remote, broker.SubscribeConfig{Topic: topic, Group: "mailer"}, h)
	publishAll(t, host, topic, 3, toRemote)
	receive(t, got, toRemote)

	h, got = collect()
	subscribe(t, host, broker.SubscribeConfig{Topic: topic + ".replies", Group: "mailer"}, h)
	publishAll(t, remote, topic+".replies", 3, toHost)
	receive(t, got, toHost)
}

// TestNew_UnreachableURLFailsWithinTimeout: a server that never answers makes
// New fail within the connect timeout, naming the URL (without password).
func TestNew_UnreachableURLFailsWithinTimeout(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var conns []net.Conn
	var mu sync.Mutex
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // held open, never answered
			mu.Unlock()
		}
	}()
	defer func() {
		silent.Close()
		<-accepted
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()

	refused, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusedAddr := refused.Addr().String()
	refused.Close()

	for _, tt := range []struct {
		name, url, want string
	}{
		{"silent server", "nats://troupe:s3cret@" + silent.Addr().String(), "nats://troupe:xxxxx@" + silent.Addr().String()},
		{"nothing listening", "nats://" + refusedAddr, "nats://" + refusedAddr},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const timeout = 300 * time.Millisecond
			start := time.Now()
			b, err := New(context.Background(), Config{URL: tt.url, ConnectTimeout: timeout})
			elapsed := time.Since(start)
			if err == nil {
				b.Close()
				t.Fatal("New succeeded without a server")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not name %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("error %q shows the password", err)
			}
			if elapsed > 10*timeout {
				t.Errorf("New took %v with ConnectTimeout %v", elapsed, timeout)
			}
		})
	}
}

// TestNew_DataDirThatCannotBeCreated: a DataDir below a regular file fails
// with an error naming it, and leaves no server running.
func TestNew_DataDirThatCannotBeCreated(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(file, "jetstream")
	b, err := New(context.Background(), Config{DataDir: dir})
	if err == nil {
		b.Close()
		t.Fatal("New succeeded with a DataDir below a file")
	}
	if !strings.Contains(err.Error(), dir) {
		t.Errorf("error %q does not name DataDir %q", err, dir)
	}
}

// TestConfig_ValidateReportsEveryProblem: one error lists each problem.
func TestConfig_ValidateReportsEveryProblem(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  Config
		want []string
	}{
		{"embedded without DataDir", Config{}, []string{"DataDir is required"}},
		{"everything wrong", Config{
			ListenAddr:   "localhost",
			Replicas:     7,
			SyncInterval: -time.Second,
			DedupWindow:  time.Hour,
			MaxAge:       time.Minute,
		}, []string{"DataDir is required", "ListenAddr", "Replicas is 7", "SyncInterval", "DedupWindow"}},
		{"URL and Server", Config{URL: "nats://x:4222", Server: newBroker(t, Config{DataDir: t.TempDir()}).Server()},
			[]string{"URL or Server"}},
		{"ListenAddr with URL", Config{URL: "nats://x:4222", ListenAddr: "127.0.0.1:0"}, []string{"ListenAddr applies only"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(context.Background(), tt.cfg)
			if err == nil {
				t.Fatal("New accepted the config")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestNames_InvalidTopicsAndGroupsRejected: names that are not
// dot-separated tokens of letters, digits, '-' and '_' are refused before
// reaching the server.
func TestNames_InvalidTopicsAndGroupsRejected(t *testing.T) {
	b := newBroker(t, Config{DataDir: t.TempDir()})
	ctx := t.Context()
	for _, topic := range []string{"orders.*", "orders.>", "a..b", ".a", "a.", "with space", "a/b", "ü", strings.Repeat("x", 128)} {
		err := b.Publish(ctx, topic, message.New("/t", "t", nil))
		if err == nil || !strings.Contains(err.Error(), "invalid name") {
			t.Errorf("Publish to %q = %v, want ErrInvalidName", topic, err)
		}
		sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "ok", Group: topic}, func(context.Context, []*broker.Delivery) {})
		if err == nil {
			_ = sub.Stop(ctx)
			t.Errorf("Subscribe with group %q succeeded", topic)
		}
	}
}

// TestNames_StreamNamesAreOneToOne: topics that differ only in '.', '-' and
// '_' get different streams.
func TestNames_StreamNamesAreOneToOne(t *testing.T) {
	topics := []string{"a.b", "a_b", "a-b", "a._b", "a_.b", "a-_b", "a_-b", "a--b", "a__b", "a.-b", "a-.b", "a.b.c", "a_b_c", "ab"}
	seen := make(map[string]string)
	for _, topic := range topics {
		if err := checkName("topic", topic); err != nil {
			t.Fatalf("checkName(%q): %v", topic, err)
		}
		name := escapeName(topic)
		if strings.ContainsAny(name, ".*> /\\") {
			t.Errorf("stream name %q of %q has a forbidden character", name, topic)
		}
		if other, ok := seen[name]; ok {
			t.Errorf("topics %q and %q share stream %q", other, topic, name)
		}
		seen[name] = topic
	}
	if got := escapeName("shop.order-created"); got != "shop_order--created" {
		t.Errorf("stream of shop.order-created = %q, want shop_order--created", got)
	}
}
