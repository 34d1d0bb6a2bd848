package saga_test

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
)

// Order is the data of the delivery saga in the examples.
type Order struct {
	ID, Dish string
	Packet   string // the packet reserved for the order
}

// An order reserves a packet of its dish at the kitchen, over the broker,
// and a delivery agent, over HTTP; it is placed only when both are
// assigned to it. The kitchen's Try may take 10 s × 3 sends, the agents'
// 20 s of calls: the Confirms get what the 2-minute expiry leaves after
// the slowest Try (30 s) and the margin (12 s), 78 s: the kitchen's 7
// sends of 10 s, the agents' 78 s of calls.
func ExampleReservations_Steps() {
	steps, err := saga.Reservations[Order]{
		Name:   "delivery",
		Expiry: 2 * time.Minute,
		Resources: []saga.Reserve[Order]{
			{
				Name: "packet", Topic: "kitchen.commands",
				TryCommand: "delivery.packet.try", ConfirmCommand: "delivery.packet.confirm",
				Input:      func(o *Order) any { return reserve.SagaRequest{Pool: "dish:" + o.Dish, Owner: o.ID} },
				OnReserved: func(o *Order, r *saga.ReplyMsg) error { return nil }, // e.g. decode a reserve.SagaReply into o.Packet
				Deadline:   10 * time.Second, MaxAttempts: 3,
			},
			{
				Name:   "agent",
				TryURL: "http://agents.internal/reservations/try", ConfirmURL: "http://agents.internal/reservations/confirm",
				Input:    func(o *Order) any { return reserve.SagaRequest{Pool: "agents", Owner: o.ID} },
				Deadline: 20 * time.Second, MaxAttempts: 3,
			},
		},
	}.Steps()
	if err != nil {
		fmt.Println(err)
		return
	}
	// The saga's definition; its OnCompleted tells the customer "Order
	// placed", its OnCompensated "not placed".
	def := &saga.Definition[Order]{Name: "delivery", Steps: steps}
	for _, s := range def.Steps {
		fmt.Println(s.Name)
		for _, b := range s.Parallel {
			where := b.URL
			if b.Topic != "" {
				where = b.Command + " on " + b.Topic
			}
			fmt.Printf("  %s: %s, deadline %v, %d attempts\n", b.Name, where, b.Deadline, b.MaxAttempts)
		}
	}
	// Output:
	// delivery.try
	//   delivery.try.packet: delivery.packet.try on kitchen.commands, deadline 10s, 3 attempts
	//   delivery.try.agent: http://agents.internal/reservations/try, deadline 20s, 3 attempts
	// delivery.confirm
	//   delivery.confirm.packet: delivery.packet.confirm on kitchen.commands, deadline 10s, 7 attempts
	//   delivery.confirm.agent: http://agents.internal/reservations/confirm, deadline 1m18s, 9 attempts
}

// An expiry too short for the deadlines is refused when the saga is
// defined, with the numbers that conflict.
func ExampleReservations_Steps_expiryTooShort() {
	_, err := saga.Reservations[Order]{
		Name:   "delivery",
		Expiry: time.Minute,
		Resources: []saga.Reserve[Order]{
			{Name: "packet", Topic: "kitchen.commands", TryCommand: "delivery.packet.try", ConfirmCommand: "delivery.packet.confirm",
				Deadline: 10 * time.Second, MaxAttempts: 3},
			{Name: "agent", TryURL: "http://agents.internal/try", ConfirmURL: "http://agents.internal/confirm",
				Deadline: 20 * time.Second},
		},
	}.Steps()
	fmt.Println(errors.Is(err, saga.ErrInvalidDefinition))
	fmt.Println(strings.ReplaceAll(err.Error(), ": resource", ":\nresource"))
	// Output:
	// true
	// saga: invalid definition: reservations "delivery":
	// resource "packet": Expiry 1m0s < 30s (phase 1: the Try of "packet", Deadline 10s × MaxAttempts 3) + 30s (the Confirm of "packet", Deadline 10s × MaxAttempts 3) + 6s (Margin) = 1m6s
}
