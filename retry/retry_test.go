package retry_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/troupedev/troupe/retry"
)

func TestExponential_DoublesUpToTheCapWithBoundedJitter(t *testing.T) {
	lo := retry.Exponential{Min: time.Second, Max: 10 * time.Second, Jitter: 0.5, Rand: func() float64 { return 0 }}
	hi := lo
	hi.Rand = func() float64 { return 0.999999 }
	none := lo
	none.Jitter = -1
	tests := []struct {
		attempt       int
		wantExp       time.Duration // without jitter
		wantLo, wantH time.Duration
	}{
		{1, time.Second, 500 * time.Millisecond, time.Second},
		{2, 2 * time.Second, time.Second, 2 * time.Second},
		{3, 4 * time.Second, 2 * time.Second, 4 * time.Second},
		{4, 8 * time.Second, 4 * time.Second, 8 * time.Second},
		{5, 10 * time.Second, 5 * time.Second, 10 * time.Second},
		{500, 10 * time.Second, 5 * time.Second, 10 * time.Second},
		{0, time.Second, 500 * time.Millisecond, time.Second},
	}
	for _, tt := range tests {
		if got := none.Delay(tt.attempt); got != tt.wantExp {
			t.Errorf("attempt %d without jitter: %v, want %v", tt.attempt, got, tt.wantExp)
		}
		if got := lo.Delay(tt.attempt); got != tt.wantLo {
			t.Errorf("attempt %d, lowest jitter: %v, want %v", tt.attempt, got, tt.wantLo)
		}
		if got := hi.Delay(tt.attempt); got > tt.wantH || got < tt.wantH-time.Millisecond {
			t.Errorf("attempt %d, highest jitter: %v, want just under %v", tt.attempt, got, tt.wantH)
		}
	}
	// The defaults: 1 s doubling to 5 min, half random.
	def := retry.Exponential{}
	for range 100 {
		if d := def.Delay(1); d < 500*time.Millisecond || d > time.Second {
			t.Fatalf("default delay after attempt 1: %v, want within [0.5s, 1s]", d)
		}
		if d := def.Delay(30); d < 150*time.Second || d > 5*time.Minute {
			t.Fatalf("default delay after attempt 30: %v, want within [2.5min, 5min]", d)
		}
	}
}

func ExampleExponential() {
	policy := retry.Exponential{Min: 100 * time.Millisecond, Max: time.Second, Jitter: -1}
	for attempt := 1; attempt <= 5; attempt++ {
		fmt.Println(attempt, policy.Delay(attempt))
	}
	// Output:
	// 1 100ms
	// 2 200ms
	// 3 400ms
	// 4 800ms
	// 5 1s
}
