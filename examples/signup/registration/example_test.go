package registration_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/signup/registration"
	"github.com/troupedev/troupe/sqldb"
)

// A sign-up and its confirmation, with a mailer reading the confirmation
// email from the broker. Without the Users domain running, the registration
// stays CONFIRMED.
func Example() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "registration-example-*")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	db, err := sqldb.Open(ctx, "sqlite://"+filepath.Join(dir, "registration.db"), nil)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(dir, "nats")})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	svc, err := registration.New(db, b, registration.Config{BaseURL: "https://signup.example"})
	if err != nil {
		log.Fatal(err)
	}
	if err := svc.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	api := httptest.NewServer(svc.Handler())
	defer api.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- svc.Run(runCtx) }() // relays the outbox to the broker
	defer func() { stop(); <-done }()

	// The mailer.
	emails := make(chan registration.ConfirmationEmail, 1)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: registration.TopicEmails, Group: "mailer"},
		func(ctx context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				var e registration.ConfirmationEmail
				if err := json.Unmarshal(d.Msg.Data, &e); err != nil {
					d.DeadLetter(err.Error())
					continue
				}
				emails <- e
				d.Ack()
			}
		})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Stop(ctx)

	post := func(url, body string) *registration.Registration {
		resp, err := http.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			log.Fatal(err)
		}
		defer resp.Body.Close()
		var r registration.Registration
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			log.Fatal(err)
		}
		fmt.Println(resp.Status, r.State)
		return &r
	}
	r := post(api.URL+"/registrations", `{"email":"ada@example.com","name":"Ada Lovelace"}`)
	e := <-emails
	fmt.Println("email to", e.To, "with link", strings.Replace(e.ConfirmURL, r.ID, "{id}", 1))
	post(api.URL+"/registrations/"+r.ID+"/confirm", `{"token":"`+e.Token+`"}`)
	// Output:
	// 201 Created WAITING_FOR_CONFIRMATION
	// email to ada@example.com with link https://signup.example/registrations/{id}/confirm
	// 200 OK CONFIRMED
}
