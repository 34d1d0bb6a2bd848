package order

import (
	"context"
	"time"
)

// Await waits until the order has ended, or ctx ends, and returns it.
func (s *Service) Await(ctx context.Context, id string) (Order, error) {
	woken := s.waiters.Add(id)
	defer s.waiters.Remove(id, woken)
	// An end that this process did not signal (another instance handled
	// the last reply) is seen by asking again now and then.
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		o, err := s.Get(ctx, id)
		if err != nil || o.State.Ended() {
			return o, err
		}
		select {
		case <-woken:
		case <-tick.C:
		case <-ctx.Done():
			return o, ctx.Err()
		}
	}
}
