// Package clocktest provides a clock that moves only when a test tells it
// to, for the packages whose timers, deadlines, leases and retries read an
// injected clock (Now and After). Tests move time instead of sleeping.
package clocktest

import (
	"sync"
	"time"
)

// Clock is a fake clock. Now stays put until Advance or Set moves it; a
// channel from After receives once the clock has been moved to or past its
// time. It is safe for concurrent use.
type Clock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
	asked   chan struct{} // closed and replaced whenever After is called
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

// New returns a clock that reads start.
func New(start time.Time) *Clock {
	return &Clock{now: start, asked: make(chan struct{})}
}

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// After returns a channel that receives the clock's time once the clock has
// moved d forward (at once when d <= 0).
func (c *Clock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, waiter{at: c.now.Add(d), ch: ch})
	close(c.asked)
	c.asked = make(chan struct{})
	return ch
}

// Advance moves the clock d forward and fires every After whose time has come.
func (c *Clock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// Set moves the clock to t (never backwards: an earlier t is ignored) and
// fires every After whose time has come.
func (c *Clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.Before(c.now) {
		return
	}
	c.now = t
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
			continue
		}
		w.ch <- c.now
	}
	c.waiters = kept
}

// Waiters returns how many After channels have not fired yet.
func (c *Clock) Waiters() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.waiters)
}

// Asked returns a channel that is closed at the next call of After, so a
// test can wait until the code under test is waiting on the clock.
func (c *Clock) Asked() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.asked
}
