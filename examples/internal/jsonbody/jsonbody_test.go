package jsonbody_test

import (
	"strings"
	"testing"

	"github.com/troupedev/troupe/examples/internal/jsonbody"
)

type order struct {
	FoodID string `json:"food_id"`
	Items  []struct {
		Quantity int `json:"quantity"`
	} `json:"items"`
}

func TestDecode_RefusesEveryMalformedBodyNamingWhatIsWrong(t *testing.T) {
	for _, tc := range []struct {
		name, body, field, problem string
	}{
		{"stray brace after the object", `{"food_id": "pizza"}}`, "", "unexpected data"},
		{"stray bracket after the object", `{"food_id": "pizza"}]`, "", "unexpected data"},
		{"a second object", `{"food_id": "pizza"} {}`, "", "unexpected data"},
		{"empty", ``, "", "empty body"},
		{"truncated", `{"food_id": "pi`, "", "ends inside a value"},
		{"not JSON", `food=pizza`, "", "malformed JSON at byte"},
		{"wrong type, nested", `{"items": [{"quantity": 1}, {"quantity": "two"}]}`, "items.quantity", "want int, got string"},
		{"unknown field", `{"food_id": "pizza", "extra": 1}`, "extra", "unknown field"},
		{"over the limit", `{"food_id": "` + strings.Repeat("x", 100) + `"}`, "", "body over 64 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var o order
			err := jsonbody.Decode(strings.NewReader(tc.body), 64, &o)
			if err == nil || err.Field != tc.field || !strings.Contains(err.Problem, tc.problem) {
				t.Fatalf("Decode(%q) = %+v, want field %q and a problem containing %q", tc.body, err, tc.field, tc.problem)
			}
		})
	}
	var o order
	if err := jsonbody.Decode(strings.NewReader(" {\"food_id\": \"pizza\"}\n"), 64, &o); err != nil || o.FoodID != "pizza" {
		t.Fatalf("a well-formed body with white space around it: %+v, %v", o, err)
	}
}
