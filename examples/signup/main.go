// Command signup runs the sign-up example: a user signs up, confirms their
// email address, and the Users domain creates the user; when that fails, the
// rollback sequence returns the registration to waiting for confirmation.
//
// The Registration and Users domains run in one process, each on its own
// database (SQLite files, or databases on a PostgreSQL server), over an
// embedded NATS JetStream broker, with both APIs on one HTTP address. A
// small mailer prints each confirmation email with the command that
// confirms it. See README.md.
//
//	go run ./examples/signup
//	go run ./examples/signup --postgres postgres://user@127.0.0.1:5432/postgres
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/signup/registration"
	"github.com/troupedev/troupe/examples/signup/users"
	"github.com/troupedev/troupe/internal/servicedb"
)

const usage = `Usage: go run ./examples/signup [flags]

Runs the sign-up example: the Registration and Users domains in one process,
each on its own database, over an embedded NATS JetStream broker, with both
HTTP APIs on --addr. Confirmation emails are printed here, each with the
command that confirms it.

  curl -s localhost:8081/registrations -d '{"email":"ada@example.com","name":"Ada"}'
  (run the curl command the email shows)
  curl -s localhost:8081/registrations/ID
  curl -s localhost:8081/users/ID

Flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "signup:", err)
		os.Exit(1)
	}
}

// run runs the example until ctx ends, printing what happens to stdout and
// the domains' log to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("signup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	addr := fs.String("addr", "127.0.0.1:8081", "`address` the HTTP API listens on")
	dir := fs.String("dir", "", "`directory` for the SQLite files and the broker's data, kept at exit (default: a temporary directory, removed at exit)")
	pg := fs.String("postgres", "", "`URL` of a PostgreSQL server on which the role may create databases, such as postgres://user@127.0.0.1:5432/postgres;\neach domain gets its own database there, signup_registration and signup_users, created when missing and kept")
	refuse := fs.Int("fail-provisioning", 0, "refuse the first `N` user creations at their second step, to show the rollback sequence")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q (see --help)", fs.Args())
	}

	log := slog.New(slog.NewTextHandler(stderr, nil))
	if *dir == "" {
		d, err := os.MkdirTemp("", "troupe-signup-*")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	dbs, err := servicedb.Open(ctx, servicedb.Config{Dir: *dir, Postgres: *pg, Prefix: "signup_"}, "registration", "users")
	if err != nil {
		return err
	}
	defer dbs.Close()
	b, err := natsjs.New(ctx, natsjs.Config{DataDir: filepath.Join(*dir, "nats"), Logger: log.With("component", "nats")})
	if err != nil {
		return err
	}
	defer b.Close()

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	base := "http://" + ln.Addr().String()
	reg, err := registration.New(dbs.DBs["registration"], b, registration.Config{BaseURL: base, Logger: log.With("domain", "registration")})
	if err != nil {
		return err
	}
	usr, err := users.New(dbs.DBs["users"], b, users.Config{Provision: refuseFirst(*refuse), Logger: log.With("domain", "users")})
	if err != nil {
		return err
	}
	if err := reg.Migrate(ctx); err != nil {
		return err
	}
	if err := usr.Migrate(ctx); err != nil {
		return err
	}
	mail, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: registration.TopicEmails, Group: "signup-mailer"}, mailer(stdout))
	if err != nil {
		return err
	}
	defer mail.Stop(context.WithoutCancel(ctx))

	// The domains and the API run until ctx ends or one of them fails.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, 3)
	wg.Go(func() { errs[0] = reg.Run(ctx); cancel() })
	wg.Go(func() { errs[1] = usr.Run(ctx); cancel() })
	srv := &http.Server{Handler: routes(reg.Handler(), usr.Handler()), ReadHeaderTimeout: 10 * time.Second}
	wg.Go(func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			errs[2] = err
		}
		cancel()
	})
	fmt.Fprintf(stdout, "sign-up example on %s\n  databases: %s\n  broker: embedded NATS JetStream in %s\n  try: curl -s %s/registrations -d '{\"email\":\"ada@example.com\",\"name\":\"Ada\"}'\n",
		base, dbs.Description, filepath.Join(*dir, "nats"), base)
	<-ctx.Done()
	shutdownCtx, stop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer stop()
	shutdownErr := srv.Shutdown(shutdownCtx)
	wg.Wait()
	return errors.Join(append(errs, shutdownErr)...)
}

// routes serves both domains' APIs on one address, as a gateway would.
func routes(reg, usr http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/registrations", reg)
	mux.Handle("/registrations/", reg)
	mux.Handle("/users/", usr)
	return mux
}

// mailer stands for the service that sends emails: it prints each
// confirmation email with the command that confirms the registration.
func mailer(w io.Writer) broker.Handler {
	return func(ctx context.Context, batch []*broker.Delivery) {
		for _, d := range batch {
			if d.Msg.Type != registration.TypeConfirmationEmail {
				d.Ack()
				continue
			}
			var e registration.ConfirmationEmail
			if err := json.Unmarshal(d.Msg.Data, &e); err != nil {
				d.DeadLetter(fmt.Sprintf("data: %v", err))
				continue
			}
			body, _ := json.Marshal(map[string]string{"token": e.Token})
			fmt.Fprintf(w, "\n--- email to %s <%s>: confirm your sign-up with\n  curl -s %s -d '%s'\n\n", e.Name, e.To, e.ConfirmURL, body)
			d.Ack()
		}
	}
}

// refuseFirst returns a Provision hook that refuses the first n user
// creations, or nil for n <= 0.
func refuseFirst(n int) func(context.Context, users.User) error {
	if n <= 0 {
		return nil
	}
	var calls atomic.Int64
	return func(_ context.Context, u users.User) error {
		if calls.Add(1) <= int64(n) {
			return users.Refuse(fmt.Sprintf("the mail system refused to provision %s (--fail-provisioning)", u.Email))
		}
		return nil
	}
}
