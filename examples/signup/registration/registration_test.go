package registration_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/signup/registration"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// api is the Registration API over real HTTP, on a database of kind. Its
// relay does not run: the tests read the outbox's rows instead.
type api struct {
	t   *testing.T
	db  *sqldb.DB
	url string
}

func newAPI(t *testing.T, kind string) *api {
	t.Helper()
	ctx := context.Background()
	url := "sqlite://" + filepath.Join(t.TempDir(), "registration.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	svc, err := registration.New(db, b, registration.Config{BaseURL: "https://signup.example"})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(svc.Handler())
	t.Cleanup(srv.Close)
	return &api{t: t, db: db, url: srv.URL}
}

// do sends body to path and returns the status and the decoded JSON answer.
func (a *api) do(method, path, body string) (int, map[string]any) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.url+path, strings.NewReader(body))
	if err != nil {
		a.t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatal(err)
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		a.t.Fatalf("%s %s: %d, answer not a JSON object: %q", method, path, resp.StatusCode, raw)
	}
	return resp.StatusCode, out
}

// register creates a registration and returns its id and the token of its
// confirmation email, read from the outbox.
func (a *api) register(email string) (id, token string) {
	a.t.Helper()
	status, out := a.do("POST", "/registrations", `{"email":"`+email+`","name":"Ada"}`)
	if status != http.StatusCreated {
		a.t.Fatalf("register: %d %v", status, out)
	}
	id = out["id"].(string)
	emails := a.outbox(registration.TopicEmails)
	if len(emails) != 1 {
		a.t.Fatalf("outbox holds %d emails, want 1", len(emails))
	}
	var e registration.ConfirmationEmail
	if err := json.Unmarshal(emails[0].Data, &e); err != nil {
		a.t.Fatal(err)
	}
	if e.RegistrationID != id || e.To != email || e.ConfirmURL != "https://signup.example/registrations/"+id+"/confirm" {
		a.t.Fatalf("email = %+v, want one to %s for registration %s", e, email, id)
	}
	return id, e.Token
}

// outbox returns the messages waiting in the outbox for topic.
func (a *api) outbox(topic string) []*message.Message {
	a.t.Helper()
	rows, err := a.db.Query(context.Background(), `SELECT envelope FROM `+outbox.Table+` WHERE topic = $1 ORDER BY seq`, topic)
	if err != nil {
		a.t.Fatal(err)
	}
	defer rows.Close()
	var msgs []*message.Message
	for rows.Next() {
		var env []byte
		if err := rows.Scan(&env); err != nil {
			a.t.Fatal(err)
		}
		m, err := outbox.DecodeEnvelope(env)
		if err != nil {
			a.t.Fatal(err)
		}
		msgs = append(msgs, m)
	}
	if err := rows.Err(); err != nil {
		a.t.Fatal(err)
	}
	return msgs
}

func TestAPI_InvalidRegistrationIsRefusedNamingTheField(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			a := newAPI(t, kind)
			for _, c := range []struct {
				name, body, wantField, wantIn string
			}{
				{"malformed JSON", `{"email": "ada@example.com",`, "", "malformed JSON"},
				{"not an object", `["ada@example.com"]`, "", "JSON object"},
				{"empty body", ``, "", "empty"},
				{"two objects", `{"email":"ada@example.com","name":"Ada"} {}`, "", "nothing after it"},
				{"missing email", `{"name":"Ada"}`, "email", "email is required"},
				{"blank email", `{"email":"  ","name":"Ada"}`, "email", "email is required"},
				{"invalid email", `{"email":"ada at example.com","name":"Ada"}`, "email", "email must be"},
				{"email with a display name", `{"email":"Ada <ada@example.com>","name":"Ada"}`, "email", "email must be"},
				{"email not a string", `{"email":42,"name":"Ada"}`, "email", "email must be a string"},
				{"missing name", `{"email":"ada@example.com"}`, "name", "name is required"},
				{"name too long", `{"email":"ada@example.com","name":"` + strings.Repeat("a", 101) + `"}`, "name", "at most 100"},
				{"unknown field", `{"email":"ada@example.com","name":"Ada","admin":true}`, "admin", "unknown field"},
			} {
				status, out := a.do("POST", "/registrations", c.body)
				if status != http.StatusBadRequest {
					t.Errorf("%s: status %d, want 400", c.name, status)
					continue
				}
				if field, _ := out["field"].(string); field != c.wantField {
					t.Errorf("%s: field %q, want %q (%v)", c.name, field, c.wantField, out)
				}
				if msg, _ := out["error"].(string); !strings.Contains(msg, c.wantIn) {
					t.Errorf("%s: error %q, want it to contain %q", c.name, msg, c.wantIn)
				}
			}
			if n := len(a.outbox(registration.TopicEmails)); n != 0 {
				t.Errorf("refused registrations asked for %d emails", n)
			}
		})
	}
}

func TestAPI_RegistrationWaitsForConfirmationAndAsksForTheEmail(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			a := newAPI(t, kind)
			status, out := a.do("POST", "/registrations", `{"email":" Ada@Example.COM ","name":" Ada Lovelace "}`)
			if status != http.StatusCreated || out["state"] != string(registration.StateWaitingForConfirmation) ||
				out["email"] != "ada@example.com" || out["name"] != "Ada Lovelace" {
				t.Fatalf("register: %d %v", status, out)
			}
			if _, ok := out["token"]; ok {
				t.Errorf("the answer shows the token: %v", out)
			}
			id := out["id"].(string)
			emails := a.outbox(registration.TopicEmails)
			if len(emails) != 1 {
				t.Fatalf("%d emails, want 1", len(emails))
			}
			m := emails[0]
			if m.Type != registration.TypeConfirmationEmail || m.Source != registration.Source || m.Subject != id || m.CorrelationID != id {
				t.Errorf("email message = %+v, want type %s, subject and correlation id %s", m, registration.TypeConfirmationEmail, id)
			}
			if status, got := a.do("GET", "/registrations/"+id, ""); status != http.StatusOK || got["state"] != out["state"] || got["created_at"] != out["created_at"] {
				t.Errorf("GET: %d %v, want %v", status, got, out)
			}
		})
	}
}

func TestAPI_OnlyTheEmailedTokenConfirms(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			a := newAPI(t, kind)
			id, token := a.register("ada@example.com")

			if status, out := a.do("POST", "/registrations/"+id+"/confirm", `{"token":"not-the-token"}`); status != http.StatusForbidden {
				t.Errorf("wrong token: %d %v, want 403", status, out)
			}
			if status, out := a.do("POST", "/registrations/"+id+"/confirm", `{}`); status != http.StatusBadRequest || out["field"] != "token" {
				t.Errorf("no token: %d %v, want 400 naming token", status, out)
			}
			if status, out := a.do("POST", "/registrations/"+message.NewID()+"/confirm", `{"token":"`+token+`"}`); status != http.StatusNotFound {
				t.Errorf("unknown id: %d %v, want 404", status, out)
			}
			if _, out := a.do("GET", "/registrations/"+id, ""); out["state"] != string(registration.StateWaitingForConfirmation) {
				t.Errorf("after refused confirmations: %v", out)
			}
			if n := len(a.outbox(registration.TopicRegistrations)); n != 0 {
				t.Fatalf("refused confirmations published %d events", n)
			}

			for i := range 2 {
				status, out := a.do("POST", "/registrations/"+id+"/confirm", `{"token":"`+token+`"}`)
				if status != http.StatusOK || out["state"] != string(registration.StateConfirmed) {
					t.Fatalf("confirmation %d: %d %v, want 200 CONFIRMED", i+1, status, out)
				}
			}
			// Confirmed once, however often the link is used.
			confirmed := a.outbox(registration.TopicRegistrations)
			if len(confirmed) != 1 {
				t.Fatalf("%d confirmed events, want 1", len(confirmed))
			}
			var ev registration.RegistrationConfirmed
			if err := json.Unmarshal(confirmed[0].Data, &ev); err != nil {
				t.Fatal(err)
			}
			if m := confirmed[0]; m.Type != registration.TypeConfirmed || m.Subject != id || m.CorrelationID != id ||
				ev != (registration.RegistrationConfirmed{RegistrationID: id, Email: "ada@example.com", Name: "Ada"}) {
				t.Errorf("confirmed event = %+v with data %+v", m, ev)
			}
			if status, out := a.do("POST", "/registrations/"+id+"/confirm", `{"token":"not-the-token"}`); status != http.StatusForbidden {
				t.Errorf("wrong token on a confirmed registration: %d %v, want 403", status, out)
			}
		})
	}
}
