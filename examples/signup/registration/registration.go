package registration

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"embed"
	"encoding/hex"
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

// State is where a registration stands.
type State string

// The states of a registration.
const (
	// StateWaitingForConfirmation: the confirmation email is on its way, or
	// the user's creation failed and the registration waits to be confirmed
	// again.
	StateWaitingForConfirmation State = "WAITING_FOR_CONFIRMATION"
	// StateConfirmed: the address is confirmed and Users is creating the
	// user.
	StateConfirmed State = "CONFIRMED"
	// StateCompleted: the user exists. Nothing changes a completed
	// registration.
	StateCompleted State = "COMPLETED"
)

// Registration is a sign-up as the API shows it. The confirmation token is
// never shown: only the email carries it.
type Registration struct {
	ID    string `json:"id"`
	Email string `json:"email"`
	Name  string `json:"name"`
	State State  `json:"state"`
	// LastFailure is why the user's creation last failed, if it ever did.
	LastFailure string    `json:"last_failure,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
}

// Errors of Confirm, which the API answers with 404 and 403.
var (
	// ErrNotFound: no registration has this id.
	ErrNotFound = errors.New("registration: not found")
	// ErrWrongToken: the token is not the one the email carried.
	ErrWrongToken = errors.New("registration: wrong confirmation token")
)

// Config configures a Service. The zero value gives the defaults.
type Config struct {
	// BaseURL is the API's public address, which the confirmation link in
	// the email starts with, such as "http://127.0.0.1:8081". Default
	// empty: the link is a path relative to the API.
	BaseURL string

	// Logger receives the flow's steps at Info and failures at Warn.
	// Default: discard.
	Logger *slog.Logger

	// Now stamps new registrations. Default time.Now.
	Now func() time.Time
}

// Service is the Registration domain: its API, its outbox relay and its
// consumer of Users' events, all on its own database.
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

// New returns the Registration domain on db, publishing to and consuming
// from b. Call Migrate before serving Handler or calling Run.
func New(db *sqldb.DB, b broker.Broker, cfg Config) (*Service, error) {
	if db == nil || b == nil {
		return nil, errors.New("registration: New needs a database and a broker")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.BaseURL = strings.TrimSuffix(cfg.BaseURL, "/")
	relay, err := outbox.NewRelay(db, b, outbox.RelayConfig{Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("registration: %w", err)
	}
	ib, err := inbox.New(db, inbox.Config{AfterCommit: relay.Notify, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("registration: %w", err)
	}
	return &Service{db: db, broker: b, relay: relay, inbox: ib, cfg: cfg, log: cfg.Logger}, nil
}

// Migrate creates or updates the tables of Registration, its outbox and its
// inbox. It is safe to call at every start.
func (s *Service) Migrate(ctx context.Context) error {
	if err := outbox.Migrate(ctx, s.db); err != nil {
		return err
	}
	if err := inbox.Migrate(ctx, s.db); err != nil {
		return err
	}
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+s.db.Dialect().String())
	if err != nil {
		return fmt.Errorf("registration: %w", err)
	}
	return s.db.Migrate(ctx, "signup-registration", migs)
}

// Run relays the outbox and consumes Users' events until ctx ends. It then
// stops its subscription, so the group's messages in flight go back to the
// broker at once, and returns nil; it returns an error only if it cannot
// start.
func (s *Service) Run(ctx context.Context) error {
	sub, err := s.broker.Subscribe(context.WithoutCancel(ctx),
		broker.SubscribeConfig{Topic: topicUsers, Group: Group},
		s.inbox.Handler(Group, s.handleUserEvent))
	if err != nil {
		return fmt.Errorf("registration: subscribe to %s: %w", topicUsers, err)
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
	stopCtx, stop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer stop()
	return errors.Join(relayErr, sub.Stop(stopCtx))
}

// FieldError is returned by Register for a missing or invalid field.
type FieldError struct {
	// Field is the field's name in the API: "email" or "name".
	Field string
	// Problem says what is wrong, starting with the field's name.
	Problem string
}

// Error returns the problem.
func (e *FieldError) Error() string { return e.Problem }

// Register creates a registration waiting for confirmation and, in the same
// transaction, adds its confirmation email to the outbox. The email is
// trimmed and lower-cased, the name trimmed; a missing or invalid one fails
// with a *FieldError.
func (s *Service) Register(ctx context.Context, email, name string) (*Registration, error) {
	email, name = strings.ToLower(strings.TrimSpace(email)), strings.TrimSpace(name)
	if err := validate(email, name); err != nil {
		return nil, err
	}
	token := rand.Text()
	r := &Registration{
		ID:        message.NewID(),
		Email:     email,
		Name:      name,
		State:     StateWaitingForConfirmation,
		CreatedAt: s.cfg.Now().UTC().Truncate(time.Microsecond),
	}
	mail, err := message.NewJSON(Source, TypeConfirmationEmail, ConfirmationEmail{
		RegistrationID: r.ID,
		To:             email,
		Name:           name,
		Token:          token,
		ConfirmURL:     s.cfg.BaseURL + "/registrations/" + r.ID + "/confirm",
	})
	if err != nil {
		return nil, err
	}
	mail.Subject, mail.CorrelationID = r.ID, r.ID
	err = s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		if _, err := tx.Exec(ctx,
			`INSERT INTO registrations (id, email, name, token_sha256, state, created_at) VALUES ($1, $2, $3, $4, $5, $6)`,
			r.ID, r.Email, r.Name, tokenHash(token), string(r.State), r.CreatedAt); err != nil {
			return err
		}
		return outbox.Add(ctx, tx, TopicEmails, mail)
	})
	if err != nil {
		return nil, fmt.Errorf("register %s: %w", email, err)
	}
	s.relay.Notify()
	s.log.Info("registration created", "registration", r.ID, "email", email)
	return r, nil
}

// Confirm confirms registration id with the token its email carried: the
// registration becomes CONFIRMED and, in the same transaction,
// signup.registration.confirmed goes to the outbox. Confirming a
// registration that is already CONFIRMED or COMPLETED changes nothing and
// succeeds. It fails with ErrNotFound or ErrWrongToken.
func (s *Service) Confirm(ctx context.Context, id, token string) (*Registration, error) {
	var (
		r       *Registration
		changed bool
	)
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		changed = false
		// One conditional UPDATE decides, so two concurrent confirmations
		// cannot both publish.
		var email, name string
		err := tx.QueryRow(ctx,
			`UPDATE registrations SET state = $1 WHERE id = $2 AND token_sha256 = $3 AND state = $4 RETURNING email, name`,
			string(StateConfirmed), id, tokenHash(token), string(StateWaitingForConfirmation)).Scan(&email, &name)
		switch {
		case errors.Is(err, sqldb.ErrNoRows):
			// Not confirmed now: say why.
			var hash string
			if r, hash, err = get(ctx, tx, id); err != nil {
				return err
			}
			if hash != tokenHash(token) {
				return ErrWrongToken
			}
			if r.State == StateWaitingForConfirmation {
				return fmt.Errorf("confirm registration %s: the update missed a waiting registration", id)
			}
			return nil // already confirmed: nothing to do
		case err != nil:
			return err
		}
		m, err := message.NewJSON(Source, TypeConfirmed, RegistrationConfirmed{RegistrationID: id, Email: email, Name: name})
		if err != nil {
			return err
		}
		m.Subject, m.CorrelationID = id, id
		if err := outbox.Add(ctx, tx, TopicRegistrations, m); err != nil {
			return err
		}
		changed = true
		r, _, err = get(ctx, tx, id)
		return err
	})
	if err != nil {
		return nil, err
	}
	if changed {
		s.relay.Notify()
		s.log.Info("registration confirmed", "registration", id)
	}
	return r, nil
}

// Get returns registration id, or ErrNotFound.
func (s *Service) Get(ctx context.Context, id string) (*Registration, error) {
	var r *Registration
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		r, _, err = get(ctx, tx, id)
		return err
	})
	return r, err
}

// get reads registration id and its token's hash.
func get(ctx context.Context, tx sqldb.Tx, id string) (*Registration, string, error) {
	r := &Registration{ID: id}
	var state, hash string
	err := tx.QueryRow(ctx,
		`SELECT email, name, state, last_failure, created_at, token_sha256 FROM registrations WHERE id = $1`, id).
		Scan(&r.Email, &r.Name, &state, &r.LastFailure, &r.CreatedAt, &hash)
	if errors.Is(err, sqldb.ErrNoRows) {
		return nil, "", ErrNotFound
	}
	if err != nil {
		return nil, "", fmt.Errorf("read registration %s: %w", id, err)
	}
	r.State = State(state)
	r.CreatedAt = r.CreatedAt.UTC()
	return r, hash, nil
}

// handleUserEvent applies one of Users' events, in the inbox's transaction:
// the inbox has recorded the message in tx, so a copy delivered later is
// acknowledged without calling this again. ctx carries the message
// (message.WithCause), which messages added to the outbox would inherit.
func (s *Service) handleUserEvent(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
	var ev userCreationFailed
	switch m.Type {
	case typeUserCreated, typeUserCreationFailed:
		if err := json.Unmarshal(m.Data, &ev); err != nil {
			return inbox.Permanent(fmt.Errorf("%s %s: data: %w", m.Type, m.ID, err))
		}
		if ev.UserID == "" {
			return inbox.Permanent(fmt.Errorf("%s %s: data: user_id is missing", m.Type, m.ID))
		}
	default:
		// A tolerant reader: Users may publish events Registration has no
		// use for.
		return nil
	}
	// The user's id is the registration's. Each event applies only to a
	// CONFIRMED registration, so an event about a registration in any other
	// state (or none) changes nothing.
	var (
		n   int64
		err error
	)
	if m.Type == typeUserCreated {
		n, err = tx.Exec(ctx, `UPDATE registrations SET state = $1 WHERE id = $2 AND state = $3`,
			string(StateCompleted), ev.UserID, string(StateConfirmed))
	} else {
		if ev.Reason == "" {
			ev.Reason = "unknown"
		}
		n, err = tx.Exec(ctx, `UPDATE registrations SET state = $1, last_failure = $2 WHERE id = $3 AND state = $4`,
			string(StateWaitingForConfirmation), ev.Reason, ev.UserID, string(StateConfirmed))
	}
	if err != nil {
		return err
	}
	if n == 0 {
		s.log.Warn("user event ignored: no confirmed registration", "type", m.Type, "registration", ev.UserID)
		return nil
	}
	if m.Type == typeUserCreated {
		s.log.Info("registration completed", "registration", ev.UserID)
	} else {
		s.log.Info("user creation failed, registration waits for confirmation again", "registration", ev.UserID, "reason", ev.Reason)
	}
	return nil
}

// tokenHash is what the registrations table keeps of a token.
func tokenHash(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}
