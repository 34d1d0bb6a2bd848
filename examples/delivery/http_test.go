package delivery_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/troupedev/troupe/examples/delivery/dispatch"
	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/saga"
)

// Bad input is answered 400 with a message that names the field at fault,
// and no order is created.
func TestDeliveryHTTP_BadOrdersAre400WithTheFieldNamed(t *testing.T) {
	h := newHarness(t, "sqlite", setup{packets: 1, agents: 1})
	srv := httptest.NewServer(h.s.Handler())
	defer srv.Close()
	for _, tc := range []struct {
		name, body, field, says string
	}{
		{"unknown food", `{"food_id": "sushi", "quantity": 1}`, "food_id", `no food "sushi" on the menu`},
		{"zero quantity", `{"food_id": "pizza", "quantity": 0}`, "quantity", "must be between 1 and 3"},
		{"no quantity", `{"food_id": "pizza"}`, "quantity", "must be between 1 and 3"},
		{"too many", `{"food_id": "pizza", "quantity": 4}`, "quantity", "must be between 1 and 3"},
		{"no food", `{"quantity": 1}`, "food_id", "required"},
		{"quantity as text", `{"food_id": "pizza", "quantity": "two"}`, "quantity", "want int"},
		{"unknown field", `{"food_id": "pizza", "quantity": 1, "tip": 5}`, "tip", "unknown field"},
		{"malformed JSON", `{"food_id": "pizza",`, "", "malformed JSON"},
		{"empty body", ``, "", "empty body"},
		{"trailing data", `{"food_id": "pizza", "quantity": 1} {}`, "", "unexpected data"},
	} {
		resp, err := http.Post(srv.URL+"/orders", "application/json", strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		var body struct{ Error, Field string }
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusBadRequest || body.Field != tc.field || !strings.Contains(body.Error, tc.says) {
			t.Errorf("%s: %d %+v (%v), want 400 naming field %q and saying %q", tc.name, resp.StatusCode, body, err, tc.field, tc.says)
		}
	}
	if tot, err := h.s.Count(h.ctx); err != nil || tot.Placed+tot.Pending+len(tot.NotPlaced) != 0 {
		t.Fatalf("orders after bad requests: %+v, %v; want none", tot, err)
	}
}

// agentCall POSTs one side of the agent's reservation to the Delivery
// service, as the saga does, and returns the status and body.
func (h *harness) agentCall(path, sagaID string, op saga.Op) (int, string) {
	h.t.Helper()
	body := `{"reservation": "order.agent", "expiry_ms": 60000, "input": {"pool": "agents", "owner": "` + sagaID + `"}}`
	req, err := http.NewRequest(http.MethodPost, h.s.DeliveryURL()+path, strings.NewReader(body))
	if err != nil {
		h.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(saga.HeaderSagaID, sagaID)
	req.Header.Set(saga.HeaderStep, "order.try.agent")
	if path == dispatch.ConfirmPath {
		req.Header.Set(saga.HeaderStep, "order.confirm.agent")
	}
	req.Header.Set(saga.HeaderOp, op.String())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// Over HTTP, a repeated Try, Confirm or Cancel gets the first answer and
// has no second effect; a Cancel that arrives before its Try succeeds
// with nothing to release, and the late Try is refused, so the agent is
// never held by an order that gave up.
func TestDeliveryHTTP_RepeatedAndEarlyCallsHaveOneEffect(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			h := newHarness(t, kind, setup{agents: 2})
			if code, _ := h.agentCall(dispatch.TryPath, "early", saga.Compensation); code != http.StatusOK {
				t.Fatalf("Cancel before its Try: %d, want 200", code)
			}
			if code, body := h.agentCall(dispatch.TryPath, "early", saga.Action); code != http.StatusConflict {
				t.Fatalf("the late Try: %d %q, want 409 (refused)", code, body)
			}
			var first string
			for i := range 2 {
				code, body := h.agentCall(dispatch.TryPath, "twice", saga.Action)
				if code != http.StatusOK || (i == 1 && body != first) {
					t.Fatalf("Try %d: %d %q, want 200 with the first answer %q", i+1, code, body, first)
				}
				first = body
			}
			for i := range 2 {
				if code, body := h.agentCall(dispatch.ConfirmPath, "twice", saga.Action); code != http.StatusOK {
					t.Fatalf("Confirm %d: %d %q, want 200", i+1, code, body)
				}
			}
			agents, err := h.s.Delivery().Agents(h.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if agents[0].State != reserve.ResourceAssigned || agents[0].Order != "twice" || agents[1].State != reserve.ResourceFree {
				t.Fatalf("agents %+v: want one assigned to \"twice\", the other free", agents)
			}
			for i := range 2 {
				if code, _ := h.agentCall(dispatch.ConfirmPath, "twice", saga.Compensation); code != http.StatusOK {
					t.Fatalf("Cancel %d of the Confirm: %d, want 200", i+1, code)
				}
			}
			if agents, _ := h.s.Delivery().Agents(h.ctx); agents[0].State != reserve.ResourceFree || agents[1].State != reserve.ResourceFree {
				t.Fatalf("agents %+v after the Cancels: want both free", agents)
			}
		})
	}
}
