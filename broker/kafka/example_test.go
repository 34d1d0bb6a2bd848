package kafka_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/broker/kafka"
	"github.com/troupedev/troupe/message"
)

// Publish an event and consume it as a consumer group, on an in-process
// cluster.
func Example() {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	ctx := context.Background()
	b, err := kafka.New(ctx, kafka.Config{Brokers: cluster.ListenAddrs()})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	got := make(chan *message.Message, 10)
	sub, err := b.Subscribe(ctx, broker.SubscribeConfig{Topic: "orders", Group: "billing"},
		func(ctx context.Context, batch []*broker.Delivery) {
			for _, d := range batch {
				got <- d.Msg
				d.Ack()
			}
		})
	if err != nil {
		log.Fatal(err)
	}

	m := message.New("/services/order", "shop.order.created", []byte(`{"order":"42"}`))
	m.Subject = "order-42"
	if err := b.Publish(ctx, "orders", m); err != nil {
		log.Fatal(err)
	}
	r := <-got
	fmt.Println(r.Type, r.Subject, string(r.Data))
	if err := sub.Stop(ctx); err != nil {
		log.Fatal(err)
	}
	// Output: shop.order.created order-42 {"order":"42"}
}

// Connect to a cluster over TLS with SASL/SCRAM.
func ExampleNew() {
	ctx := context.Background()
	b, err := kafka.New(ctx, kafka.Config{
		Brokers:           []string{"kafka-1.internal:9093", "kafka-2.internal:9093"},
		ClientID:          "order-service",
		ReplicationFactor: 3,
		Options: []kgo.Opt{
			kgo.DialTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12}),
			kgo.SASL(scram.Auth{User: "order-service", Pass: "secret"}.AsSha512Mechanism()),
		},
	})
	if err != nil {
		log.Fatal(err) // wraps kafka.ErrUnreachable when no broker answers
	}
	defer b.Close()
}
