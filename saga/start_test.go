package saga_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/troupedev/troupe/saga"
	"github.com/troupedev/troupe/sqldb"
)

// startData is the data of the sagas of this file's tests.
type startData struct {
	N int `json:"n"`
}

// notesTable makes the table local steps write to, one row per write.
func notesTable(t *testing.T, db *sqldb.DB) {
	t.Helper()
	if _, err := db.Exec(context.Background(), `CREATE TABLE notes (saga_id TEXT NOT NULL, body TEXT NOT NULL)`); err != nil {
		t.Fatal(err)
	}
}

// note is a local step's write, sent at once or queued with ExecLater.
func note(ctx context.Context, tx sqldb.Tx, sagaID, body string, later bool) error {
	const q = `INSERT INTO notes (saga_id, body) VALUES ($1, $2)`
	if later {
		return sqldb.ExecLater(ctx, tx, q, sagaID, body)
	}
	_, err := tx.Exec(ctx, q, sagaID, body)
	return err
}

// notesOf returns a saga's notes, in alphabetical order.
func notesOf(t *testing.T, db *sqldb.DB, sagaID string) []string {
	t.Helper()
	rows, err := db.Query(context.Background(), `SELECT body FROM notes WHERE saga_id = $1 ORDER BY body`, sagaID)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var b string
		if err := rows.Scan(&b); err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// historyOf returns a saga's history as "step op attempt event" lines.
func historyOf(t *testing.T, db *sqldb.DB, sagaID string) []string {
	t.Helper()
	rows, err := db.Query(context.Background(), `SELECT step, op, attempt, event FROM troupe_saga_history WHERE saga_id = $1 ORDER BY seq`, sagaID)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for rows.Next() {
		var step, op, event string
		var attempt int
		if err := rows.Scan(&step, &op, &attempt, &event); err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%s %s %d %s", step, op, attempt, event))
	}
	if err := rows.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// countOf runs a count query.
func countOf(t *testing.T, db *sqldb.DB, q string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// A start with an id in use is ErrExists even though the saga's first
// steps ran before the saga's row was written: the caller rolls back, and
// nothing of the second start stays (local writes, command, deadline,
// history), while the first saga is untouched.
func TestStartTx_AReusedIDIsErrExistsAndTheRollbackUndoesItsFirstSteps(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			o, db := newOrchestratorOn(t, kind)
			notesTable(t, db)
			ctx := context.Background()
			def := &saga.Definition[startData]{Name: "trip", Steps: []saga.Step[startData]{
				{Name: "note", Local: func(ctx context.Context, tx sqldb.Tx, id string, d *startData) error {
					if err := note(ctx, tx, id, fmt.Sprint("now ", d.N), false); err != nil {
						return err
					}
					return note(ctx, tx, id, fmt.Sprint("later ", d.N), true)
				}},
				{Name: "reserve", Topic: "credit.commands", Command: "credit.reserve"},
			}}
			if err := o.Register(def); err != nil {
				t.Fatal(err)
			}
			start := func(n int) error {
				return db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					return def.StartTx(ctx, tx, o, "t1", startData{N: n})
				})
			}
			if err := start(1); err != nil {
				t.Fatal(err)
			}
			wantHistory := []string{"  0 started", "note action 1 done", "reserve action 1 sent"}
			if got := historyOf(t, db, "t1"); !slices.Equal(got, wantHistory) {
				t.Fatalf("history\n got %q\nwant %q", got, wantHistory)
			}
			in, err := o.Get(ctx, "t1")
			if err != nil || in.Status != saga.Running || in.Step != 1 || string(in.Data) != `{"n":1}` {
				t.Fatalf("started saga: %+v, %v; want running at step 1 with its data", in, err)
			}
			outbox, timers := countOf(t, db, `SELECT count(*) FROM troupe_outbox`), countOf(t, db, `SELECT count(*) FROM troupe_timers`)
			if outbox != 1 || timers != 1 {
				t.Fatalf("%d commands and %d deadlines, want one of each", outbox, timers)
			}

			if err := start(2); !errors.Is(err, saga.ErrExists) {
				t.Fatalf("second start of t1: %v, want ErrExists", err)
			}
			if got := notesOf(t, db, "t1"); !slices.Equal(got, []string{"later 1", "now 1"}) {
				t.Errorf("notes %q: want only the first start's", got)
			}
			if got := historyOf(t, db, "t1"); !slices.Equal(got, wantHistory) {
				t.Errorf("history after the second start\n got %q\nwant %q", got, wantHistory)
			}
			if n := countOf(t, db, `SELECT count(*) FROM troupe_outbox`); n != outbox {
				t.Errorf("%d commands, want the first start's %d", n, outbox)
			}
			if n := countOf(t, db, `SELECT count(*) FROM troupe_timers`); n != timers {
				t.Errorf("%d timers, want the first start's %d", n, timers)
			}
			if got, err := o.Get(ctx, "t1"); err != nil || got.Status != in.Status || got.Step != in.Step || string(got.Data) != string(in.Data) {
				t.Errorf("saga after the second start: %+v, %v; want %+v", got, err, in)
			}
		})
	}
}

// A local step that refuses undoes its own writes, and only them, whether
// it wrote through the database or not: the savepoint it runs under is
// queued (sqldb.ExecLater) like the release of the step before.
func TestStartTx_ARefusedLocalStepUndoesOnlyItsOwnWrites(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			o, db := newOrchestratorOn(t, kind)
			notesTable(t, db)
			ctx := context.Background()
			for _, c := range []struct {
				name string
				// the refusing step's writes before it refuses
				writes func(ctx context.Context, tx sqldb.Tx, id string) error
			}{
				{"none", func(context.Context, sqldb.Tx, string) error { return nil }},
				{"queued", func(ctx context.Context, tx sqldb.Tx, id string) error { return note(ctx, tx, id, "refused", true) }},
				{"sent", func(ctx context.Context, tx sqldb.Tx, id string) error { return note(ctx, tx, id, "refused", false) }},
			} {
				def := &saga.Definition[startData]{Name: "refuse-" + c.name, Steps: []saga.Step[startData]{
					// No UndoLocal: the first step's write stays.
					{Name: "a", Local: func(ctx context.Context, tx sqldb.Tx, id string, _ *startData) error {
						return note(ctx, tx, id, "a", true)
					}},
					{Name: "b", Local: func(ctx context.Context, tx sqldb.Tx, id string, _ *startData) error {
						if err := c.writes(ctx, tx, id); err != nil {
							return err
						}
						return saga.Refuse(errors.New("no"))
					}},
				}}
				if err := o.Register(def); err != nil {
					t.Fatal(err)
				}
				id := "s-" + c.name
				if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					return def.StartTx(ctx, tx, o, id, startData{})
				}); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if got := notesOf(t, db, id); !slices.Equal(got, []string{"a"}) {
					t.Errorf("%s: notes %q, want the first step's only", c.name, got)
				}
				if in, err := o.Get(ctx, id); err != nil || in.Status != saga.Compensated || in.Reason != "no" {
					t.Errorf("%s: %+v, %v; want compensated for the refusal", c.name, in, err)
				}
				want := []string{"  0 started", "a action 1 done", "b action 1 refused", "a compensation 1 done", "  0 compensated"}
				if got := historyOf(t, db, id); !slices.Equal(got, want) {
					t.Errorf("%s: history\n got %q\nwant %q", c.name, got, want)
				}
			}
		})
	}
}
