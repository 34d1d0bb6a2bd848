// Package retry holds the retry policies Troupe's packages share: how long to
// wait before trying again after a failure.
package retry

import (
	"math/rand/v2"
	"time"
)

// Exponential is an exponential delay with jitter, the default retry policy
// of Troupe's inbox and timers.
// The delay before retrying after attempt n is Min·2^(n-1), capped at
// Max, of which the fraction Jitter is random: with Jitter 0.5 the delay
// lies between half and all of the exponential value. The zero value gives
// the defaults.
type Exponential struct {
	// Min is the delay after the first attempt. Default 1 s.
	Min time.Duration
	// Max caps the delay. Default 5 min.
	Max time.Duration
	// Jitter is the random fraction of each delay, from 0 (none) to 1 (the
	// delay lies anywhere between 0 and its exponential value). Default 0.5;
	// set a negative value for no jitter.
	Jitter float64
	// Rand returns a random number in [0, 1). Default math/rand/v2's
	// Float64.
	Rand func() float64
}

// Delay returns the delay before the attempt that follows attempt
// (1 for the first try).
func (b Exponential) Delay(attempt int) time.Duration {
	lo, hi, jitter := b.Min, b.Max, b.Jitter
	if lo <= 0 {
		lo = time.Second
	}
	if hi <= 0 {
		hi = 5 * time.Minute
	}
	if hi < lo {
		hi = lo
	}
	switch {
	case jitter == 0:
		jitter = 0.5
	case jitter < 0:
		jitter = 0
	case jitter > 1:
		jitter = 1
	}
	if attempt < 1 {
		attempt = 1
	}
	d := lo
	for i := 1; i < attempt && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	if jitter == 0 {
		return d
	}
	rnd := b.Rand
	if rnd == nil {
		rnd = rand.Float64
	}
	fixed := time.Duration(float64(d) * (1 - jitter))
	return fixed + time.Duration(float64(d-fixed)*rnd())
}
