package walrelay

import (
	"context"
	"errors"
	"fmt"
	neturl "net/url"
	"regexp"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/troupedev/troupe/outbox"
	"github.com/troupedev/troupe/sqldb"
)

// Errors a Relay reports. A Relay retries what may pass (a slot held by
// another instance, a lost connection, a broker that refuses a batch) and
// returns from Run on the others.
var (
	// ErrSlotInUse reports that another relay instance holds the slot. Run
	// does not return it: the instance stands by and retries with backoff,
	// taking over when the holder's connection ends.
	ErrSlotInUse = errors.New("walrelay: replication slot is in use by another connection")
	// ErrSlotMismatch reports a slot of the configured name that belongs to
	// another database or decodes with another plugin than pgoutput.
	ErrSlotMismatch = errors.New("walrelay: replication slot exists for another database or plugin")
	// ErrSlotInvalidated reports a slot the server invalidated because it
	// held more WAL than max_slot_wal_keep_size: the WAL it needed is gone.
	// Drop the slot (DropSlot) and start the relay again: its first session
	// publishes the rows still undelivered in the table.
	ErrSlotInvalidated = errors.New("walrelay: replication slot was invalidated (max_slot_wal_keep_size exceeded)")
	// ErrSlotNotFound reports a slot that does not exist (DropSlot, Lag).
	ErrSlotNotFound = errors.New("walrelay: replication slot not found")
	// ErrNoOutboxTable reports a database without the outbox table: run
	// outbox.Migrate first.
	ErrNoOutboxTable = errors.New("walrelay: table troupe_outbox not found (run outbox.Migrate first)")
	// ErrPublicationMismatch reports a publication of the configured name
	// that does not include the outbox table.
	ErrPublicationMismatch = errors.New("walrelay: publication exists but does not publish the outbox table")
)

// PostgreSQL error codes the relay tells apart.
const (
	codeDuplicateObject = "42710"
	codeObjectInUse     = "55006"
	codeUndefinedObject = "42704"
)

// replicationConfig returns the connection config of a logical replication
// connection to url's database.
func replicationConfig(url string) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	for k := range cfg.RuntimeParams {
		if strings.HasPrefix(k, "pool_") {
			delete(cfg.RuntimeParams, k) // pgxpool settings, not server parameters
		}
	}
	cfg.RuntimeParams["replication"] = "database"
	// pgoutput renders bytea with the session's bytea_output; pin it.
	cfg.RuntimeParams["bytea_output"] = "hex"
	return cfg, nil
}

// connectSQL opens an ordinary (non-replication) connection to url's database.
func connectSQL(ctx context.Context, url string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	for k := range cfg.RuntimeParams {
		if k == "replication" || strings.HasPrefix(k, "pool_") {
			delete(cfg.RuntimeParams, k)
		}
	}
	return pgx.ConnectConfig(ctx, cfg)
}

// withoutReplication returns url without a replication parameter, for the
// ordinary connections.
func withoutReplication(raw string) string {
	if u, err := neturl.Parse(raw); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Del("replication")
		u.RawQuery = q.Encode()
		return u.String()
	}
	return replicationKV.ReplaceAllString(raw, "")
}

var replicationKV = regexp.MustCompile(`(^|\s)replication=\S*`)

// ensurePublication creates the publication on the outbox table, for inserts
// only, unless it exists; it checks that the publication covers the table.
func ensurePublication(ctx context.Context, conn *sqldb.DB, name string) error {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT to_regclass($1) IS NOT NULL", outbox.Table).Scan(&exists); err != nil {
		return fmt.Errorf("look for table %s: %w", outbox.Table, err)
	}
	if !exists {
		return ErrNoOutboxTable
	}
	_, err := conn.Exec(ctx, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert')", name, outbox.Table))
	var pgErr *pgconn.PgError
	if err != nil && !(errors.As(err, &pgErr) && pgErr.Code == codeDuplicateObject) {
		return fmt.Errorf("create publication %s: %w", name, err)
	}
	var covered bool
	err = conn.QueryRow(ctx,
		"SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND tablename = $2)",
		name, outbox.Table).Scan(&covered)
	if err != nil {
		return fmt.Errorf("check publication %s: %w", name, err)
	}
	if !covered {
		return fmt.Errorf("%w: %s does not include table %s", ErrPublicationMismatch, name, outbox.Table)
	}
	return nil
}

// slotState says whether the slot exists and its confirmed position,
// checking that it is a pgoutput slot of conn's database.
func slotState(ctx context.Context, conn *pgconn.PgConn, slot string) (exists bool, confirmed pglogrepl.LSN, err error) {
	res, err := conn.Exec(ctx, fmt.Sprintf(
		"SELECT database = current_database() AND plugin = 'pgoutput' AND slot_type = 'logical', confirmed_flush_lsn, wal_status FROM pg_replication_slots WHERE slot_name = '%s'",
		slot)).ReadAll()
	if err != nil {
		return false, 0, fmt.Errorf("look up slot %s: %w", slot, err)
	}
	if len(res) != 1 || len(res[0].Rows) == 0 {
		return false, 0, nil
	}
	if string(res[0].Rows[0][0]) != "t" {
		return true, 0, fmt.Errorf("%w: %s", ErrSlotMismatch, slot)
	}
	if string(res[0].Rows[0][2]) == "lost" {
		return true, 0, fmt.Errorf("%w: %s", ErrSlotInvalidated, slot)
	}
	if v := res[0].Rows[0][1]; v != nil {
		if confirmed, err = pglogrepl.ParseLSN(string(v)); err != nil {
			return true, 0, fmt.Errorf("slot %s: confirmed_flush_lsn: %w", slot, err)
		}
	}
	return true, confirmed, nil
}

// createSlot creates the permanent slot. created is false when another
// instance created it first. Rows committed before the slot existed are not
// in its stream; every session publishes them from the table (catchUp).
func createSlot(ctx context.Context, conn *pgconn.PgConn, slot string) (created bool, err error) {
	_, err = pglogrepl.CreateReplicationSlot(ctx, conn, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "NOEXPORT_SNAPSHOT"})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == codeDuplicateObject {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("create replication slot %s: %w", slot, err)
	}
	return true, nil
}

// DropSlot drops the relay's replication slot named slot in the database at
// url, waiting for a relay that still holds it to let go (stop the relays
// first, or DropSlot waits until ctx ends). Drop the slot when the WAL relay
// is retired for good: a permanent slot that nobody reads makes the server keep
// WAL for it until the disk fills. The publication is left in place (it holds
// no WAL); drop it with DROP PUBLICATION if wanted. A slot that does not exist
// gives an error matching ErrSlotNotFound.
func DropSlot(ctx context.Context, url, slot string) error {
	if !nameRE.MatchString(slot) {
		return fmt.Errorf("%w: slot name %q", ErrInvalidConfig, slot)
	}
	cfg, err := replicationConfig(url)
	if err != nil {
		return fmt.Errorf("%w: URL: %w", ErrInvalidConfig, err)
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("walrelay: connect to drop slot %s: %w", slot, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	err = pglogrepl.DropReplicationSlot(ctx, conn, slot, pglogrepl.DropReplicationSlotOptions{Wait: true})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == codeUndefinedObject {
		return fmt.Errorf("%w: %s", ErrSlotNotFound, slot)
	}
	if err != nil {
		return fmt.Errorf("walrelay: drop slot %s: %w", slot, err)
	}
	return nil
}

// SlotLag returns how many bytes of WAL the server keeps for slot in the
// database at url beyond what its relay has confirmed:
// pg_current_wal_lsn() - confirmed_flush_lsn. See Relay.Lag.
func SlotLag(ctx context.Context, url, slot string) (int64, error) {
	conn, err := connectSQL(ctx, url)
	if err != nil {
		return 0, fmt.Errorf("walrelay: connect to read slot lag: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var lag *int64
	err = conn.QueryRow(ctx,
		"SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
		slot).Scan(&lag)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("%w: %s", ErrSlotNotFound, slot)
	}
	if err != nil {
		return 0, fmt.Errorf("walrelay: read lag of slot %s: %w", slot, err)
	}
	if lag == nil {
		return 0, nil
	}
	return max(*lag, 0), nil
}

func isSlotInUse(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == codeObjectInUse && strings.Contains(pgErr.Message, "replication slot")
}
