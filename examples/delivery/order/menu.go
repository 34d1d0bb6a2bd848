package order

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/troupedev/troupe/examples/delivery/store"
)

// HTTPMenu returns the Store's menu read over the Store's HTTP API, for
// an Order service that does not run in the Store's process: OnMenu asks
// GET {storeURL}/foods/{id} (store.Service.Handler), the id path-escaped,
// and reads the food from a 200 as on the menu, the Store's 404 as not.
// Anything else is an error saying what happened, so Place refuses the
// order with ErrMenuUnavailable: no answer (the Store down, the call
// timed out), another status (a 503 while the Store restarts, a 500), or
// an answer that is not the Store's (a 200 without the food, a 404 without
// the Store's error, as from a wrong storeURL). A nil client is one whose
// calls time out after 5 seconds.
func HTTPMenu(storeURL string, client *http.Client) Menu {
	if client == nil {
		client = &http.Client{Timeout: 5 * time.Second}
	}
	return httpMenu{base: strings.TrimSuffix(storeURL, "/"), client: client}
}

// httpMenu is the Menu HTTPMenu returns.
type httpMenu struct {
	base   string
	client *http.Client
}

// maxMenuAnswer bounds what OnMenu reads of an answer: a food is a few
// hundred bytes.
const maxMenuAnswer = 64 << 10

func (m httpMenu) OnMenu(ctx context.Context, foodID string) (bool, error) {
	u := m.base + "/foods/" + url.PathEscape(foodID)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return false, fmt.Errorf("ask the Store for food %q: %w", foodID, err)
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return false, fmt.Errorf("ask the Store for food %q: %w", foodID, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxMenuAnswer))
	if err != nil {
		return false, fmt.Errorf("GET %s: read the answer (%s): %w", u, resp.Status, err)
	}
	switch resp.StatusCode {
	case http.StatusOK:
		var f store.Food
		if err := json.Unmarshal(body, &f); err != nil || f.ID != foodID {
			return false, fmt.Errorf("GET %s answered %s without food %q: %s", u, resp.Status, foodID, excerpt(body))
		}
		return true, nil
	case http.StatusNotFound:
		var e struct {
			Error string `json:"error"`
		}
		if err := json.Unmarshal(body, &e); err != nil || e.Error == "" {
			return false, fmt.Errorf("GET %s answered %s without the Store's error (is %s the Store?): %s", u, resp.Status, m.base, excerpt(body))
		}
		return false, nil
	default:
		return false, fmt.Errorf("GET %s answered %s: %s", u, resp.Status, excerpt(body))
	}
}

// excerpt quotes the start of an answer's body for an error.
func excerpt(body []byte) string {
	const limit = 200
	s := strings.TrimSpace(string(body))
	if len(s) > limit {
		s = s[:limit] + "…"
	}
	return fmt.Sprintf("%q", s)
}
