package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/signup/registration"
	"github.com/troupedev/troupe/examples/signup/users"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// signup is the example as main wires it: Registration and Users, each on
// its own database of one kind, over an embedded NATS JetStream, their APIs
// behind one real HTTP server, and a mailer that keeps the confirmation
// emails for the test to read.
type signup struct {
	t         *testing.T
	ctx       context.Context
	nats      *natsjs.Broker
	broker    broker.Broker // what the domains use: nats, or a wrapper of it
	regDB     *sqldb.DB
	usersDB   *sqldb.DB
	usersCfg  users.Config
	url       string
	stopUsers func()
	running   sync.WaitGroup

	mu     sync.Mutex
	emails map[string]registration.ConfirmationEmail // by registration id
}

type option func(*signup)

// deliverTwice makes the broker deliver every message to the domains twice.
func deliverTwice(d *twice) option {
	return func(s *signup) { d.Broker = s.nats; s.broker = d }
}

// provision sets the Users domain's Provision hook.
func provision(f func(context.Context, users.User) error) option {
	return func(s *signup) { s.usersCfg.Provision = f }
}

func newSignup(t *testing.T, kind string, opts ...option) *signup {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	s := &signup{t: t, ctx: ctx, nats: b, broker: b, emails: map[string]registration.ConfirmationEmail{}}
	for _, o := range opts {
		o(s)
	}
	s.regDB, s.usersDB = openDB(t, kind, "registration"), openDB(t, kind, "users")

	reg, err := registration.New(s.regDB, s.broker, registration.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	// The API's Users service is also the first one to run; a test that
	// restarts Users runs another on the same database.
	usr := s.newUsers()
	srv := httptest.NewServer(routes(reg.Handler(), usr.Handler()))
	t.Cleanup(srv.Close)
	s.url = srv.URL

	// The mailer reads the emails from the real broker: duplicates are
	// the domains' business.
	mail, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: registration.TopicEmails, Group: "test-mailer"},
		func(ctx context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				var e registration.ConfirmationEmail
				if err := json.Unmarshal(d.Msg.Data, &e); err != nil {
					t.Errorf("email %s: %v", d.Msg.ID, err)
				}
				s.mu.Lock()
				s.emails[e.RegistrationID] = e
				s.mu.Unlock()
				d.Ack()
			}
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Cancel the test's context first: the domains stop at once
		// together, and the mailer's subscription is given up.
		cancel()
		s.running.Wait()
		mail.Stop(ctx)
	})

	s.run(reg.Run)
	s.stopUsers = s.run(usr.Run)
	return s
}

func openDB(t *testing.T, kind, name string) *sqldb.DB {
	t.Helper()
	url := "sqlite://" + filepath.Join(t.TempDir(), name+".db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(context.Background(), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// newUsers returns a migrated Users service on the Users database.
func (s *signup) newUsers() *users.Service {
	s.t.Helper()
	usr, err := users.New(s.usersDB, s.broker, s.usersCfg)
	if err != nil {
		s.t.Fatal(err)
	}
	if err := usr.Migrate(s.ctx); err != nil {
		s.t.Fatal(err)
	}
	return usr
}

// run runs f in the background, until the test ends or stop is called;
// stop waits for f to return.
func (s *signup) run(f func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(s.ctx)
	done := make(chan struct{})
	s.running.Go(func() {
		defer close(done)
		if err := f(ctx); err != nil {
			s.t.Errorf("run: %v", err)
		}
	})
	return func() { cancel(); <-done }
}

// do sends body to path and decodes the JSON answer into out.
func (s *signup) do(method, path, body string, out any) int {
	s.t.Helper()
	req, err := http.NewRequest(method, s.url+path, strings.NewReader(body))
	if err != nil {
		s.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			s.t.Fatalf("%s %s: %d, answer %q: %v", method, path, resp.StatusCode, raw, err)
		}
	}
	return resp.StatusCode
}

// register signs email up and returns the registration's id and the token
// of the confirmation email the mailer received.
func (s *signup) register(email string) (id, token string) {
	s.t.Helper()
	var r registration.Registration
	if status := s.do("POST", "/registrations", `{"email":"`+email+`","name":"Ada"}`, &r); status != http.StatusCreated {
		s.t.Fatalf("register %s: %d %+v", email, status, r)
	}
	var e registration.ConfirmationEmail
	s.waitFor("the confirmation email of "+r.ID, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		var ok bool
		e, ok = s.emails[r.ID]
		return ok
	})
	return r.ID, e.Token
}

func (s *signup) confirm(id, token string) *registration.Registration {
	s.t.Helper()
	var r registration.Registration
	if status := s.do("POST", "/registrations/"+id+"/confirm", `{"token":"`+token+`"}`, &r); status != http.StatusOK {
		s.t.Fatalf("confirm %s: %d %+v", id, status, r)
	}
	return &r
}

func (s *signup) registration(id string) *registration.Registration {
	s.t.Helper()
	var r registration.Registration
	if status := s.do("GET", "/registrations/"+id, "", &r); status != http.StatusOK {
		s.t.Fatalf("GET registration %s: %d", id, status)
	}
	return &r
}

// user returns user id, or nil when the API answers 404.
func (s *signup) user(id string) *users.User {
	s.t.Helper()
	var u users.User
	switch status := s.do("GET", "/users/"+id, "", &u); status {
	case http.StatusOK:
		return &u
	case http.StatusNotFound:
		return nil
	default:
		s.t.Fatalf("GET user %s: %d", id, status)
		return nil
	}
}

// waitForState waits until registration id is in state want, and returns it.
func (s *signup) waitForState(id string, want registration.State) *registration.Registration {
	s.t.Helper()
	var r *registration.Registration
	s.waitFor("registration "+id+" "+string(want), func() bool {
		r = s.registration(id)
		return r.State == want
	})
	return r
}

func (s *signup) waitFor(what string, cond func() bool) {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			s.t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// count returns the number of rows query finds in db.
func (s *signup) count(db *sqldb.DB, query string, args ...any) int {
	s.t.Helper()
	var n int
	if err := db.QueryRow(s.ctx, query, args...).Scan(&n); err != nil {
		s.t.Fatal(err)
	}
	return n
}

// sent returns the messages db's outbox holds for topic, in order.
func (s *signup) sent(db *sqldb.DB, topic string) []*message.Message {
	s.t.Helper()
	rows, err := db.Query(s.ctx, `SELECT envelope FROM `+outbox.Table+` WHERE topic = $1 ORDER BY seq`, topic)
	if err != nil {
		s.t.Fatal(err)
	}
	defer rows.Close()
	var msgs []*message.Message
	for rows.Next() {
		var env []byte
		if err := rows.Scan(&env); err != nil {
			s.t.Fatal(err)
		}
		m, err := outbox.DecodeEnvelope(env)
		if err != nil {
			s.t.Fatal(err)
		}
		msgs = append(msgs, m)
	}
	if err := rows.Err(); err != nil {
		s.t.Fatal(err)
	}
	return msgs
}

func TestSignup_ConfirmedRegistrationBecomesAnActiveUserWithTheSameID(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newSignup(t, kind)
			id, token := s.register("ada@example.com")
			if r := s.confirm(id, token); r.State != registration.StateConfirmed {
				t.Fatalf("confirmed registration is %s", r.State)
			}
			s.waitForState(id, registration.StateCompleted)
			u := s.user(id)
			if u == nil || u.State != users.StateActive || u.Email != "ada@example.com" || u.Name != "Ada" {
				t.Fatalf("user %s = %+v, want ACTIVE ada@example.com", id, u)
			}

			// One flow: every message carries the registration's id as its
			// correlation id and names the message that caused it.
			confirmed := s.sent(s.regDB, "signup.registrations")
			step2 := s.sent(s.usersDB, "signup.users.provisioning")
			created := s.sent(s.usersDB, users.TopicUsers)
			if len(confirmed) != 1 || len(step2) != 1 || len(created) != 1 {
				t.Fatalf("sent %d confirmed, %d step-2 and %d user events, want one of each", len(confirmed), len(step2), len(created))
			}
			for _, c := range []struct {
				m                *message.Message
				typ, causationID string
			}{
				{confirmed[0], registration.TypeConfirmed, ""},
				{step2[0], "signup.user.provision-requested", confirmed[0].ID},
				{created[0], users.TypeCreated, step2[0].ID},
			} {
				if c.m.Type != c.typ || c.m.Subject != id || c.m.CorrelationID != id || c.m.CausationID != c.causationID {
					t.Errorf("message %s: subject %s, correlation %s, causation %s; want subject and correlation %s, causation %q",
						c.m.Type, c.m.Subject, c.m.CorrelationID, c.m.CausationID, id, c.causationID)
				}
			}
		})
	}
}

func TestSignup_RefusedUserIsRemovedAndTheRegistrationCanBeConfirmedAgain(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			var refusing atomic.Bool
			refusing.Store(true)
			var sawPartlyCreated atomic.Bool
			s := newSignup(t, kind, provision(func(ctx context.Context, u users.User) error {
				sawPartlyCreated.Store(u.State == users.StateCreating)
				if refusing.Load() {
					return users.Refuse("the mail system is full")
				}
				return nil
			}))
			id, token := s.register("ada@example.com")
			s.confirm(id, token)
			r := s.waitForState(id, registration.StateWaitingForConfirmation)
			if r.LastFailure != "the mail system is full" {
				t.Errorf("last failure %q, want the refusal's reason", r.LastFailure)
			}
			if !sawPartlyCreated.Load() {
				t.Error("step 2 did not find the user CREATING")
			}
			// The rollback left nothing of the user.
			if u := s.user(id); u != nil {
				t.Errorf("user after the rollback: %+v", u)
			}
			if n := s.count(s.usersDB, `SELECT count(*) FROM users`) + s.count(s.usersDB, `SELECT count(*) FROM logins`); n != 0 {
				t.Errorf("%d user and login rows left after the rollback", n)
			}

			refusing.Store(false) // the cause is fixed
			if r := s.confirm(id, token); r.State != registration.StateConfirmed {
				t.Fatalf("confirming again: %s", r.State)
			}
			s.waitForState(id, registration.StateCompleted)
			if u := s.user(id); u == nil || u.State != users.StateActive {
				t.Errorf("user after confirming again: %+v, want ACTIVE", u)
			}
		})
	}
}

func TestSignup_SecondUserWithTheSameEmailIsRefused(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newSignup(t, kind)
			first, token := s.register("ada@example.com")
			s.confirm(first, token)
			s.waitForState(first, registration.StateCompleted)

			second, token := s.register("ada@example.com")
			s.confirm(second, token)
			r := s.waitForState(second, registration.StateWaitingForConfirmation)
			if !strings.Contains(r.LastFailure, "already used by another user") {
				t.Errorf("last failure %q, want the address taken", r.LastFailure)
			}
			if u := s.user(second); u != nil {
				t.Errorf("second user: %+v", u)
			}
			if u := s.user(first); u == nil || u.State != users.StateActive {
				t.Errorf("first user after the second was refused: %+v", u)
			}
		})
	}
}

// twice delivers every batch to the handler twice: the batch, then copies
// of its messages (same id, same source) in a second call, as a broker does
// when its consumer's acknowledgement is lost. It counts the copies
// acknowledged.
type twice struct {
	broker.Broker
	ackedCopies atomic.Int64
}

func (b *twice) Subscribe(ctx context.Context, cfg broker.SubscribeConfig, h broker.Handler) (broker.Subscription, error) {
	return b.Broker.Subscribe(ctx, cfg, func(ctx context.Context, batch []*broker.Delivery) {
		h(ctx, batch)
		copies := make([]*broker.Delivery, len(batch))
		for i, d := range batch {
			copies[i] = &broker.Delivery{Msg: d.Msg.Clone(), Topic: d.Topic, Attempt: d.Attempt + 1}
		}
		h(ctx, copies)
		for _, c := range copies {
			if st, _, _ := c.Settlement(); st == broker.Acked {
				b.ackedCopies.Add(1)
			}
		}
	})
}

func TestSignup_EveryMessageDeliveredTwiceHasOneEffect(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			d := &twice{}
			s := newSignup(t, kind, deliverTwice(d))
			id, token := s.register("ada@example.com")
			s.confirm(id, token)
			s.waitForState(id, registration.StateCompleted)

			// confirmed, step 2 and created, each delivered twice. The copy
			// of the last is handled after its original committed, which
			// is what the wait above saw: wait for the copies too.
			for deadline := time.Now().Add(20 * time.Second); d.ackedCopies.Load() < 3; {
				if time.Now().After(deadline) {
					t.Fatalf("%d copies acknowledged, want at least 3", d.ackedCopies.Load())
				}
				time.Sleep(5 * time.Millisecond)
			}
			if n := s.count(s.usersDB, `SELECT count(*) FROM users WHERE id = $1`, id); n != 1 {
				t.Errorf("%d users, want 1", n)
			}
			if n := s.count(s.usersDB, `SELECT count(*) FROM logins WHERE user_id = $1`, id); n != 1 {
				t.Errorf("%d logins, want 1", n)
			}
			if n := len(s.sent(s.usersDB, "signup.users.provisioning")); n != 1 {
				t.Errorf("step 2 asked for %d times, want 1", n)
			}
			if n := len(s.sent(s.usersDB, users.TopicUsers)); n != 1 {
				t.Errorf("%d user events, want 1", n)
			}
			if u := s.user(id); u == nil || u.State != users.StateActive {
				t.Errorf("user %+v, want ACTIVE", u)
			}
		})
	}
}

func TestSignup_ConfirmationWhileUsersIsStoppedCreatesTheUserWhenItStarts(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newSignup(t, kind)
			id, token := s.register("ada@example.com")
			s.stopUsers()
			s.confirm(id, token)
			s.waitFor("the confirmation on the broker", func() bool {
				return s.count(s.regDB, `SELECT count(*) FROM `+outbox.Table+` WHERE topic = 'signup.registrations' AND delivered_at IS NOT NULL`) == 1
			})
			if u := s.user(id); u != nil {
				t.Fatalf("user created while Users was stopped: %+v", u)
			}

			s.stopUsers = s.run(s.newUsers().Run)
			s.waitForState(id, registration.StateCompleted)
			if u := s.user(id); u == nil || u.State != users.StateActive {
				t.Errorf("user %+v, want ACTIVE", u)
			}
		})
	}
}

func TestSignup_TransientProvisioningFailureIsRetried(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			var calls atomic.Int32
			s := newSignup(t, kind, provision(func(ctx context.Context, u users.User) error {
				if calls.Add(1) == 1 {
					return errors.New("the mail system is unavailable")
				}
				return nil
			}))
			id, token := s.register("ada@example.com")
			s.confirm(id, token)
			r := s.waitForState(id, registration.StateCompleted)
			if r.LastFailure != "" {
				t.Errorf("a transient failure reached the registration: %q", r.LastFailure)
			}
			if n := calls.Load(); n != 2 {
				t.Errorf("Provision called %d times, want 2", n)
			}
		})
	}
}

func TestSignup_MalformedConfirmationIsDeadLettered(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newSignup(t, kind)
			dead := make(chan *message.Message, 1)
			sub, err := s.nats.Subscribe(s.ctx, broker.SubscribeConfig{Topic: "signup.registrations.dlq", Group: "test-dlq"},
				func(ctx context.Context, batch []*broker.Delivery) {
					for _, d := range batch {
						dead <- d.Msg
						d.Ack()
					}
				})
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Stop(context.Background())

			bad := message.New(registration.Source, registration.TypeConfirmed, []byte(`{"registration_id": 42}`))
			if err := s.nats.Publish(s.ctx, "signup.registrations", bad); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-dead:
				if m.ID != bad.ID || !strings.Contains(m.Extensions[broker.ExtDeadLetterReason], "data") {
					t.Errorf("dead letter %s with reason %q, want %s with the data's fault", m.ID, m.Extensions[broker.ExtDeadLetterReason], bad.ID)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the malformed confirmation was not dead-lettered")
			}
			if n := s.count(s.usersDB, `SELECT count(*) FROM users`); n != 0 {
				t.Errorf("%d users from a malformed confirmation", n)
			}
		})
	}
}

func TestSignup_RegistrationRequestsAreValidated(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			s := newSignup(t, kind)
			var out struct{ Error, Field string }
			if status := s.do("POST", "/registrations", `{"email":`, &out); status != http.StatusBadRequest || !strings.Contains(out.Error, "malformed JSON") {
				t.Errorf("malformed JSON: %d %+v", status, out)
			}
			if status := s.do("POST", "/registrations", `{"name":"Ada"}`, &out); status != http.StatusBadRequest || out.Field != "email" {
				t.Errorf("missing email: %d %+v, want 400 naming email", status, out)
			}
			id, _ := s.register("ada@example.com")
			if status := s.do("POST", "/registrations/"+id+"/confirm", `{"token":"guess"}`, &out); status != http.StatusForbidden {
				t.Errorf("wrong token: %d %+v, want 403", status, out)
			}
			if status := s.do("GET", "/users/"+id, "", &out); status != http.StatusNotFound {
				t.Errorf("user of an unconfirmed registration: %d, want 404", status)
			}
		})
	}
}
