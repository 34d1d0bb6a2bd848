package outbox

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"time"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

//go:embed migrations
var migrationFS embed.FS

// Component is the name under which the outbox's migrations are recorded in
// troupe_migrations.
const Component = "outbox"

// Table is the outbox table's name.
const Table = "troupe_outbox"

// Partitions is the number of partitions rows are spread over. A message's
// partition is Partition(topic, subject): every message of one (topic,
// subject) lands in the same partition, and a partition is relayed by one
// relay at a time, in seq order. The number is fixed, because writers (Add)
// and relays must agree on it without sharing a configuration; it also caps
// how many relay instances can share the work.
const Partitions = 16

// maxRowsPerInsert bounds one INSERT's rows, to stay far below both
// dialects' limit on bound parameters.
const maxRowsPerInsert = 500

// ErrInvalidMessage is matched by the error Add returns for a message that
// cannot be stored (it fails message validation, or it is nil).
var ErrInvalidMessage = errors.New("outbox: invalid message")

// Migrate creates or updates the outbox's tables in db. It is safe to call
// from several processes at once, at every start-up.
func Migrate(ctx context.Context, db *sqldb.DB) error {
	migs, err := sqldb.LoadMigrations(migrationFS, "migrations/"+db.Dialect().String())
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	return db.Migrate(ctx, Component, migs)
}

// Partition returns the partition of a message with this topic and subject:
// the FNV-1a hash of topic, a zero byte and subject, modulo Partitions.
// It never changes for a given (topic, subject), in this or any later version.
func Partition(topic, subject string) int {
	h := fnv.New32a()
	h.Write([]byte(topic))
	h.Write([]byte{0})
	h.Write([]byte(subject))
	return int(h.Sum32() % Partitions)
}

// Add writes msgs to the outbox in tx, to be published on topic once tx
// commits. Nothing is published if tx rolls back. Messages with the same
// topic and subject are published in the order they were added, within one
// transaction and across transactions that follow one another. Two
// transactions that write the same subject at the same time have no order
// between them: each row's seq is taken at insert, and the relay publishes
// what is committed when it reads. Services normally serialize such writers
// already, by updating the entity's own row in the same transaction.
//
// A message without an ID gets one (message.NewID). A message that lacks a
// causation id takes the correlation id, causation id and trace parent of the
// message ctx carries (see message.WithCause), so the messages a handler
// writes continue the flow of the message it handles. Add sets these fields
// on msgs themselves.
//
// tx is any transaction: one from sqldb.DB.InTx, or the application's own,
// wrapped with sqldb.FromSQL or sqldb.FromPgx. On PostgreSQL the insert
// NOTIFYs the channel "troupe_outbox" (a trigger does, delivered at commit),
// which wakes relays in Notify mode; a relay in the same process can also be
// woken with Relay.Notify after commit. In a transaction of sqldb.DB.InTx on
// PostgreSQL, the insert travels with the transaction's next statement or
// its commit (sqldb.ExecLater), so it costs no round trip of its own; an
// error it meets is then returned by that statement or the commit.
func Add(ctx context.Context, tx sqldb.Tx, topic string, msgs ...*message.Message) error {
	rows, err := rowsOf(ctx, topic, msgs)
	if err != nil || len(rows) == 0 {
		return err
	}
	if d := DeferredFrom(ctx, tx); d != nil {
		d.rows = append(d.rows, rows...)
		return nil
	}
	return insertRows(ctx, tx, rows)
}

// row is a message ready for the outbox.
type row struct {
	id, topic, subject string
	envelope           []byte
}

// rowsOf checks and encodes msgs for topic, giving each an ID and its cause
// (see Add).
func rowsOf(ctx context.Context, topic string, msgs []*message.Message) ([]row, error) {
	if topic == "" {
		return nil, fmt.Errorf("%w: empty topic", ErrInvalidMessage)
	}
	if len(msgs) == 0 {
		return nil, nil
	}
	for i, m := range msgs {
		if m == nil {
			return nil, fmt.Errorf("%w: message %d is nil", ErrInvalidMessage, i)
		}
	}
	message.InheritCause(ctx, msgs...)
	rows := make([]row, len(msgs))
	for i, m := range msgs {
		if m.ID == "" {
			m.ID = message.NewID()
		}
		env, err := message.EncodeJSON(m)
		if err != nil {
			return nil, fmt.Errorf("%w: message %d (id %q): %w", ErrInvalidMessage, i, m.ID, err)
		}
		rows[i] = row{id: m.ID, topic: topic, subject: m.Subject, envelope: env}
	}
	return rows, nil
}

// insertRows inserts rows in tx, in their order, in multi-row statements.
func insertRows(ctx context.Context, tx sqldb.Tx, rows []row) error {
	now := time.Now().UTC()
	args := make([]any, 0, 6*min(len(rows), maxRowsPerInsert))
	for start, end := range sqldb.Chunks(tx.Dialect(), len(rows), maxRowsPerInsert) {
		args = args[:0]
		for _, r := range rows[start:end] {
			args = append(args, r.id, r.topic, r.subject, Partition(r.topic, r.subject), r.envelope, now)
		}
		q := "INSERT INTO troupe_outbox (id, topic, subject, partition, envelope, created_at) VALUES " + sqldb.ValuesList(1, end-start, 6)
		if err := sqldb.ExecLater(ctx, tx, q, args...); err != nil {
			return fmt.Errorf("outbox: add %d messages to topic %q: %w", end-start, rows[start].topic, err)
		}
	}
	return nil
}

// Deferred holds the messages that calls of Add in one transaction gave
// it, to insert them together: a loop that adds one message per item (a
// batch's handlers, a batch of sagas' steps) then costs the database a
// statement for the lot instead of one per item. See Defer.
type Deferred struct {
	tx   sqldb.Tx
	rows []row
}

type deferredKey struct{}

// Defer returns a context in which Add, given tx, checks and encodes its
// messages as usual but keeps them in the returned Deferred instead of
// inserting them. Deferred.Flush inserts them, in the order added, in as
// few statements as their number allows. Add given another transaction
// inserts at once, as without Defer.
//
// Flush before tx commits: messages kept and not flushed are not
// published; after Flush, Add inserts at once again. A rollback to a
// savepoint does not take kept messages back by itself: code that rolls
// tx back to a savepoint must drop with Truncate the messages added since
// (Len tells how many there were when the savepoint was set; DeferredFrom
// finds the Deferred).
func Defer(ctx context.Context, tx sqldb.Tx) (context.Context, *Deferred) {
	d := &Deferred{tx: tx}
	return context.WithValue(ctx, deferredKey{}, d), d
}

// DeferredFrom returns the Deferred that ctx carries for tx (see Defer),
// or nil when Add given ctx and tx inserts at once.
func DeferredFrom(ctx context.Context, tx sqldb.Tx) *Deferred {
	if d, ok := ctx.Value(deferredKey{}).(*Deferred); ok && d.tx != nil && sqldb.SameTx(d.tx, tx) {
		return d
	}
	return nil
}

// Len returns how many messages d holds.
func (d *Deferred) Len() int { return len(d.rows) }

// Truncate drops the messages added after the first n: those of writes a
// rollback to a savepoint undid.
func (d *Deferred) Truncate(n int) {
	if n < len(d.rows) {
		d.rows = d.rows[:n]
	}
}

// Flush inserts the messages d holds into the outbox, in its transaction,
// and ends d: Add given its context inserts at once from then on.
func (d *Deferred) Flush(ctx context.Context) error {
	rows, tx := d.rows, d.tx
	d.rows, d.tx = nil, nil
	if len(rows) == 0 || tx == nil {
		return nil
	}
	return insertRows(ctx, tx, rows)
}

// Row is one outbox row as a relay reads it.
type Row struct {
	// Seq orders rows: the relay publishes a partition's rows in seq order.
	Seq int64
	// ID is the message id, the broker's dedup id.
	ID string
	// Topic is the topic to publish to.
	Topic string
	// Subject is the message's subject ("" when it has none).
	Subject string
	// Partition is Partition(Topic, Subject).
	Partition int
	// Envelope is the message in the CloudEvents JSON format
	// (message.EncodeJSON); decode it with DecodeEnvelope.
	Envelope []byte
}

// DecodeEnvelope decodes a row's envelope into the message to publish.
func DecodeEnvelope(envelope []byte) (*message.Message, error) {
	m, err := message.DecodeJSON(envelope)
	if err != nil {
		return nil, fmt.Errorf("outbox: decode envelope: %w", err)
	}
	return m, nil
}

// MarkDelivered sets delivered_at to at on the rows with the given seqs, in
// one transaction (one statement on PostgreSQL; on SQLite a few, see
// sqldb.Chunks), so that relays skip them and retention deletes them
// later. Marking a row twice is harmless.
//
// On PostgreSQL the mark commits without waiting for its WAL to reach the
// disk (synchronous_commit off for its transaction): a mark is the one
// write of the outbox whose loss costs nothing but a duplicate, as a mark
// lost in a crash of the server leaves its rows to be published again,
// which the broker's and the consumers' deduplication absorb (the
// guarantee is at least once, made exactly once by the inbox). It spares
// the relay a disk flush per batch, which, under load, is most of what
// its commits cost.
func MarkDelivered(ctx context.Context, db *sqldb.DB, at time.Time, seqs ...int64) error {
	if len(seqs) == 0 {
		return nil
	}
	var err error
	if db.Dialect() == sqldb.Postgres {
		err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if err := sqldb.ExecLater(ctx, tx, "SET LOCAL synchronous_commit = off"); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "UPDATE troupe_outbox SET delivered_at = $1 WHERE seq = ANY($2)", at.UTC(), seqs)
			return err
		})
	} else {
		// Placeholders, in runs of a few sizes (sqldb.Chunks), in one
		// transaction: each of the statements is parsed once, where a list
		// of literals would make a new statement of every call.
		err = db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			args := make([]any, 0, 1+min(len(seqs), maxRowsPerInsert))
			for lo, hi := range sqldb.Chunks(sqldb.SQLite, len(seqs), maxRowsPerInsert) {
				args = append(args[:0], at.UTC())
				for _, s := range seqs[lo:hi] {
					args = append(args, s)
				}
				if _, err := tx.Exec(ctx, "UPDATE troupe_outbox SET delivered_at = $1 WHERE seq IN ("+sqldb.List(2, hi-lo)+")", args...); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err != nil {
		return fmt.Errorf("outbox: mark %d rows delivered: %w", len(seqs), err)
	}
	return nil
}
