package chaos

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/examples/shop/customer"
	sorder "github.com/troupedev/troupe/examples/shop/order"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// The audit is the harness's own consumer, a witness of what the
// examples' consumers cannot show: each node reads, through an inbox of
// its own, every message its service publishes, and records each one it
// handles in a table with no unique key. After the run, a message
// recorded twice is an effect applied twice, which the inbox exists to
// prevent (the examples' own handlers are idempotent on top of it, so a
// broken inbox would not show in their data); a message in the outbox and
// not recorded was lost on the way.
const (
	// InvEffectOnce: no message was recorded twice by the audit.
	InvEffectOnce = "every message had its effect once (the inbox)"
	// InvNothingLost: every message in an outbox was recorded by the
	// audit.
	InvNothingLost = "every message published reached its consumer"
)

const auditGroup = "chaos-audit"

// auditTopics returns the topics a role's service publishes to through
// its outbox, in either of the shop's modes.
func auditTopics(role string) []string {
	switch role {
	case RoleShopOrder:
		return []string{customer.CommandTopic, sorder.EventTopic}
	case RoleShopCustomer:
		return []string{sorder.ReplyTopic, customer.EventTopic}
	case RoleDeliveryOrder:
		return []string{store.CommandTopic, order.EventTopic}
	case RoleDeliveryStore:
		return []string{order.ReplyTopic}
	}
	return nil // the Delivery service publishes nothing
}

// startAudit creates the audit's table and subscribes its consumer to the
// role's topics. stop ends the subscriptions.
func startAudit(ctx context.Context, db *sqldb.DB, b broker.Broker, role string, log *slog.Logger) (stop func(context.Context), err error) {
	topics := auditTopics(role)
	if len(topics) == 0 {
		return func(context.Context) {}, nil
	}
	if _, err := db.Exec(ctx, `CREATE TABLE IF NOT EXISTS chaos_audit (message_id TEXT NOT NULL, source TEXT NOT NULL, topic TEXT NOT NULL)`); err != nil {
		return nil, fmt.Errorf("chaos: create the audit table: %w", err)
	}
	if _, err := db.Exec(ctx, `CREATE INDEX IF NOT EXISTS chaos_audit_id ON chaos_audit (message_id)`); err != nil {
		return nil, fmt.Errorf("chaos: create the audit index: %w", err)
	}
	ib, err := inbox.New(db, inbox.Config{Logger: log})
	if err != nil {
		return nil, err
	}
	record := func(topic string) inbox.HandlerFunc {
		return func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
			_, err := tx.Exec(ctx, `INSERT INTO chaos_audit (message_id, source, topic) VALUES ($1, $2, $3)`, m.ID, m.Source, topic)
			return err
		}
	}
	var subs []broker.Subscription
	stop = func(ctx context.Context) {
		for _, s := range subs {
			s.Stop(ctx)
		}
	}
	for _, t := range topics {
		s, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: t, Group: auditGroup}, ib.Handler(auditGroup+"."+t, record(t)))
		if err != nil {
			stop(ctx)
			return nil, err
		}
		subs = append(subs, s)
	}
	return stop, nil
}

// checkAudit reads role's audit: the messages recorded twice (live false)
// or the outbox's messages not recorded (live true).
func checkAudit(ctx context.Context, db *sqldb.DB, role string, live bool) ([]string, error) {
	topics := auditTopics(role)
	if len(topics) == 0 {
		return nil, nil
	}
	var n int
	if !live {
		err := db.QueryRow(ctx, `SELECT count(*) FROM (SELECT message_id FROM chaos_audit
			GROUP BY message_id, source HAVING count(*) > 1) twice`).Scan(&n)
		if err != nil {
			return nil, fmt.Errorf("chaos: read the %s audit: %w", role, err)
		}
		if n > 0 {
			return []string{fmt.Sprintf("%s: %s: %d messages were handled more than once", role, InvEffectOnce, n)}, nil
		}
		return nil, nil
	}
	// The topics are this package's constants, not input.
	in := "'" + strings.Join(topics, "', '") + "'"
	err := db.QueryRow(ctx, `SELECT count(*) FROM troupe_outbox o WHERE o.topic IN (`+in+`)
		AND NOT EXISTS (SELECT 1 FROM chaos_audit a WHERE a.message_id = o.id)`).Scan(&n)
	if err != nil {
		return nil, fmt.Errorf("chaos: read the %s audit: %w", role, err)
	}
	if n > 0 {
		return []string{fmt.Sprintf("%s: %s: %d messages of its outbox were not handled", role, InvNothingLost, n)}, nil
	}
	return nil, nil
}
