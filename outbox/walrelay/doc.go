// Package walrelay relays the transactional outbox by tailing PostgreSQL's
// write-ahead log instead of polling the table: the relay reads the inserts
// into troupe_outbox from a logical replication slot (the pgoutput plugin,
// through a publication for inserts only), publishes them to the broker in
// batches, and tells the server how far it may forget.
//
// Use it where polling costs too much or adds too much latency; the rows are
// written exactly as before, with outbox.Add in the business transaction, and
// outbox.Migrate creates the table. Run either this relay or the polling relay
// of package outbox against a database, not both: both would publish every
// row (the broker's dedup and the consumers' inbox would absorb the copies,
// at a cost).
//
// # How a row travels
//
// The server decodes the WAL and sends each committed transaction whole, in
// commit order, once it is flushed; rolled-back transactions never appear. The
// relay publishes the rows in that order, one Publish call per topic per
// batch, so every (topic, subject) keeps its order within a transaction and
// across transactions. Once the broker has acknowledged a batch (Publish
// returns when the broker has durably stored it), the relay marks its rows
// delivered with outbox.MarkDelivered and then confirms the end of the last
// transaction the batch completed in a standby status update. A transaction
// is confirmed only when all its rows, and all rows before it, are published.
//
// After a crash or a restart, the relay publishes the rows still undelivered
// in the table (see below) and streams from the slot's confirmed position: nothing confirmed is lost, and what was published but
// not yet confirmed is published again with the same message ids, which the
// broker's dedup (NATS JetStream's window) drops and the consumer's inbox
// absorbs beyond it. A clean stop finishes the batch in flight and confirms it,
// so a handover republishes nothing.
//
// # Marking rows delivered
//
// The relay marks rows delivered, one UPDATE per batch, so the table means
// the same thing whichever relay runs: retention (outbox.DeleteDelivered)
// deletes delivered rows only, an operator counting pending rows sees the
// truth, switching back to the polling relay does not republish the past, and
// each session of this relay starts by publishing what is not marked (see
// below). The UPDATE's WAL is
// decoded by the server but not sent (the publication carries inserts only).
// Its cost is part of the figures below. A row is marked only after the
// broker acknowledged it, and its position is confirmed only after it is
// marked, so a crash between the two republishes (and dedup absorbs) rather
// than strands.
//
// # Rows written before the slot existed, and the table as a backstop
//
// A slot sees only what is committed after it is created. So every session,
// once it holds the slot and before it publishes anything from the stream,
// publishes the rows the table holds undelivered (delivered_at IS NULL), in
// seq order, BatchSize at a time, and marks them delivered; the stream queues
// meanwhile. Every such row is one committed before the slot existed (which
// the stream will never bring), one the stream is about to bring again, or
// one published but not yet marked; the relay does not publish again, from the
// stream, the rows it has just published from the table, and the broker's
// dedup and the consumers' inbox absorb any other repeat. Rows committed after
// that read come from the stream. Because the table is read at the start of
// every session, rows written before the slot existed are delivered whatever
// happens to the session that created the slot (a stop while the broker is
// down, a lost connection, two instances starting together). A row whose
// envelope does not decode is logged with its seq and id and left
// undelivered.
//
// # Several instances and failover
//
// A slot can be read by one connection at a time. Run several instances with
// the same SlotName: the first to start replication holds the slot and
// relays everything, in order; the others get "slot is active", log that they
// are standing by, and retry with backoff (RetryMin up to RetryMax). When the
// holder stops or dies, the server releases the slot as soon as it notices its
// connection is gone (at once for a clean stop or a killed process, within
// wal_sender_timeout or TCP keepalive for a lost machine), and the next
// instance to retry takes over from the confirmed position. There is no split
// of the work: one relay at a time, which is what keeps the commit order.
//
// # The hazard of a permanent slot
//
// The server keeps every WAL segment from the slot's confirmed position on,
// for as long as the slot exists. A slot that nobody reads (every relay down,
// or the WAL relay retired without dropping its slot) makes the WAL grow until
// the disk fills and the server stops. The relay confirms promptly: after
// every acknowledged batch, when the server asks, and every StandbyTimeout
// while idle, and while nothing is in flight it confirms the server's position
// even past WAL that holds no outbox row, so an idle relay keeps its slot's
// lag near zero.
//
// Watch Relay.Lag (or SlotLag): the bytes of WAL held for the slot. Alert when
// it keeps growing. Bound the damage with the server setting
// max_slot_wal_keep_size (PostgreSQL 13 and later): past that much WAL the
// server invalidates the slot rather than fill the disk; Run then returns
// ErrSlotInvalidated and the relay must be reset by dropping the slot
// (DropSlot); the next Run creates a new one and, as every session does, first
// publishes the rows still undelivered in the table, so nothing pending is
// lost (what the old slot had published but not marked goes out again, for
// dedup to absorb). Drop the slot of a
// retired relay with DropSlot(ctx, url, name), or in SQL with
// SELECT pg_drop_replication_slot('troupe_outbox'); a database with a slot
// cannot be dropped.
//
// # Server settings
//
// wal_level = logical; max_replication_slots and max_wal_senders of at least
// one each per relay slot; a user with the REPLICATION attribute, allowed by
// pg_hba.conf to open replication connections; and the right to create the
// publication the first time. Commit latency matters: the server streams WAL
// once it is flushed, so writers with synchronous_commit = off see their
// messages relayed only after the WAL writer flushes (up to three times
// wal_writer_delay, 600 ms by default).
//
// # Limits
//
// The relay holds a transaction's rows in memory only up to BatchSize at a
// time (a larger transaction is published in several batches and confirmed
// after the last), and about 4 x BatchSize rows at most are queued ahead of the
// broker; beyond that it stops reading until the broker catches up, still
// sending status updates so the server does not time the connection out. A
// row whose envelope cannot be decoded cannot be published: it is logged and
// skipped, and stays undelivered in the table. So is a message the broker can
// never take: one that does not validate or encode (message.ErrInvalid,
// message.ErrTooLarge) or is larger than the broker's maximum payload (1 MiB
// by default for NATS). When a batch fails with such an error, the relay
// publishes its messages one at a time, logs each one refused for good with
// its seq and id, leaves it undelivered and goes on with the stream; any other
// failure is retried with backoff, holding everything behind it. A skipped
// row is tried again (and logged again) at the start of each later session,
// until an operator deletes or marks it. Per-subject order holds as far as the
// broker keeps the order of one Publish call and of successive calls; the rows
// read from the table at the start of a session go out in seq order, which
// can differ from commit order between concurrent transactions.
//
// # Figures
//
// On a 2-core machine (GOMAXPROCS=2; PostgreSQL 15, embedded NATS JetStream and
// the writers on the same two cores):
//
//   - troupe bench outbox --db postgres --mode wal (fsync and synchronous_commit
//     on): at an offered 1,000 messages/s (10 per transaction), commit-to-publish
//     latency p50 0.5 to 1.9 ms, p99 2.7 to 5.8 ms; unpaced, the relay drained a
//     backlog of about 400,000 messages at 21,000 to 32,000 messages/s (since
//     every session starts by reading the table, such a backlog goes through
//     that read, which walks the primary key in seq order).
//   - go test -bench WALRelay (fsync off): draining a backlog, 24,000 to 32,000
//     messages/s; relaying while 4 writers commit as fast as they can on the
//     same cores, 16,000 to 19,000 messages/s; at 1,000 messages/s, p50 under
//     1 ms, p99 4 to 18 ms.
//
// Marking rows delivered made no difference above the run-to-run noise in
// these runs; the Go side used about 40% of one core while draining, the rest
// going to the server's decoding and the broker.
package walrelay
