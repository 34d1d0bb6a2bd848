package message_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/troupedev/troupe/message"
)

func ExampleNewJSON() {
	type OrderCreated struct {
		OrderID string `json:"orderId"`
		Total   int    `json:"total"`
	}
	m, err := message.NewJSON("/services/order", "shop.order.created", OrderCreated{OrderID: "42", Total: 1250})
	if err != nil {
		panic(err)
	}
	m.Subject = "42" // orders for the same subject keep their order on the broker
	fmt.Println(m.Type, m.DataContentType, string(m.Data))
	fmt.Println("valid:", m.Validate() == nil)
	// Output:
	// shop.order.created application/json {"orderId":"42","total":1250}
	// valid: true
}

func ExampleMessage_CausedBy() {
	order := &message.Message{ID: "order-created-1", Source: "/services/order", Type: "shop.order.created"}
	reserve := message.New("/services/order", "shop.credit.reserve", nil).CausedBy(order)
	reply := message.New("/services/customer", "shop.credit.reserved", nil).CausedBy(reserve)
	fmt.Println(reserve.CorrelationID, reserve.CausationID == order.ID)
	fmt.Println(reply.CorrelationID, reply.CausationID == reserve.ID)
	// Output:
	// order-created-1 true
	// order-created-1 true
}

func ExampleEncodeJSON() {
	m := &message.Message{
		ID:              "0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b",
		Source:          "/services/order",
		Type:            "shop.order.created",
		Subject:         "42",
		Time:            time.Date(2025, 7, 1, 12, 0, 0, 0, time.UTC),
		DataContentType: "application/json",
		Data:            []byte(`{"orderId":"42","total":1250}`),
		CorrelationID:   "0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b",
	}
	b, err := message.EncodeJSON(m)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(b))
	// Output:
	// {"specversion":"1.0","id":"0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b","source":"/services/order","type":"shop.order.created","subject":"42","time":"2025-07-01T12:00:00Z","datacontenttype":"application/json","correlationid":"0197c6a1-7b3e-7c4d-9a2b-3c4d5e6f7a8b","data":{"orderId":"42","total":1250}}
}

func ExampleDecodeJSON() {
	in := []byte(`{
		"specversion": "1.0",
		"id": "A234-1234-1234",
		"source": "/mycontext",
		"type": "com.example.someevent",
		"time": "2018-04-05T17:31:00Z",
		"comexampleothervalue": 5,
		"datacontenttype": "text/xml",
		"data": "<much wow=\"xml\"/>"
	}`)
	m, err := message.DecodeJSON(in)
	if err != nil {
		panic(err)
	}
	fmt.Println(m.ID, m.Time.Format(time.RFC3339), m.Extensions["comexampleothervalue"])
	fmt.Println(string(m.Data))
	// Output:
	// A234-1234-1234 2018-04-05T17:31:00Z 5
	// <much wow="xml"/>
}

func ExampleDecodeError() {
	_, err := message.DecodeJSON([]byte(`{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}`))
	var de *message.DecodeError
	if errors.As(err, &de) {
		fmt.Println("field:", de.Field)
	}
	fmt.Println("malformed:", errors.Is(err, message.ErrMalformed))
	fmt.Println("too large:", errors.Is(err, message.ErrTooLarge))
	// Output:
	// field: time
	// malformed: true
	// too large: false
}

func ExampleBinding_Encode() {
	m := &message.Message{
		ID:              "1234",
		Source:          "/services/order",
		Type:            "shop.order.created",
		Subject:         "order 42",
		DataContentType: "application/json",
		Data:            []byte(`{"total":1250}`),
		Extensions:      map[string]string{"tenant": "acme"},
	}
	for _, b := range []message.Binding{message.NATS, message.Kafka} {
		headers, body, err := b.Encode(m)
		if err != nil {
			panic(err)
		}
		fmt.Println(b)
		for _, h := range headers {
			fmt.Printf("  %s: %s\n", h.Key, h.Value)
		}
		fmt.Printf("  body: %s\n", body)
	}
	// Output:
	// nats
	//   ce-specversion: 1.0
	//   ce-id: 1234
	//   ce-source: /services/order
	//   ce-type: shop.order.created
	//   ce-subject: order%2042
	//   ce-datacontenttype: application/json
	//   ce-tenant: acme
	//   body: {"total":1250}
	// kafka
	//   ce_specversion: 1.0
	//   ce_id: 1234
	//   ce_source: /services/order
	//   ce_type: shop.order.created
	//   ce_subject: order 42
	//   content-type: application/json
	//   ce_tenant: acme
	//   body: {"total":1250}
}

func ExampleBinding_Decode() {
	headers := []message.Header{
		{Key: "ce_specversion", Value: "1.0"},
		{Key: "ce_id", Value: "1234"},
		{Key: "ce_source", Value: "/services/order"},
		{Key: "ce_type", Value: "shop.order.created"},
		{Key: "content-type", Value: "application/json"},
		{Key: "ce_correlationid", Value: "saga-7"},
		{Key: "x-unrelated", Value: "ignored"},
	}
	m, err := message.Kafka.Decode(headers, []byte(`{"total":1250}`))
	if err != nil {
		panic(err)
	}
	fmt.Println(m.ID, m.Type, m.CorrelationID, string(m.Data))
	// Output:
	// 1234 shop.order.created saga-7 {"total":1250}
}
