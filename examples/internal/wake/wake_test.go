package wake_test

import (
	"testing"

	"github.com/troupedev/troupe/examples/internal/wake"
)

func TestWaiters_WakeSignalsEachCallerOfTheIDOnceAndNoOther(t *testing.T) {
	var w wake.Waiters
	a1, a2, b := w.Add("a"), w.Add("a"), w.Add("b")
	w.Wake("a")
	w.Wake("a") // not received yet: not repeated
	for name, ch := range map[string]chan struct{}{"first caller of a": a1, "second caller of a": a2} {
		select {
		case <-ch:
		default:
			t.Fatalf("%s not woken", name)
		}
		select {
		case <-ch:
			t.Fatalf("%s woken twice", name)
		default:
		}
	}
	select {
	case <-b:
		t.Fatal("the caller of b woken by a's change")
	default:
	}
	w.Remove("a", a1)
	w.Wake("a")
	select {
	case <-a1:
		t.Fatal("a removed caller was woken")
	case <-a2:
	}
	w.Remove("a", a2)
	w.Remove("b", b)
	w.Wake("") // nobody
}
