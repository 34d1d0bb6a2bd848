// Package natsjs is Troupe's NATS JetStream broker: a [broker.Broker] that
// runs on a server embedded in the process by default, or on a remote NATS
// server or cluster in production.
//
// # Embedded or remote
//
// With [Config].URL empty, [New] starts a NATS server inside the process,
// keeping JetStream's files in [Config].DataDir, and connects to it without
// a socket. Set [Config].ListenAddr to let other processes and the nats
// command line tool connect too, and pass [Broker.Server] as [Config].Server
// to let other brokers in the process share the server. With URL set, New
// connects to that server and checks that it has JetStream, failing within
// [Config].ConnectTimeout with an error naming the URL.
//
// # Topics and streams
//
// A topic is a NATS subject, stored in a stream of its own, created on first
// use with limits retention (every consumer group reads every message; they
// expire after [Config].MaxAge) and file storage. Topic and group names are
// dot-separated tokens of letters, digits, '-' and '_' (valid on Kafka too).
// Stream names cannot contain '.', so the stream of a topic is its name with
// '.' written '_', '_' written "-_" and '-' written "--": one stream per
// topic, never shared by accident ("shop.order-created" is stored in stream
// "shop_order--created"). If a stream already captures the topic's subject,
// such as one an operator made for "shop.>", the broker uses it instead.
//
// Messages travel in binary mode, in the CloudEvents NATS binding
// ([message.NATS]). The server drops a message whose Nats-Msg-Id it has
// stored in the same stream within [Config].DedupWindow, so a relay that
// retries a batch after a crash publishes nothing twice. CloudEvents only
// promises that the pair (source, id) is unique, and a stream may hold
// several topics, so the Nats-Msg-Id names all three, readably:
//
//	shop.orders:0192f1e4-…@/services/order
//
// Two services that use the same id, and one message published to two
// topics of one stream, are all stored. The id and source are
// percent-escaped where they contain spaces, other characters outside
// printable ASCII, '"', '%', '@' or ';'; an id or source longer than 64
// bytes is written as "sha256:" and 32 hex digits of its digest, so the
// header stays short. The same message always gets the same Nats-Msg-Id.
// That of a dead letter also names the topic the message was consumed from
// and the group that gave up, so each group leaves one dead letter per
// message and topic:
//
//	shop.orders.dlq:0192f1e4-…@/services/order;from=shop.orders;group=billing
//
// # Consumer groups
//
// A group is a durable pull consumer on the topic's stream, named like a
// stream after the group, with explicit acks. Its position lives in the
// server, so it survives restarts of the consumer and of the server, and the
// members of a group share its messages. The subscription pulls batches,
// calls the handler, and then acks, naks with a delay, or dead-letters each
// message. It counts attempts with the server's delivery count and
// dead-letters a message itself after MaxDeliver attempts, including one
// whose last attempt crashed.
//
// A message's AckWait runs from its delivery to the subscription. From then
// until it is settled, while it waits behind a handler call or is being
// handled, the subscription tells the server every AckWait/3 that it is in
// progress, so a handler slower than AckWait keeps its messages: they are
// not redelivered to other members meanwhile, and their attempts do not
// climb. AckWait is thus the time after which the messages of a member that
// died (or of a subscription given up by Close or by a Stop whose context
// ended) go back to the group, not a limit on the handler: a handler that
// hangs keeps its messages until Close or a Stop whose context ends.
//
// Order: a group with one member receives each subject's messages in publish
// order. Members of one group pull from the same consumer, so with several
// members two messages of one subject can be handled at the same time by
// different members; and a Nak'ed message comes back after its delay, behind
// later messages. Handlers that need strict per-subject order run one member
// per group, or check versions (the inbox and the event store do).
//
// Acks are sent without waiting for the server's reply: an ack that is lost
// with the connection only means the message is delivered again after
// AckWait, which at-least-once delivery allows. Stop and Close flush the
// connection, so the acks of a stopped subscription have reached the server.
//
// A pull request lasts at most a second. Stop makes no new one and lets the
// one in flight end rather than cancel it, so no message the server has
// sent is lost on the way: those that arrive after Stop began are Nak'ed
// with a delay that outlasts the pull, and the group gets them again within
// about a second (their next delivery counts one attempt more). Stop thus
// takes up to a second even when idle, and an idle subscription makes one
// pull request a second. Close, the end of Subscribe's context, and a Stop
// whose context ends cancel the pull instead: messages on their way to it
// come back after AckWait.
//
// # Durability
//
// Publish returns once the server has written the messages to its store. On
// the embedded server a process crash loses nothing acknowledged; an
// operating system crash can lose what was written since the last fsync
// (every two minutes by default) unless [Config].SyncAlways is set. A
// clustered server with [Config].Replicas 3 acknowledges once a majority has
// the message.
package natsjs
