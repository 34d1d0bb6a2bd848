package flow

import (
	"slices"
	"testing"
)

func TestCausalOrder_EffectsFollowTheirCausesAndNothingIsLost(t *testing.T) {
	ev := func(id, cause string) Event { return Event{MessageID: id, CausationID: cause} }
	for _, tc := range []struct {
		name   string
		events []Event // in time order
		want   []string
	}{
		{"time order when causes agree", []Event{ev("a", ""), ev("b", "a"), ev("c", "b")}, []string{"a", "b", "c"}},
		{"an effect timed before its cause", []Event{ev("c", "b"), ev("a", ""), ev("b", "a")}, []string{"a", "b", "c"}},
		{"branches keep time order", []Event{ev("a", ""), ev("c", "a"), ev("b", "a"), ev("d", "b")}, []string{"a", "c", "b", "d"}},
		{"a cause outside the flow", []Event{ev("b", "elsewhere"), ev("a", "")}, []string{"b", "a"}},
		{"a cycle, which no service can make", []Event{ev("x", "y"), ev("y", "x"), ev("a", "")}, []string{"a", "x", "y"}},
		{"its own cause", []Event{ev("a", "a"), ev("b", "a")}, []string{"a", "b"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, e := range causalOrder(tc.events) {
				got = append(got, e.MessageID)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("causal order %q, want %q", got, tc.want)
			}
		})
	}
}
