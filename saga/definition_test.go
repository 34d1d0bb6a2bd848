package saga_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// newOrchestrator returns an orchestrator on a fresh SQLite database.
func newOrchestrator(t *testing.T) (*saga.Orchestrator, *sqldb.DB) {
	return newOrchestratorOn(t, "sqlite")
}

// newOrchestratorOn returns an orchestrator on a fresh database of kind.
func newOrchestratorOn(t *testing.T, kind string) (*saga.Orchestrator, *sqldb.DB) {
	t.Helper()
	ctx := context.Background()
	url := "sqlite://" + filepath.Join(t.TempDir(), "owner.db")
	if kind == "postgres" {
		url = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	for _, m := range []func(context.Context, *sqldb.DB) error{saga.Migrate, outbox.Migrate, inbox.Migrate, timer.Migrate} {
		if err := m(ctx, db); err != nil {
			t.Fatal(err)
		}
	}
	sched, err := timer.New(db, timer.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := inbox.New(db, inbox.Config{})
	if err != nil {
		t.Fatal(err)
	}
	o, err := saga.New(db, sched, ib, saga.Config{Source: "/services/owner", ReplyTopic: "owner.replies"})
	if err != nil {
		t.Fatal(err)
	}
	return o, db
}

func TestRegister_RefusesADefinitionThatCannotRun(t *testing.T) {
	o, _ := newOrchestrator(t)
	noop := func(context.Context, sqldb.Tx, string, *struct{}) error { return nil }
	cases := map[string]struct {
		def  *saga.Definition[struct{}]
		want string
	}{
		"no name":          {&saga.Definition[struct{}]{Steps: []saga.Step[struct{}]{{Name: "a", Local: noop}}}, "empty Name"},
		"no steps":         {&saga.Definition[struct{}]{Name: "s"}, "no steps"},
		"unnamed step":     {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Local: noop}}}, "has no Name"},
		"twice":            {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a", Local: noop}, {Name: "a", Local: noop}}}, "twice"},
		"both kinds":       {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a", Local: noop, Topic: "t", Command: "c"}}}, "both local and a command"},
		"neither kind":     {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a"}}}, "neither"},
		"topic no command": {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a", Topic: "t"}}}, "both Topic and Command"},
		"negative compensation timeout": {&saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a", Topic: "t", Command: "c", CompensationTimeout: -time.Second}}},
			"negative Deadline, MaxAttempts or CompensationTimeout"},
	}
	for name, c := range cases {
		err := o.Register(c.def)
		if !errors.Is(err, saga.ErrInvalidDefinition) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want ErrInvalidDefinition saying %q", name, err, c.want)
		}
	}
}

func TestStartTx_RefusesAnUnknownSagaAndAReusedID(t *testing.T) {
	o, db := newOrchestrator(t)
	ctx := context.Background()
	def := &saga.Definition[struct{}]{Name: "s", Steps: []saga.Step[struct{}]{{Name: "a", Local: func(context.Context, sqldb.Tx, string, *struct{}) error { return nil }}}}
	start := func(id string) error {
		return db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return def.StartTx(ctx, tx, o, id, struct{}{}) })
	}
	if err := start("x"); !errors.Is(err, saga.ErrUnknownSaga) {
		t.Fatalf("start before Register: %v, want ErrUnknownSaga", err)
	}
	if err := o.Register(def); err != nil {
		t.Fatal(err)
	}
	if err := start("x"); err != nil {
		t.Fatal(err)
	}
	if err := start("x"); !errors.Is(err, saga.ErrExists) {
		t.Fatalf("second start of x: %v, want ErrExists", err)
	}
	if in, err := o.Get(ctx, "x"); err != nil || in.Status != saga.Completed {
		t.Fatalf("x: %+v, %v: a saga of local steps completes in StartTx's transaction", in, err)
	}
}
