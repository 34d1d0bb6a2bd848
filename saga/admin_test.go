package saga_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// A compensation that fails parks the saga with its reason; the operator
// lists it, retries it once the cause is mended, and it ends compensated.
func TestOrchestrator_AFailingCompensationParksTheSagaUntilAnOperatorRetries(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			o, db := newOrchestratorOn(t, kind)
			ctx := context.Background()
			if _, err := db.Exec(ctx, `CREATE TABLE holds (saga_id TEXT NOT NULL)`); err != nil {
				t.Fatal(err)
			}
			var undoBroken atomic.Bool
			undoBroken.Store(true)
			def := &saga.Definition[struct{}]{
				Name: "hold-then-fail",
				Steps: []saga.Step[struct{}]{
					{
						Name: "hold",
						Local: func(ctx context.Context, tx sqldb.Tx, id string, _ *struct{}) error {
							_, err := tx.Exec(ctx, `INSERT INTO holds (saga_id) VALUES ($1)`, id)
							return err
						},
						UndoLocal: func(ctx context.Context, tx sqldb.Tx, id string, _ *struct{}) error {
							if _, err := tx.Exec(ctx, `DELETE FROM holds WHERE saga_id = $1`, id); err != nil {
								return err
							}
							if undoBroken.Load() {
								return errors.New("release service unavailable")
							}
							return nil
						},
					},
					{Name: "refuse", Local: func(context.Context, sqldb.Tx, string, *struct{}) error {
						return saga.Refuse(errors.New("no"))
					}},
				},
			}
			if err := o.Register(def); err != nil {
				t.Fatal(err)
			}
			inTx := func(f func(ctx context.Context, tx sqldb.Tx) error) error { return db.InTx(ctx, f) }
			if err := inTx(func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, "s1", struct{}{}) }); err != nil {
				t.Fatal(err)
			}
			parked, err := o.List(ctx, saga.Parked, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(parked) != 1 || parked[0].ID != "s1" || parked[0].Reason == "" {
				t.Fatalf("parked sagas %+v: want s1 with its reason", parked)
			}
			var holds int
			db.QueryRow(ctx, `SELECT count(*) FROM holds`).Scan(&holds)
			if holds != 1 {
				t.Fatalf("%d holds: the failed compensation's writes must be rolled back, leaving the hold", holds)
			}
			if err := inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.AbortTx(ctx, tx, "nope", "x") }); err == nil {
				t.Fatal("AbortTx of an unknown saga succeeded")
			}
			undoBroken.Store(false)
			if err := inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.RetryTx(ctx, tx, "s1") }); err != nil {
				t.Fatal(err)
			}
			in, err := o.Get(ctx, "s1")
			if err != nil || in.Status != saga.Compensated {
				t.Fatalf("after the retry: %+v, %v; want compensated", in, err)
			}
			db.QueryRow(ctx, `SELECT count(*) FROM holds`).Scan(&holds)
			if holds != 0 {
				t.Fatalf("%d holds after the compensation, want 0", holds)
			}
			if err := inTx(func(ctx context.Context, tx sqldb.Tx) error { return o.RetryTx(ctx, tx, "s1") }); !errors.Is(err, saga.ErrNotParked) {
				t.Fatalf("RetryTx of a compensated saga: %v, want ErrNotParked", err)
			}
			hist, err := o.History(ctx, "s1")
			if err != nil {
				t.Fatal(err)
			}
			var events []string
			for _, h := range hist {
				events = append(events, h.Step+" "+h.Event)
			}
			want := []string{" started", "hold done", "refuse refused", "hold failed", " parked-retried", "hold done", " compensated"}
			if !slices.Equal(events, want) {
				t.Fatalf("history %q, want %q", events, want)
			}
		})
	}
}

func TestOrchestrator_AnOperatorCanAbortAParkedSaga(t *testing.T) {
	o, db := newOrchestrator(t)
	ctx := context.Background()
	def := &saga.Definition[struct{}]{
		Name: "stuck",
		Steps: []saga.Step[struct{}]{
			{Name: "a", Local: func(context.Context, sqldb.Tx, string, *struct{}) error { return nil },
				UndoLocal: func(context.Context, sqldb.Tx, string, *struct{}) error { return errors.New("cannot undo") }},
			{Name: "b", Local: func(context.Context, sqldb.Tx, string, *struct{}) error { return saga.Refuse(errors.New("no")) }},
		},
	}
	if err := o.Register(def); err != nil {
		t.Fatal(err)
	}
	if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, "s", struct{}{}) }); err != nil {
		t.Fatal(err)
	}
	if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return o.AbortTx(ctx, tx, "s", "undone by hand") }); err != nil {
		t.Fatal(err)
	}
	in, err := o.Get(ctx, "s")
	if err != nil || in.Status != saga.Aborted {
		t.Fatalf("%+v, %v: want aborted", in, err)
	}
	if left, _ := o.List(ctx, saga.Parked, 10); len(left) != 0 {
		t.Fatalf("still parked: %+v", left)
	}
}

// A deadline whose handling keeps failing (here the step's Input panics when
// the command is sent again) parks the saga with the error, instead of
// leaving it running with no timer once the timer gives up.
func TestOrchestrator_ADeadlineThatCannotBeHandledParksTheSaga(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			url := "sqlite://" + filepath.Join(t.TempDir(), "owner.db")
			if kind == "postgres" {
				url = pgtest.URL(t)
			}
			db, err := sqldb.Open(ctx, url, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
				if err := m(ctx, db); err != nil {
					t.Fatal(err)
				}
			}
			clock := clocktest.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
			sched, err := timer.New(db, timer.Config{Clock: clock, PollInterval: 10 * time.Millisecond, Backoff: func(int) time.Duration { return time.Second }})
			if err != nil {
				t.Fatal(err)
			}
			ib, _ := inbox.New(db, inbox.Config{})
			o, err := saga.New(db, sched, ib, saga.Config{Source: "/services/owner", ReplyTopic: "owner.replies"})
			if err != nil {
				t.Fatal(err)
			}
			var broken atomic.Bool
			def := &saga.Definition[struct{}]{Name: "ask", Steps: []saga.Step[struct{}]{{
				Name: "ask", Topic: "other.commands", Command: "other.ask", Deadline: time.Minute, MaxAttempts: 5,
				Input: func(*struct{}) any {
					if broken.Load() {
						panic("input broken")
					}
					return nil
				},
			}}}
			if err := o.Register(def); err != nil {
				t.Fatal(err)
			}
			if err := o.Register(def); !errors.Is(err, saga.ErrInvalidDefinition) {
				t.Fatalf("registering name and version twice: %v, want ErrInvalidDefinition", err)
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, "s", struct{}{}) }); err != nil {
				t.Fatal(err)
			}
			broken.Store(true)
			done := make(chan struct{})
			go func() { defer close(done); _ = sched.Run(ctx) }()
			defer func() { cancel(); <-done }()
			clock.Advance(time.Minute)
			deadline := time.Now().Add(20 * time.Second)
			for {
				in, err := o.Get(ctx, "s")
				if err != nil {
					t.Fatal(err)
				}
				if in.Status == saga.Parked {
					if !strings.Contains(in.Reason, "input broken") {
						t.Fatalf("reason %q: want the panic", in.Reason)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("saga %s, want parked", in.Status)
				}
				clock.Advance(time.Second) // the timer's retry backoff
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}
