// Package brokertest is the conformance suite every Troupe broker passes.
//
// A broker package runs it from its own tests:
//
//	func TestBroker(t *testing.T) {
//		brokertest.Run(t, func(t *testing.T) broker.Broker {
//			// Return a new client connected to the backend of this t.
//		}, brokertest.Features{DedupByID: true})
//	}
//
// The suite checks the contract written on [broker.Publisher],
// [broker.Subscriber], [broker.Subscription] and [broker.Handler]:
// delivery at least once, per-subject order, durable consumer groups that
// resume where they left off, redelivery after a Nak, after an unsettled
// return, after a handler panic and after a crashed consumer,
// dead-lettering with a reason and after MaxDeliver attempts, and
// clean shutdown, by Stop or by the end of the context passed to Subscribe
// (the handler's context is canceled, the handler is not called again, and
// the message it left unsettled reaches the group's next subscription).
// [Features] lists what a broker promises beyond that contract, such as
// dropping a re-published message, same Source and ID.
//
// Beyond the written contract, the suite holds brokers to these choices, which
// Troupe's outbox and sagas rely on:
//
//   - a new consumer group starts at the oldest retained message, so a service
//     deployed after its producers still sees what they published;
//   - Close cancels the context of running handler calls and waits for them,
//     so a stuck handler cannot hang shutdown;
//   - Stop returns ctx's error when ctx ends before the handler calls in
//     flight have returned;
//   - Publish and Subscribe on a closed broker return [broker.ErrClosed];
//   - topic and group names made of letters, digits, '-' and '.' are valid.
//
// Every subtest runs in parallel with unique topic and group names, and
// waits on channels with a generous timeout instead of sleeping. Run the
// suite under -race with goleak's VerifyTestMain in the broker's TestMain,
// so that a goroutine left behind by Stop or Close fails the package.
package brokertest
