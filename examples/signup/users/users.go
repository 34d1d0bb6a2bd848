package users

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// State is where a user stands.
type State string

// The states of a user. A user whose creation fails is deleted, so it has
// no state for that.
const (
	// StateCreating: step 1 inserted the user; step 2 has yet to provision
	// its login.
	StateCreating State = "CREATING"
	// StateActive: the user is created.
	StateActive State = "ACTIVE"
)

// User is a user as the API shows it.
type User struct {
	// ID is the id of the registration the user was created from.
	ID        string    `json:"id"`
	Email     string    `json:"email"`
	Name      string    `json:"name"`
	State     State     `json:"state"`
	CreatedAt time.Time `json:"created_at"`
}

// ErrNotFound is returned by Get for an id no user has.
var ErrNotFound = errors.New("users: not found")

// RefusedError fails a user's creation for a business reason, which no
// retry can fix: the partly created user is removed and
// signup.user.creation-failed carries Reason to Registration. Make one with
// [Refuse].
type RefusedError struct {
	// Reason says why, for people.
	Reason string
}

// Refuse returns the error that fails a user's creation for reason; a
// Config.Provision hook returns it to refuse a user.
func Refuse(reason string) error { return &RefusedError{Reason: reason} }

// Error returns "users: creation refused: " and the reason.
func (e *RefusedError) Error() string { return "users: creation refused: " + e.Reason }

// Config configures a Service. The zero value gives the defaults.
type Config struct {
	// Provision, when set, is called by the second step of a user's
	// creation, in its transaction, before the user's login is written: it
	// stands for provisioning the account elsewhere (a mail system, a
	// directory). An error made with Refuse fails the creation, which is
	// rolled back; any other error is transient, and the broker delivers
	// the step again later. Default: nil, nothing to provision.
	Provision func(ctx context.Context, u User) error

	// Logger receives the flow's steps at Info and failures at Warn.
	// Default: discard.
	Logger *slog.Logger

	// Now stamps new users. Default time.Now.
	Now func() time.Time
}

// Service is the Users domain: its API, its outbox relay and its consumers
// of Registration's events and of its own second step, all on its own
// database.
type Service struct {
	db     *sqldb.DB
	broker broker.Broker
	relay  *outbox.Relay
	inbox  *inbox.Inbox
	cfg    Config
	log    *slog.Logger
}

//go:embed migrations
var migrationFS embed.FS

// New returns the Users domain on db, publishing to and consuming from b.
// Call Migrate before serving Handler or calling Run.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("users: New needs a database and a broker")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	relay, err := outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("users: %w", err)
	}
	ib, err := inbox.New(db, inbox.Config{AfterCommit: relay.Notify, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("users: %w", err)
	}
	return &Service{db: db, broker: b, relay: relay, inbox: ib, cfg: cfg, log: cfg.Logger}, nil
}

// Migrate creates or updates the tables of Users, its outbox and its inbox.
// It is safe to call at every start.
func (s *Service) Migrate(ctx context.Context) error {
	if err := outbox.Migrate(ctx, s.db); err != nil {
		return err
	}
	if err := inbox.Migrate(ctx, s.db); err != nil {
		return err
	}
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+s.db.Dialect().String())
	if err != nil {
		return fmt.Errorf("users: %w", err)
	}
	return s.db.Migrate(ctx, "signup-users", migs)
}

// Run relays the outbox and consumes Registration's events and the second
// steps until ctx ends. It then stops its subscriptions, so the groups'
// messages in flight go back to the broker at once, and returns nil; it
// returns an error only if it cannot start.
func (s *Service) Run(ctx context.Context) error {
	var subs []broker.Subscription
	stopSubs := func() error {
		stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		errs := make([]error, len(subs))
		var wg sync.WaitGroup
		for i, sub := range subs {
			wg.Go(func() { errs[i] = sub.Stop(stopCtx) })
		}
		wg.Wait()
		return errors.Join(errs...)
	}
	for _, c := range []struct {
		topic, group string
		h            inbox.HandlerFunc
	}{
		{topicRegistrations, Group, s.createUser},
		{topicProvisioning, groupProvisioning, s.provisionUser},
	} {
		sub, err := s.broker.Subscribe(context.WithoutCancel(ctx),
			broker.SubscribeConfig{Topic: c.topic, Group: c.group}, s.inbox.Handler(c.group, c.h))
		if err != nil {
			return errors.Join(fmt.Errorf("users: subscribe to %s: %w", c.topic, err), stopSubs())
		}
		subs = append(subs, sub)
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var relayErr error
	wg.Go(func() {
		// The relay fails only at its start; a start cut short by ctx is
		// not a failure.
		if err := s.relay.Run(ctx); err != nil && ctx.Err() == nil {
			relayErr = err
			cancel()
		}
	})
	wg.Go(func() { _ = s.inbox.Run(ctx) })
	<-ctx.Done()
	cancel()
	wg.Wait()
	return errors.Join(relayErr, stopSubs())
}

// Get returns user id, or ErrNotFound.
func (s *Service) Get(ctx context.Context, id string) (*User, error) {
	var u *User
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		u, err = get(ctx, tx, id, false)
		return err
	})
	return u, err
}

// get reads user id, locking its row on PostgreSQL when forUpdate is set.
func get(ctx context.Context, tx sqldb.Tx, id string, forUpdate bool) (*User, error) {
	q := `SELECT email, name, state, created_at FROM users WHERE id = $1`
	if forUpdate && tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	u := &User{ID: id}
	var state string
	err := tx.QueryRow(ctx, q, id).Scan(&u.Email, &u.Name, &state, &u.CreatedAt)
	if errors.Is(err, sqldb.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("read user %s: %w", id, err)
	}
	u.State = State(state)
	u.CreatedAt = u.CreatedAt.UTC()
	return u, nil
}

// createUser is step 1 of a user's creation, on signup.registration.confirmed:
// it inserts the user CREATING and sends itself step 2, in the inbox's
// transaction. ctx carries the event (the inbox sets message.WithCause), so
// the step-2 message, and through it the user's events, keep the
// registration's correlation id and name their cause.
func (s *Service) createUser(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	if m.Type != typeRegistrationConfirmed {
		return nil // a tolerant reader: Registration's other events are not for Users
	}
	var ev registrationConfirmed
	if err := json.Unmarshal(m.Data, &ev); err != nil {
		return inbox.Permanent(fmt.Errorf("%s %s: data: %w", m.Type, m.ID, err))
	}
	var missing []string
	for _, f := range [][2]string{{"registration_id", ev.RegistrationID}, {"email", ev.Email}, {"name", ev.Name}} {
		if f[1] == "" {
			missing = append(missing, f[0])
		}
	}
	if len(missing) > 0 {
		return inbox.Permanent(fmt.Errorf("%s %s: data: missing %s", m.Type, m.ID, strings.Join(missing, ", ")))
	}
	n, err := tx.Exec(ctx,
		`INSERT INTO users (id, email, name, state, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING`,
		ev.RegistrationID, strings.ToLower(ev.Email), ev.Name, string(StateCreating), s.cfg.Now().UTC().Truncate(time.Microsecond))
	if err != nil {
		return err
	}
	if n == 0 {
		// The user exists: this is a second confirmation of a registration
		// whose user is being, or was, created.
		s.log.Warn("registration confirmed again while its user exists: ignored", "user", ev.RegistrationID)
		return nil
	}
	step2, err := message.NewJSON(Source, typeProvision, provision{UserID: ev.RegistrationID})
	if err != nil {
		return err
	}
	step2.Subject = ev.RegistrationID
	s.log.Info("user creating", "user", ev.RegistrationID)
	return outbox.Add(ctx, tx, topicProvisioning, step2)
}

// provisionUser is step 2 of a user's creation: it provisions the user's
// login (an email address signs in one user only) and activates the user,
// announcing signup.user.created; or, when that is refused, it runs the
// rollback: it deletes the partly created user and announces
// signup.user.creation-failed, in the same transaction.
func (s *Service) provisionUser(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	if m.Type != typeProvision {
		return inbox.Permanent(fmt.Errorf("unexpected type %q on %s", m.Type, topicProvisioning))
	}
	var p provision
	if err := json.Unmarshal(m.Data, &p); err != nil || p.UserID == "" {
		return inbox.Permanent(fmt.Errorf("%s %s: data holds no user_id (%v)", m.Type, m.ID, err))
	}
	u, err := get(ctx, tx, p.UserID, true)
	if errors.Is(err, ErrNotFound) || (err == nil && u.State != StateCreating) {
		return nil // already created, or already rolled back
	}
	if err != nil {
		return err
	}
	err = s.provisionLogin(ctx, tx, u)
	var refused *RefusedError
	switch {
	case errors.As(err, &refused):
		return s.rollBack(ctx, tx, u, refused.Reason)
	case err != nil:
		return fmt.Errorf("provision user %s: %w", u.ID, err) // transient: retried
	}
	if _, err := tx.Exec(ctx, `UPDATE users SET state = $1 WHERE id = $2`, string(StateActive), u.ID); err != nil {
		return err
	}
	ev, err := message.NewJSON(Source, TypeCreated, Created{UserID: u.ID, Email: u.Email})
	if err != nil {
		return err
	}
	ev.Subject = u.ID
	s.log.Info("user created", "user", u.ID)
	return outbox.Add(ctx, tx, TopicUsers, ev)
}

// provisionLogin calls the Provision hook and writes u's login.
func (s *Service) provisionLogin(ctx context.Context, tx sqldb.Tx, u *User) error {
	if s.cfg.Provision != nil {
		if err := s.cfg.Provision(ctx, *u); err != nil {
			return err
		}
	}
	n, err := tx.Exec(ctx, `INSERT INTO logins (email, user_id) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING`, u.Email, u.ID)
	if err != nil {
		return err
	}
	if n == 0 {
		return Refuse(fmt.Sprintf("the email address %s is already used by another user", u.Email))
	}
	return nil
}

// rollBack removes the partly created user u and announces why, in tx.
func (s *Service) rollBack(ctx context.Context, tx sqldb.Tx, u *User, reason string) error {
	if _, err := tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, u.ID); err != nil {
		return err
	}
	ev, err := message.NewJSON(Source, TypeCreationFailed, CreationFailed{UserID: u.ID, Reason: reason})
	if err != nil {
		return err
	}
	ev.Subject = u.ID
	s.log.Info("user creation failed, user removed", "user", u.ID, "reason", reason)
	return outbox.Add(ctx, tx, TopicUsers, ev)
}
