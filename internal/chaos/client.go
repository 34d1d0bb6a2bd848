package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"
)

// The workload's shape.
const (
	shopCustomers  = 300
	deliveryAgents = 20
	overLimitEvery = 8  // 1 shop order in 8 is over its customer's limit
	cancelEvery    = 10 // 1 shop order in 10 is cancelled right after it is taken
	replayEvery    = 20 // 1 order in 20 is sent again after its 201, with its key
	awaitOrder     = 20 * time.Second
)

// ClientStats counts a workload's requests.
type ClientStats struct {
	// Taken counts orders the Order services answered 201 to.
	Taken int
	// Ended counts taken orders the client saw end; the others ended
	// after it stopped waiting (awaitOrder) or after the workload.
	Ended int
	// Failed counts requests that failed because a process was down or
	// restarting (refused connections, 5xx, timeouts); a failed order is
	// sent again with the same Idempotency-Key.
	Failed int
	// Replayed counts orders sent again after their 201 with the same
	// Idempotency-Key, which must answer with the same order.
	Replayed int
}

func (s ClientStats) add(o ClientStats) ClientStats {
	return ClientStats{s.Taken + o.Taken, s.Ended + o.Ended, s.Failed + o.Failed, s.Replayed + o.Replayed}
}

// client places orders with one example's Order service over HTTP, one
// at a time, and waits for each to end.
type client struct {
	name    string // prefixes its Idempotency-Keys
	example string
	base    string // the Order service's URL
	rng     *rand.Rand
	http    *http.Client

	mu    sync.Mutex
	st    ClientStats
	acked []string // ids of the orders answered 201
	twice []string // keys answered with two different orders
}

func newClient(name, example string, urls map[string]string, rng *rand.Rand) *client {
	base := urls[RoleShopOrder]
	if example == Delivery {
		base = urls[RoleDeliveryOrder]
	}
	return &client{name: name, example: example, base: base, rng: rng, http: &http.Client{Timeout: 10 * time.Second}}
}

func (c *client) stats() ClientStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

// taken returns the ids of the orders the service answered 201 to.
func (c *client) taken() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.acked...)
}

func (c *client) count(f func(*ClientStats)) {
	c.mu.Lock()
	f(&c.st)
	c.mu.Unlock()
}

// run places orders until ctx ends.
func (c *client) run(ctx context.Context) {
	for n := 0; ctx.Err() == nil; n++ {
		key := fmt.Sprintf("%s-%d", c.name, n)
		body, cancelIt := c.order()
		id, err := c.place(ctx, key, body)
		if err != nil {
			return // the workload is over
		}
		c.mu.Lock()
		c.st.Taken++
		c.acked = append(c.acked, id)
		c.mu.Unlock()
		if c.rng.IntN(replayEvery) == 0 {
			// The same request again, as a client that lost the answer
			// would send it: the same order, not a second one.
			if again, err := c.place(ctx, key, body); err == nil && again != id {
				c.mu.Lock()
				c.twice = append(c.twice, fmt.Sprintf("Idempotency-Key %s answered with order %s, then %s", key, id, again))
				c.mu.Unlock()
			}
			c.count(func(s *ClientStats) { s.Replayed++ })
		}
		if cancelIt {
			// Best effort: refused (409) once the order has ended.
			c.post(ctx, c.base+"/orders/"+id+"/cancel", nil, "")
		}
		if c.await(ctx, id) {
			c.count(func(s *ClientStats) { s.Ended++ })
		}
	}
}

// order makes up the next order's body from the client's seeded
// generator, and whether to cancel it once taken.
func (c *client) order() (body []byte, cancelIt bool) {
	var o any
	switch c.example {
	case Shop:
		i := c.rng.IntN(shopCustomers)
		item := map[string]any{"sku": "tea", "quantity": 1 + c.rng.IntN(3), "unit_price": 100 + c.rng.IntN(900)}
		if c.rng.IntN(overLimitEvery) == 0 {
			item = map[string]any{"sku": "piano", "quantity": 1, "unit_price": customerLimit(i) + 1}
		}
		o = map[string]any{"customer_id": customerID(i), "items": []any{item}}
		cancelIt = c.rng.IntN(cancelEvery) == 0
	case Delivery:
		o = map[string]any{"food_id": foods[c.rng.IntN(len(foods))].id, "quantity": 1 + c.rng.IntN(3)}
	}
	b, _ := json.Marshal(o)
	return b, cancelIt
}

// place posts an order with its Idempotency-Key until the service answers
// 201, sending the same request again after each failure (a process down,
// an answer lost): the key makes the retries safe. It returns the order's
// id, or an error once ctx ends.
func (c *client) place(ctx context.Context, key string, body []byte) (string, error) {
	for {
		var o struct{ ID string }
		status, err := c.post(ctx, c.base+"/orders", body, key, &o)
		if err == nil && status == http.StatusCreated && o.ID != "" {
			return o.ID, nil
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		c.count(func(s *ClientStats) { s.Failed++ })
		wait(ctx, 100*time.Millisecond)
	}
}

// await waits for order id to end, for up to awaitOrder.
func (c *client) await(ctx context.Context, id string) bool {
	ctx, cancel := context.WithTimeout(ctx, awaitOrder)
	defer cancel()
	for ctx.Err() == nil {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/orders/"+id+"?wait=5s", nil)
		if err != nil {
			return false
		}
		var o struct{ State string }
		status, err := c.do(req, &o)
		if err == nil && status == http.StatusOK && o.State != "" && o.State != "PENDING" {
			return true
		}
		if err != nil || status >= 500 {
			c.count(func(s *ClientStats) { s.Failed++ })
			wait(ctx, 100*time.Millisecond)
		}
	}
	return false
}

// post POSTs body to url, with an Idempotency-Key when key is not empty.
func (c *client) post(ctx context.Context, url string, body []byte, key string, out ...any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	var o any
	if len(out) > 0 {
		o = out[0]
	}
	return c.do(req, o)
}

// do sends req and decodes a 2xx answer into out (when not nil).
func (c *client) do(req *http.Request, out any) (int, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if resp.StatusCode/100 == 2 && out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %w", req.Method, req.URL.Path, err)
		}
	}
	return resp.StatusCode, nil
}

// replays returns the keys answered with two different orders.
func (c *client) replays() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.twice...)
}
