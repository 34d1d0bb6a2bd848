// Package flow lets an operator see a choreographed business transaction
// as one flow: list flows, read where each stands, and read its messages
// in causal order, as saga.Orchestrator's Get, List and History do for
// an orchestrated saga.
//
// # What a flow is
//
// In a choreography no service is in charge: each reacts to the others'
// events through its inbox and publishes its own through its outbox. An
// Order service publishes shop.order.created; a Customer service reserves
// credit and publishes shop.credit.reserved; an Inventory service
// publishes shop.stock.reserved; the Order service approves the order.
// Every message Troupe writes while handling another inherits its
// correlation id and names it as its cause (message.WithCause,
// message.InheritCause, outbox.Add), and a message that starts a
// transaction gives its own id as correlation id to what it causes. So all
// the messages of one business transaction share a correlation id, and
// their causation ids make a tree rooted at the start.
//
// A flow is that set of messages: its ID is the correlation id. A
// [Definition] names a kind of flow by the message types that start it
// (Starts), happen in its middle (Steps), and end it (Completes, Fails),
// with an optional Deadline. A [Tracker] records the messages it is given
// (subscribed to the choreography's topics with [Tracker.Handler], or in a
// service's own transaction with [Tracker.RecordTx]) and derives each
// flow's [Status]: Running from its first message, then Completed or
// Failed by the first ending message recorded; Stalled, at read time, if
// it runs longer than its Deadline.
//
// # Flows and sagas
//
// An orchestrated saga (package saga) keeps its state in its owner: the
// orchestrator decides each step, and its row is the truth about the
// saga. A choreography has no owner and no such row: its state is derived
// from the events the services publish, after the fact, by an observer
// that changes nothing. The tracker's tables are therefore a projection —
// they can be rebuilt by replaying the topics, as far back as the broker
// keeps them, into a new consumer group — and a flow's
// status says what the services have announced, not what the tracker has
// decided. Where a saga's definition says what to do next, a flow's
// definition only says how to read what happened.
//
// # Delivery as it comes
//
// The broker delivers at least once, and in no order across topics.
// Recording is idempotent per (source, id): a redelivered or duplicated
// message changes nothing (Stats counts it). A completion recorded before
// its start still makes one flow with the right name and status, since
// every declared type names its definition; History orders the messages by
// causation, not by arrival. Messages of undeclared types are recorded
// only for a flow already known, so declare the types of the middle steps
// too. A message without a correlation id (other than a start) is
// acknowledged and ignored, as is one of an undeclared type whose flow is
// unknown; a delivery without a message, an id or a source is
// dead-lettered.
//
// The first terminal message recorded decides the outcome. One with the
// other outcome recorded later (a service that approved an order it had
// rejected, say) is kept in the history with Event.Contradicts set, and
// appends a note such as "also completed by shop.order.approved" to the
// flow's Reason, so the operator sees the contradiction without the
// status flapping.
//
// One correlation id is one flow, of the definition of its first declared
// message recorded. Messages of another definition with the same
// correlation id (an order that goes on to start a shipment) are recorded
// in its history but do not change its status; track such chains as one
// definition, or give the second transaction a correlation id of its own.
//
// # Wiring
//
// The tracker is an observer, so it can run as a service of its own, with
// its own database, or inside an existing one (later, the dashboard's
// server): migrate its tables, define the flow kinds, and subscribe its
// handler to every topic of the choreography with a consumer group of its
// own.
//
//	flow.Migrate(ctx, db)
//	tr, err := flow.New(db, flow.Config{Logger: logger})
//	err = tr.Define(flow.Definition{
//		Name:      "shop.create-order",
//		Starts:    []string{"shop.order.created"},
//		Steps:     []string{"shop.credit.reserved", "shop.credit.refused", "shop.stock.reserved"},
//		Completes: []string{"shop.order.approved"},
//		Fails:     []string{"shop.order.rejected"},
//		Deadline:  time.Minute,
//	})
//	for _, topic := range []string{"shop.orders", "shop.customers", "shop.inventory"} {
//		b.Subscribe(ctx, broker.SubscribeConfig{Topic: topic, Group: "flows"}, tr.Handler())
//	}
//
// Several instances may consume the same group into one database: each
// batch is one transaction whose flow rows are merged by upserts under row
// locks, so no update is lost. Prune deletes ended flows after a
// retention period.
package flow
