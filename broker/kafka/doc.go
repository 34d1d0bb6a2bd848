// Package kafka is Troupe's Kafka broker: a [broker.Broker] on a Kafka
// cluster, through the franz-go client.
//
// # Publishing
//
// [Broker.Publish] writes each message as one record in CloudEvents binary
// mode ([message.Kafka]): the attributes are "ce_" headers, the data is the
// record value, and the record key is the message's Subject (its ID when it
// has none). Kafka sends equal keys to the same partition, so the messages
// of one subject keep their order. Messages without a Subject, keyed by
// their distinct IDs, are spread over the partitions for throughput and
// have no order relative to each other. The producer is idempotent and
// waits for every in-sync replica (acks=all): Publish returns once the
// batch is durable, and the client's own retries never duplicate a record.
// Nothing is deduplicated (brokertest.Features.DedupByID is false): a
// Publish retried by the caller delivers its messages, same Source and ID,
// again, and consumers absorb the duplicates with an inbox.
//
// Topics are created when first used, with [Config.Partitions] partitions
// and [Config.ReplicationFactor] replicas, unless they exist. A cluster that
// forbids topic creation needs its topics created beforehand, dead-letter
// topics (Topic + ".dlq" by default) included.
//
// # Subscribing
//
// Each subscription is one member of a Kafka consumer group, cfg.Group, and
// gets a share of the topic's partitions. A group that has never committed
// starts at the oldest record. Offsets are committed only after handling:
// per partition, up to the first record that is not yet acked or
// dead-lettered. Kafka keeps no per-record state, so the rest of the
// contract is kept by the subscription:
//
//   - Nak and unsettled deliveries: the partition is rewound to the record
//     and paused for its delay, so the record is delivered again before any
//     later record of its partition; other partitions go on meanwhile. The
//     redelivery comes with the next fetch after the delay, up to half a
//     second later.
//     Records handled in the same batch behind it are remembered: those
//     acked are not delivered again (unless the partition moves to another
//     member first), and none is committed before the record is settled.
//   - Attempt counts deliveries. The count of the record a partition waits
//     on travels in the offset commit's metadata, so it survives a
//     rebalance or a restart; after a crash it restarts from the last
//     commit.
//   - After MaxDeliver attempts, or on DeadLetter, the message is published
//     to the dead-letter topic ([broker.DeadLetterMessage]) and counts as
//     settled. A record that is not a CloudEvent goes there as it is, with
//     "ce_deadletterreason" and the other dead-letter headers added.
//   - A handler that panics is recovered, and the panic logged with its
//     stack at Error level; the deliveries it had not settled count as
//     unsettled, so a message that panics every time is dead-lettered after
//     MaxDeliver attempts instead of taking the process down.
//   - AckWait is not used: Kafka has no acknowledgement timeout. The
//     uncommitted records of a consumer that crashed are redelivered once
//     the group coordinator declares it dead, after [Config.SessionTimeout];
//     a consumer that stops or closes cleanly leaves the group at once.
//
// Rebalances wait while a batch is being handled, so what a member settles
// is committed before its partitions move; a handler must return within the
// group's rebalance timeout (one minute by default) or its member is
// dropped from the group, and its batch is delivered to another member.
//
// # Connecting to a cluster
//
// [Config.Brokers] lists seed brokers; the client discovers the rest.
// TLS and SASL are client options passed in [Config.Options], which apply
// to every connection the broker opens:
//
//	b, err := kafka.New(ctx, kafka.Config{
//		Brokers:           []string{"kafka-1.internal:9093", "kafka-2.internal:9093"},
//		ReplicationFactor: 3,
//		Options: []kgo.Opt{
//			kgo.DialTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12}),
//			kgo.SASL(scram.Auth{User: user, Pass: pass}.AsSha512Mechanism()),
//		},
//	})
//
// [New] checks that a broker answers within [Config.DialTimeout] and fails
// with [ErrUnreachable], naming the addresses, otherwise. Tests run against
// franz-go's in-process cluster, kfake.
package kafka
