// Package background runs a service's long-running loops (outbox relays,
// timer schedulers) and stops them with their subscriptions: the few lines
// every service of the examples needs.
package background

import (
	"context"
	"errors"
	"sync"
)

// Group is loops running in the background.
type Group struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	errs   []error
}

// Start runs each loop in a goroutine of its own, with a context that ends
// on Stop (not with ctx, whose values it keeps: a request's context may
// start a service that outlives it).
func Start(ctx context.Context, loops ...func(context.Context) error) *Group {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	g := &Group{cancel: cancel}
	for _, loop := range loops {
		g.wg.Go(func() {
			if err := loop(ctx); err != nil && !errors.Is(err, context.Canceled) {
				g.mu.Lock()
				g.errs = append(g.errs, err)
				g.mu.Unlock()
			}
		})
	}
	return g
}

// Stop ends the loops, waits for them, and returns the errors they
// stopped with other than their context's end. A nil Group has nothing to
// stop.
func (g *Group) Stop() error {
	if g == nil {
		return nil
	}
	g.cancel()
	g.wg.Wait()
	g.mu.Lock()
	defer g.mu.Unlock()
	return errors.Join(g.errs...)
}

// StopAll stops subscriptions (or anything with a Stop(ctx) method) at
// once, since each may wait for its broker's open pull to end, and
// returns their errors.
func StopAll[S interface{ Stop(context.Context) error }](ctx context.Context, subs ...S) error {
	errs := make([]error, len(subs))
	var wg sync.WaitGroup
	for i, s := range subs {
		wg.Go(func() { errs[i] = s.Stop(ctx) })
	}
	wg.Wait()
	return errors.Join(errs...)
}
