// Package outbox is Troupe's transactional outbox: messages written in the
// same database transaction as the state change that causes them, then
// published to the broker by a relay. A committed change always yields its
// messages; a rolled-back one yields none.
//
// # Writing
//
// Add inserts messages into the table troupe_outbox inside the caller's
// transaction (sqldb.DB.InTx, or the application's own *sql.Tx or pgx.Tx
// wrapped with sqldb.FromSQL or sqldb.FromPgx). Each row records the message
// in the CloudEvents JSON format, its topic, and its partition: a stable hash
// of topic and subject (Partition), so every message of one (topic, subject)
// lands in one of the Partitions partitions. Rows are numbered by seq, the
// order the relay publishes them in.
//
// Migrate creates the tables; call it at start-up.
//
// # Relaying
//
// A Relay reads the pending rows of the partitions it holds, in seq order,
// publishes them in batches (one Publish call per topic per round), and marks
// them delivered in one transaction. Publish returns once the broker has durably
// accepted the messages, so a row is marked delivered only after its message
// is safe; a relay that stops between the two publishes the rows again when it
// (or another relay) resumes. The mark runs on a goroutine of its own while
// the next round reads and publishes (on SQLite it waits for the write lock,
// often behind the transactions adding the next messages); rows published
// and not yet marked are left out of the next reads, a failed mark is
// retried without publishing its rows again, and the relay stops publishing
// while four batches wait for their mark. The message id is the broker's dedup id: a
// broker that drops re-published ids within a window (NATS JetStream) stores
// such a message once, and the consumer's inbox absorbs any duplicate that
// gets through anyway (a re-publish after the window, or on a broker without
// dedup). The guarantee is therefore at-least-once publication with
// exactly-once effect for consumers that use the inbox.
//
// When the broker refuses a batch, the relay backs off (exponentially, on its
// injected clock) and retries from the first row it could not publish: the
// rows of a partition behind a failed one are never marked delivered before
// it, and are published again after it. Order within a subject rests on the
// broker too: by the broker.Publisher contract, a message refused before the
// broker took it (too large, not encodable, refused by the connection) holds
// back the later messages of its subject in the same Publish call, so none of
// them is stored ahead of it. A failure the broker reports only in its
// acknowledgement (a negative or missing ack, as when the broker goes down
// mid-batch) may come after later messages of the subject were stored; the
// relay then publishes the failed row and those behind it again, the dedup id
// drops the copies already stored, and the failed message lands behind its
// subject-mates. Per-subject order can therefore break across such an
// acknowledgement failure, never across a refusal.
//
// Each round reads every held partition from its oldest pending row; the
// relay keeps no cursor past rows it has seen. A transaction that took its
// seq early and commits late (rows become visible out of seq order) is
// therefore never skipped: its rows are published when they become visible.
//
// The relay wakes when there may be work: in Notify mode on PostgreSQL it
// LISTENs on the channel troupe_outbox, which a trigger on the outbox
// NOTIFYs at the commit of every transaction that inserted rows; in any mode
// Relay.Notify wakes it at once (call it after a commit in the same process,
// which is how a SQLite service gets low latency); and it polls every
// PollInterval as a fallback, so a lost notification delays messages but never
// strands them. After a round that filled its batch it goes on at once.
// The NOTIFY costs every inserting transaction a little at commit (PostgreSQL
// queues notifications under one lock); batch messages into fewer
// transactions if that shows, or use Poll with Relay.Notify.
//
// # Several relays
//
// Several relay instances may run against one database, in one process or
// many. They share the partitions through leases in the table
// troupe_outbox_leases(partition, owner, expires_at): a relay publishes a
// partition's rows only while it holds an unexpired lease on it, renews its
// leases every LeaseTTL/3, and takes over a partition whose lease has expired.
// The relays alive register in troupe_outbox_relays, so each takes about
// Partitions/N of the partitions and gives back any above that share; a relay
// that stops cleanly releases its leases at once, one that crashes loses them
// after LeaseTTL.
//
// Leases were chosen over FOR UPDATE SKIP LOCKED and advisory locks because
// they work the same on SQLite and PostgreSQL, keep a partition with one relay
// for many rounds (so its order is never split between two relays publishing
// at once), and need no connection held open per partition. Their limit: a
// relay that stalls longer than its lease (a long GC pause, a hung publish) may
// overlap with the relay that took over. Each publish is bounded by the
// remaining lease time to make that rare; when it happens both relays publish
// the same rows in seq order, so the broker's dedup drops the second copy and
// order is kept, and any duplicate past the dedup window is absorbed by the
// inbox. Leases compare times from each relay's clock, so relays on different
// machines assume clocks that agree within a small part of LeaseTTL.
//
// # Retention
//
// Delivered rows are deleted after RelayConfig.Retention (default 24 hours),
// in batches of RetentionBatch rows, so the table holds only pending rows and
// the recent past, which an operator can inspect.
//
// # Performance
//
// On a 2-core machine (GOMAXPROCS=2) with embedded NATS JetStream, one relay
// drains a backlog at about 25,000-40,000 messages per second on PostgreSQL
// and 18,000-35,000 on SQLite (batches of 500 rows per partition), and a
// message committed at 1,000 messages per second reaches the broker's
// acknowledgement in about 2 ms at the median and 10-15 ms at p99 in Notify
// mode (Poll mode adds up to PollInterval). Run `troupe bench outbox` and
// `go test -bench . ./outbox` for figures on your machine.
//
// # Limits
//
// Order is kept per (topic, subject) as far as the broker keeps it (see
// Relaying for the acknowledgement failures where it may not); messages of
// different subjects may be published in any order.
//
// A message that can never be published blocks its partition: one larger
// than the broker's maximum message size, or whose envelope exceeds the
// relay's decoding limit (message.DefaultMaxSize, 1 MiB). The relay retries
// it with backoff and never publishes the rows of its partition behind it,
// since skipping it would break its subject's order. Every failed round logs, at Warn, the
// row that holds its partition back with its seq, id, topic, subject,
// partition and the broker's reason. An operator unblocks the partition by
// deleting that row (DELETE FROM troupe_outbox WHERE seq = ...), after
// copying it elsewhere if it matters, or by fixing it in place (its
// envelope column) so the broker accepts it; the relay's next retry goes
// on from there.
package outbox
