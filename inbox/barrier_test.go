package inbox_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/sqldb"
)

const (
	action       = inbox.BarrierAction
	compensation = inbox.BarrierCompensation
)

// forEachBarrierDB is forEachDB with a step_effects table: each time a
// test step's action or compensation takes effect it adds one row, so a
// second effect shows as a second row.
func forEachBarrierDB(t *testing.T, f func(t *testing.T, db testDB)) {
	t.Helper()
	forEachDB(t, func(t *testing.T, db testDB) {
		if _, err := db.Exec(context.Background(),
			`CREATE TABLE step_effects (saga_id TEXT NOT NULL, step TEXT NOT NULL, side TEXT NOT NULL)`); err != nil {
			t.Fatal(err)
		}
		f(t, db)
	})
}

// recordEffect is a step's action or compensation: it writes one row.
func recordEffect(sagaID, step string, op inbox.BarrierOp) func(context.Context, sqldb.Tx) error {
	return func(ctx context.Context, tx sqldb.Tx) error {
		_, err := tx.Exec(ctx, `INSERT INTO step_effects (saga_id, step, side) VALUES ($1, $2, $3)`,
			sagaID, step, op.String())
		return err
	}
}

// stepEffects returns how many times saga's step had its action and its
// compensation take effect.
func stepEffects(t testing.TB, db *sqldb.DB, sagaID, step string) (actions, compensations int) {
	t.Helper()
	got := countBy(t, db, fmt.Sprintf(`SELECT side, COUNT(*) FROM step_effects
		WHERE saga_id = '%s' AND step = '%s' GROUP BY side`, sagaID, step))
	return got["action"], got["compensation"]
}

// callBarrier calls BarrierTx for op of saga's step, with recordEffect as
// fn, in a transaction of its own, and returns its outcome.
func callBarrier(db *sqldb.DB, ib *inbox.Inbox, sagaID, step string, op inbox.BarrierOp) (inbox.BarrierOutcome, error) {
	var outcome inbox.BarrierOutcome
	err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		outcome, err = ib.BarrierTx(ctx, tx, sagaID, step, op, recordEffect(sagaID, step, op))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("%s of %s/%s: %w", op, sagaID, step, err)
	}
	return outcome, nil
}

// runBarrier is callBarrier that fails t on error.
func runBarrier(t testing.TB, db *sqldb.DB, ib *inbox.Inbox, sagaID, step string, op inbox.BarrierOp) inbox.BarrierOutcome {
	t.Helper()
	outcome, err := callBarrier(db, ib, sagaID, step, op)
	if err != nil {
		t.Fatal(err)
	}
	return outcome
}

func TestBarrierTx_EachSideOfAStepTakesEffectOnceAndNeverAfterTheOther(t *testing.T) {
	type call struct {
		op   inbox.BarrierOp
		want inbox.BarrierOutcome
	}
	cases := []struct {
		name                           string
		calls                          []call
		wantActions, wantCompensations int
	}{{
		name:        "duplicate action has no second effect",
		calls:       []call{{action, inbox.BarrierApplied}, {action, inbox.BarrierDuplicate}, {action, inbox.BarrierDuplicate}},
		wantActions: 1,
	}, {
		name:        "action then compensation both take effect",
		calls:       []call{{action, inbox.BarrierApplied}, {compensation, inbox.BarrierApplied}},
		wantActions: 1, wantCompensations: 1,
	}, {
		name: "duplicate compensation has no second effect, nor does an action after it",
		calls: []call{{action, inbox.BarrierApplied}, {compensation, inbox.BarrierApplied},
			{compensation, inbox.BarrierDuplicate}, {action, inbox.BarrierDuplicate}},
		wantActions: 1, wantCompensations: 1,
	}, {
		name: "compensation before its action is a no-op and the late action is refused",
		calls: []call{{compensation, inbox.BarrierNullCompensation}, {compensation, inbox.BarrierDuplicate},
			{action, inbox.BarrierRefused}, {action, inbox.BarrierRefused}, {compensation, inbox.BarrierDuplicate}},
	}}
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		for i, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				sagaID := fmt.Sprintf("saga-%d", i)
				for i, call := range c.calls {
					if got := runBarrier(t, db.DB, ib, sagaID, "reserve-credit", call.op); got != call.want {
						t.Errorf("call %d (%s): %v, want %v", i+1, call.op, got, call.want)
					}
				}
				actions, compensations := stepEffects(t, db.DB, sagaID, "reserve-credit")
				if actions != c.wantActions || compensations != c.wantCompensations {
					t.Errorf("%d action effects and %d compensation effects, want %d and %d",
						actions, compensations, c.wantActions, c.wantCompensations)
				}
			})
		}
	})
}

func TestBarrierTx_StepIsKnownBySagaAndStepTogether(t *testing.T) {
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		if got := runBarrier(t, db.DB, ib, "saga-1", "reserve-credit", compensation); got != inbox.BarrierNullCompensation {
			t.Fatalf("compensation of saga-1/reserve-credit: %v, want null_compensation", got)
		}
		// Neither another saga's step of the same name nor another step of
		// the same saga is refused.
		if got := runBarrier(t, db.DB, ib, "saga-2", "reserve-credit", action); got != inbox.BarrierApplied {
			t.Errorf("action of saga-2/reserve-credit: %v, want applied", got)
		}
		if got := runBarrier(t, db.DB, ib, "saga-1", "reserve-stock", action); got != inbox.BarrierApplied {
			t.Errorf("action of saga-1/reserve-stock: %v, want applied", got)
		}
	})
}

func TestBarrierTx_FailedSideRollsBackItsBarrierSoARetryRunsAgain(t *testing.T) {
	errBoom := errors.New("ledger unavailable")
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		ib := newInbox(t, db.DB, inbox.Config{})
		for _, op := range []inbox.BarrierOp{action, compensation} {
			var outcome inbox.BarrierOutcome
			var fnErr error
			err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				outcome, fnErr = ib.BarrierTx(ctx, tx, "saga-1", "reserve-credit", op,
					func(ctx context.Context, tx sqldb.Tx) error {
						if err := recordEffect("saga-1", "reserve-credit", op)(ctx, tx); err != nil {
							return err
						}
						return errBoom // after writing: the write must go too
					})
				return fnErr
			})
			if fnErr != errBoom || outcome != 0 {
				t.Fatalf("failing %s: BarrierTx returned (%v, %v), want (BarrierOutcome(0), fn's error as is)", op, outcome, fnErr)
			}
			if !errors.Is(err, errBoom) {
				t.Fatalf("failing %s: InTx returned %v, want fn's error", op, err)
			}
			// The retry finds no barrier row: it runs fn, and is not taken
			// for a duplicate (nor, for the compensation, a null one).
			if got := runBarrier(t, db.DB, ib, "saga-1", "reserve-credit", op); got != inbox.BarrierApplied {
				t.Errorf("retry of the %s: %v, want applied", op, got)
			}
		}
		if a, c := stepEffects(t, db.DB, "saga-1", "reserve-credit"); a != 1 || c != 1 {
			t.Errorf("%d action effects and %d compensation effects, want 1 and 1", a, c)
		}
	})
}

func TestBarrierTx_ConcurrentSidesOfAStepWaitForTheFirstTransaction(t *testing.T) {
	cases := []struct {
		first, second inbox.BarrierOp
		firstCommits  bool
		wantFirst     inbox.BarrierOutcome
		wantSecond    inbox.BarrierOutcome
		wantA, wantC  int
	}{
		{action, compensation, true, inbox.BarrierApplied, inbox.BarrierApplied, 1, 1},
		{action, compensation, false, inbox.BarrierApplied, inbox.BarrierNullCompensation, 0, 0},
		{compensation, action, true, inbox.BarrierNullCompensation, inbox.BarrierRefused, 0, 0},
		{compensation, action, false, inbox.BarrierNullCompensation, inbox.BarrierApplied, 1, 0},
		{action, action, true, inbox.BarrierApplied, inbox.BarrierDuplicate, 1, 0},
		{action, action, false, inbox.BarrierApplied, inbox.BarrierApplied, 1, 0},
	}
	errRollback := errors.New("roll back")
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ctx := context.Background()
		// Two participant instances, each with its own connections.
		ib1 := newInbox(t, db.DB, inbox.Config{})
		db2 := open(t, db.url)
		ib2 := newInbox(t, db2, inbox.Config{})
		for i, c := range cases {
			end := map[bool]string{true: "commits", false: "rolls back"}[c.firstCommits]
			t.Run(fmt.Sprintf("%s that %s, then %s", c.first, end, c.second), func(t *testing.T) {
				sagaID := fmt.Sprintf("saga-%d", i)
				inTx, release := make(chan struct{}), make(chan struct{})
				letGo := sync.OnceFunc(func() { close(release) })
				defer letGo() // should the test fail before it lets the first go
				firstDone := make(chan error, 1)
				var firstOutcome inbox.BarrierOutcome
				go func() {
					firstDone <- db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						var err error
						firstOutcome, err = ib1.BarrierTx(ctx, tx, sagaID, "reserve-credit", c.first,
							recordEffect(sagaID, "reserve-credit", c.first))
						if err != nil {
							return err
						}
						close(inTx)
						<-release // hold the transaction open, barrier rows written
						if !c.firstCommits {
							return errRollback
						}
						return nil
					})
				}()
				select {
				case <-inTx:
				case err := <-firstDone:
					t.Fatalf("first %s: %v", c.first, err)
				}

				var secondOutcome inbox.BarrierOutcome
				var secondErr error
				secondDone := make(chan struct{})
				go func() {
					defer close(secondDone)
					secondOutcome, secondErr = callBarrier(db2, ib2, sagaID, "reserve-credit", c.second)
				}()
				defer func() { letGo(); <-secondDone }()
				if db.Dialect() == sqldb.Postgres {
					waitFor(t, "the second call to wait for the first's barrier row", func() bool {
						var waiting int
						if err := db.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity
							WHERE datname = current_database() AND wait_event_type = 'Lock'
							AND query LIKE 'INSERT INTO troupe_barrier%'`).Scan(&waiting); err != nil {
							t.Fatal(err)
						}
						return waiting == 1
					})
				}
				// On SQLite the second's BEGIN IMMEDIATE queues behind the
				// first's write lock, so it cannot have finished.
				select {
				case <-secondDone:
					t.Fatalf("the second call finished while the first held its transaction open")
				default:
				}
				letGo()
				if err := <-firstDone; err != nil && !errors.Is(err, errRollback) {
					t.Fatalf("first %s: %v", c.first, err)
				}
				<-secondDone
				if secondErr != nil {
					t.Fatal(secondErr)
				}

				if firstOutcome != c.wantFirst || secondOutcome != c.wantSecond {
					t.Errorf("outcomes %v then %v, want %v then %v", firstOutcome, secondOutcome, c.wantFirst, c.wantSecond)
				}
				if a, comp := stepEffects(t, db.DB, sagaID, "reserve-credit"); a != c.wantA || comp != c.wantC {
					t.Errorf("%d action effects and %d compensation effects, want %d and %d", a, comp, c.wantA, c.wantC)
				}
			})
		}
	})
}

func TestBarrierTx_ManyConcurrentActionsAndCompensationsEndInOneOfTwoStates(t *testing.T) {
	const steps, copies = 8, 3 // each step: 3 actions and 3 compensations at once
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		type key struct {
			step string
			op   inbox.BarrierOp
		}
		var mu sync.Mutex
		outcomes := map[key]map[inbox.BarrierOutcome]int{}
		start := make(chan struct{})
		var wg sync.WaitGroup
		for s := range steps {
			step := fmt.Sprintf("step-%d", s)
			for _, op := range []inbox.BarrierOp{action, compensation} {
				outcomes[key{step, op}] = map[inbox.BarrierOutcome]int{}
				for range copies {
					wg.Go(func() {
						<-start
						var outcome inbox.BarrierOutcome
						err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
							var err error
							outcome, err = ib.BarrierTx(ctx, tx, "saga-1", step, op, recordEffect("saga-1", step, op))
							return err
						})
						if err != nil {
							t.Errorf("%s of %s: %v", op, step, err)
							return
						}
						mu.Lock()
						outcomes[key{step, op}][outcome]++
						mu.Unlock()
					})
				}
			}
		}
		close(start)
		wg.Wait()

		for s := range steps {
			step := fmt.Sprintf("step-%d", s)
			acts, comps := outcomes[key{step, action}], outcomes[key{step, compensation}]
			a, c := stepEffects(t, db.DB, "saga-1", step)
			compensatedAction := acts[inbox.BarrierApplied] == 1 && acts[inbox.BarrierDuplicate] == copies-1 &&
				comps[inbox.BarrierApplied] == 1 && comps[inbox.BarrierDuplicate] == copies-1 && a == 1 && c == 1
			nullCompensation := acts[inbox.BarrierRefused] == copies &&
				comps[inbox.BarrierNullCompensation] == 1 && comps[inbox.BarrierDuplicate] == copies-1 && a == 0 && c == 0
			if !compensatedAction && !nullCompensation {
				t.Errorf("%s: action outcomes %v, compensation outcomes %v, %d action and %d compensation effects; "+
					"want the action applied once and compensated once, or a null compensation and every action refused",
					step, acts, comps, a, c)
			}
		}
	})
}

func TestBarrierTx_InvalidArgumentsAreNamedAndWriteNothing(t *testing.T) {
	fn := func(context.Context, sqldb.Tx) error { t.Error("fn called"); return nil }
	cases := []struct {
		name         string
		sagaID, step string
		op           inbox.BarrierOp
		fn           func(context.Context, sqldb.Tx) error
		want         []string
	}{
		{"empty saga id", "", "reserve-credit", action, fn, []string{"empty saga id"}},
		{"empty step", "saga-1", "", compensation, fn, []string{"empty step"}},
		{"unknown op", "saga-1", "reserve-credit", 0, fn, []string{"op BarrierOp(0)"}},
		{"nil fn", "saga-1", "reserve-credit", action, nil, []string{"nil fn"}},
		{"everything wrong", "", "", 3, nil, []string{"empty saga id", "empty step", "op BarrierOp(3)", "nil fn"}},
	}
	forEachDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
					outcome, err := ib.BarrierTx(ctx, tx, c.sagaID, c.step, c.op, c.fn)
					if outcome != 0 {
						t.Errorf("outcome %v with an error, want none", outcome)
					}
					return err
				})
				if err == nil {
					t.Fatal("no error")
				}
				for _, w := range c.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
			})
		}
		var rows int
		if err := db.QueryRow(context.Background(), `SELECT COUNT(*) FROM troupe_barrier`).Scan(&rows); err != nil {
			t.Fatal(err)
		}
		if rows != 0 {
			t.Errorf("%d barrier rows, want 0", rows)
		}
	})
	// A nil tx is refused rather than dereferenced.
	ib := newInbox(t, openDB(t, "sqlite").DB, inbox.Config{})
	if _, err := ib.BarrierTx(context.Background(), nil, "saga-1", "reserve-credit", action, fn); err == nil ||
		!strings.Contains(err.Error(), "nil tx") {
		t.Errorf("nil tx: error %v, want one that says nil tx", err)
	}
}

func TestBarrierOutcome_StringsNameEachOutcome(t *testing.T) {
	for o, want := range map[inbox.BarrierOutcome]string{
		inbox.BarrierApplied: "applied", inbox.BarrierDuplicate: "duplicate",
		inbox.BarrierNullCompensation: "null_compensation", inbox.BarrierRefused: "refused", 0: "BarrierOutcome(0)",
	} {
		if got := o.String(); got != want {
			t.Errorf("BarrierOutcome(%d).String() = %q, want %q", int(o), got, want)
		}
	}
	for op, want := range map[inbox.BarrierOp]string{action: "action", compensation: "compensation", 0: "BarrierOp(0)"} {
		if got := op.String(); got != want {
			t.Errorf("BarrierOp(%d).String() = %q, want %q", int(op), got, want)
		}
	}
}

func TestBarrierActionsTx_ClaimsOnlyActionsNotClaimedBeforeOrEarlierInTheList(t *testing.T) {
	forEachBarrierDB(t, func(t *testing.T, db testDB) {
		ib := newInbox(t, db.DB, inbox.Config{})
		runBarrier(t, db.DB, ib, "done", "reserve", inbox.BarrierAction)
		runBarrier(t, db.DB, ib, "compensated", "reserve", inbox.BarrierCompensation)
		steps := []inbox.BarrierStep{
			{SagaID: "new-b", Step: "reserve"},
			{SagaID: "done", Step: "reserve"},
			{SagaID: "new-a", Step: "reserve"},
			{SagaID: "compensated", Step: "reserve"},
			{SagaID: "new-a", Step: "reserve"}, // again: the first one claims it
			{SagaID: "new-a", Step: "ship"},
		}
		var applied []bool
		if err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
			var err error
			applied, err = ib.BarrierActionsTx(ctx, tx, steps)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if want := []bool{true, false, true, false, false, true}; !slices.Equal(applied, want) {
			t.Fatalf("applied %v, want %v", applied, want)
		}
		// What was not claimed, BarrierTx tells apart; what was claimed
		// is a duplicate now.
		for _, c := range []struct {
			saga string
			want inbox.BarrierOutcome
		}{{"done", inbox.BarrierDuplicate}, {"compensated", inbox.BarrierRefused}, {"new-a", inbox.BarrierDuplicate}} {
			if got := runBarrier(t, db.DB, ib, c.saga, "reserve", inbox.BarrierAction); got != c.want {
				t.Errorf("%s: BarrierTx = %v, want %v", c.saga, got, c.want)
			}
		}
	})
}
