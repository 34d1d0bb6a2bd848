// Package broker defines how Troupe talks to a message broker: a [Publisher]
// that returns once the broker has durably accepted a batch, and a
// [Subscriber] that delivers a topic's messages to a durable consumer group,
// at least once, in batches, to a [Handler] that settles each [Delivery] with
// Ack, Nak or DeadLetter.
//
// The contract is the same for every broker, so services and the outbox
// relay do not care which one runs: a group's position survives restarts,
// messages of one (topic, subject) keep their publish order (messages with no
// subject have no order among themselves), an unsettled or
// Nak'ed message comes back, and a message that fails MaxDeliver times, or
// that its handler declares poison, goes to the dead-letter topic with the
// reason in the [ExtDeadLetterReason] extension ([DeadLetterMessage] builds
// it the same way for every broker).
//
// The implementations live in sub-packages: broker/natsjs (NATS JetStream,
// embedded in the process by default) and broker/kafka. Each passes the
// conformance suite in broker/brokertest, whose Features say what a broker
// promises beyond the contract, such as dropping a message re-published with
// the same (source, id).
//
// Delivery is at least once on every broker, so a consumer whose effect must
// happen once records the message ids it handled in the same transaction as
// the effect (Troupe's inbox does this).
package broker
