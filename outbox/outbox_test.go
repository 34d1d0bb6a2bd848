package outbox_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	if childMain() {
		return
	}
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

// dialects lists the databases every test runs on.
var dialects = []string{"sqlite", "postgres"}

// openDB opens a fresh, migrated database of the given kind for t.
func openDB(t testing.TB, kind string) (*sqldb.DB, string) {
	t.Helper()
	ctx := context.Background()
	var url string
	if kind == "postgres" {
		url = pgtest.URL(t)
	} else {
		url = "sqlite://" + filepath.Join(t.TempDir(), "outbox.db")
	}
	db, err := sqldb.Open(ctx, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := outbox.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	return db, url
}

func newMsg(subject string, n int) *message.Message {
	m := message.New("/test/outbox", "test.outbox.counted", []byte(`{"n":`+itoa(n)+`}`))
	m.Subject = subject
	m.DataContentType = "application/json"
	return m
}

func itoa(n int) string {
	const digits = "0123456789"
	if n == 0 {
		return "0"
	}
	var b []byte
	for n > 0 {
		b = append([]byte{digits[n%10]}, b...)
		n /= 10
	}
	return string(b)
}

func TestAdd_RowsCommitWithTheTransactionAndRollBackWithIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			a, b := newMsg("order-1", 1), newMsg("order-1", 2)
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return outbox.Add(ctx, tx, "shop.orders", a, b)
			}); err != nil {
				t.Fatal(err)
			}
			rolledBack := newMsg("order-2", 3)
			errBoom := context.Canceled
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				if err := outbox.Add(ctx, tx, "shop.orders", rolledBack); err != nil {
					return err
				}
				return errBoom
			}); err != errBoom {
				t.Fatalf("InTx = %v, want the rollback's cause", err)
			}
			rows, err := db.Query(ctx, "SELECT seq, id, topic, subject, partition, envelope FROM troupe_outbox ORDER BY seq")
			if err != nil {
				t.Fatal(err)
			}
			var got []outbox.Row
			for rows.Next() {
				var r outbox.Row
				if err := rows.Scan(&r.Seq, &r.ID, &r.Topic, &r.Subject, &r.Partition, &r.Envelope); err != nil {
					t.Fatal(err)
				}
				got = append(got, r)
			}
			if err := rows.Close(); err != nil {
				t.Fatal(err)
			}
			if len(got) != 2 || got[0].ID != a.ID || got[1].ID != b.ID || got[0].Seq >= got[1].Seq {
				t.Fatalf("rows = %+v, want a then b only", got)
			}
			for _, r := range got {
				if r.Topic != "shop.orders" || r.Subject != "order-1" || r.Partition != outbox.Partition("shop.orders", "order-1") {
					t.Errorf("row %d: topic %q subject %q partition %d", r.Seq, r.Topic, r.Subject, r.Partition)
				}
				m, err := outbox.DecodeEnvelope(r.Envelope)
				if err != nil {
					t.Fatal(err)
				}
				if m.ID != r.ID || m.Subject != "order-1" {
					t.Errorf("envelope decodes to %+v", m)
				}
			}
		})
	}
}

func TestAdd_InheritsCorrelationCausationAndTraceFromTheHandledMessage(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	ctx := context.Background()
	cause := newMsg("order-1", 1)
	cause.CorrelationID = "corr-1"
	cause.TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	caused := newMsg("order-1", 2)
	if err := db.InTx(message.WithCause(ctx, cause), func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, "shop.orders", caused)
	}); err != nil {
		t.Fatal(err)
	}
	var env []byte
	if err := db.QueryRow(ctx, "SELECT envelope FROM troupe_outbox").Scan(&env); err != nil {
		t.Fatal(err)
	}
	m, err := outbox.DecodeEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	if m.CorrelationID != "corr-1" || m.CausationID != cause.ID || m.TraceParent != cause.TraceParent {
		t.Fatalf("stored message carries correlation %q causation %q trace %q", m.CorrelationID, m.CausationID, m.TraceParent)
	}
}

func TestAdd_RefusesAnInvalidMessageAndWritesNothing(t *testing.T) {
	db, _ := openDB(t, "sqlite")
	ctx := context.Background()
	bad := &message.Message{ID: "x", Type: "t"} // no source
	err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		return outbox.Add(ctx, tx, "shop.orders", newMsg("s", 1), bad)
	})
	if !errors.Is(err, outbox.ErrInvalidMessage) {
		t.Fatalf("err = %v, want ErrInvalidMessage", err)
	}
	var n int
	if err := db.QueryRow(ctx, "SELECT count(*) FROM troupe_outbox").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d rows written", n)
	}
}

func TestAdd_ManyMessagesInOneCallKeepTheirOrder(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			ctx := context.Background()
			msgs := make([]*message.Message, 1200)
			for i := range msgs {
				msgs[i] = newMsg("s", i)
			}
			if err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
				return outbox.Add(ctx, tx, "t", msgs...)
			}); err != nil {
				t.Fatal(err)
			}
			rows, err := db.Query(ctx, "SELECT id FROM troupe_outbox ORDER BY seq")
			if err != nil {
				t.Fatal(err)
			}
			i := 0
			for rows.Next() {
				var id string
				rows.Scan(&id)
				if i >= len(msgs) || id != msgs[i].ID {
					t.Fatalf("row %d has id %s", i, id)
				}
				i++
			}
			if err := rows.Close(); err != nil || i != len(msgs) {
				t.Fatalf("read %d rows, err %v", i, err)
			}
		})
	}
}

func TestPartition_IsStableAndInRange(t *testing.T) {
	// Writers and relays of every version must agree: pin a few values.
	for _, c := range []struct {
		topic, subject string
		want           int
	}{{"shop.orders", "order-1", 6}, {"shop.orders", "", 4}, {"a", "b", 2}} {
		if got := outbox.Partition(c.topic, c.subject); got != c.want {
			t.Errorf("Partition(%q, %q) = %d, want %d", c.topic, c.subject, got, c.want)
		}
	}
	seen := map[int]bool{}
	for i := range 500 {
		seen[outbox.Partition("t", itoa(i))] = true
	}
	if len(seen) != outbox.Partitions {
		t.Fatalf("500 subjects use %d of %d partitions", len(seen), outbox.Partitions)
	}
}
