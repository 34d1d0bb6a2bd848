package order

import (
	"context"
	"sync"
	"time"
)

// Await waits until the order has ended, or ctx ends, and returns it.
func (s *Service) Await(ctx context.Context, id string) (Order, error) {
	woken := s.waiters.add(id)
	defer s.waiters.remove(id, woken)
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

// waiters are the callers of Await, by order id.
type waiters struct {
	mu sync.Mutex
	m  map[string][]chan struct{}
}

func (w *waiters) add(id string) chan struct{} {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	w.m[id] = append(w.m[id], ch)
	w.mu.Unlock()
	return ch
}

func (w *waiters) remove(id string, ch chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	list := w.m[id]
	for i, c := range list {
		if c == ch {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(w.m, id)
	} else {
		w.m[id] = list
	}
}

func (w *waiters) wake(id string) {
	if id == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, ch := range w.m[id] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
