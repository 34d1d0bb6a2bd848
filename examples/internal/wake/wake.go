// Package wake wakes the callers waiting for an entity (an order to end,
// say) when a transaction that changed it has committed, so that they read
// it at once instead of polling.
package wake

import "sync"

// Waiters are the callers waiting, by entity id. The zero value is ready
// to use; it is safe for concurrent use.
type Waiters struct {
	mu sync.Mutex
	m  map[string][]chan struct{}
}

// Add registers a caller waiting for id and returns the channel Wake
// signals. Register before reading the entity, then wait for the signal,
// so that no change between the read and the wait is missed. Remove it
// when done.
func (w *Waiters) Add(id string) chan struct{} {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string][]chan struct{}{}
	}
	w.m[id] = append(w.m[id], ch)
	return ch
}

// Remove unregisters the caller Add returned ch to.
func (w *Waiters) Remove(id string, ch chan struct{}) {
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

// Wake signals every caller waiting for id; a signal not yet received is
// not repeated. An empty id wakes nobody.
func (w *Waiters) Wake(id string) {
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
