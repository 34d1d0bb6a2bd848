package order

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/troupedev/troupe/message"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/troupedev/troupe/examples/internal/idempotency"
	"github.com/troupedev/troupe/examples/internal/jsonbody"
)

// ErrInvalid is matched by every *ValidationError.
var ErrInvalid = errors.New("order: invalid request")

// ValidationError says which field of a request is wrong and why.
type ValidationError struct {
	// Field is the JSON path of the field at fault, e.g. "items[1].quantity";
	// empty when the body as a whole is at fault (not JSON).
	Field string
	// Problem says what is wrong with it.
	Problem string
}

func (e *ValidationError) Error() string {
	if e.Field == "" {
		return "invalid order: " + e.Problem
	}
	return fmt.Sprintf("invalid order: %s: %s", e.Field, e.Problem)
}

// Is makes errors.Is(err, ErrInvalid) hold.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// PlaceRequest is the body of POST /orders.
type PlaceRequest struct {
	CustomerID string `json:"customer_id"`
	Items      []Item `json:"items"`
	// IdempotencyKey, when set, makes Place safe to repeat: the first
	// Place with a key creates the order and stores the key with it, in
	// the same transaction; a later Place with the same key, even one
	// racing the first, creates nothing and returns that order (as it is
	// now) if the request is the same, or an error matching
	// ErrIdempotencyKeyReused if it differs. Empty: no key, every Place
	// creates an order. A key is 1 to MaxIdempotencyKeyLength printable
	// ASCII characters, chosen by the client (a UUID, say), and kept as
	// long as its order. POST /orders fills it from the Idempotency-Key
	// header; it is not part of the body.
	IdempotencyKey string `json:"-"`
}

// Limits of an order.
const (
	MaxItems    = 100
	MaxQuantity = 10_000
	MaxPrice    = 100_000_000 // cents
)

// Validate checks the request, naming the first field at fault.
func (r PlaceRequest) Validate() error {
	bad := func(field, problem string) error { return &ValidationError{Field: field, Problem: problem} }
	if err := idempotency.Validate(r.IdempotencyKey); err != nil {
		return keyError(err)
	}
	switch {
	case strings.TrimSpace(r.CustomerID) == "":
		return bad("customer_id", "required")
	case len(r.CustomerID) > 100:
		return bad("customer_id", "longer than 100 characters")
	case len(r.Items) == 0:
		return bad("items", "at least one item is required")
	case len(r.Items) > MaxItems:
		return bad("items", fmt.Sprintf("at most %d items", MaxItems))
	}
	for i, it := range r.Items {
		f := fmt.Sprintf("items[%d].", i)
		switch {
		case strings.TrimSpace(it.SKU) == "":
			return bad(f+"sku", "required")
		case it.Quantity < 1 || it.Quantity > MaxQuantity:
			return bad(f+"quantity", fmt.Sprintf("must be between 1 and %d", MaxQuantity))
		case it.UnitPrice < 1 || it.UnitPrice > MaxPrice:
			return bad(f+"unit_price", fmt.Sprintf("must be between 1 and %d cents", MaxPrice))
		}
	}
	return nil
}

// fingerprint identifies the request a key was first used with: a hash
// of its fields (the key aside) as JSON, so white space and the order of
// the body's fields do not count, the order of the items does.
func (r PlaceRequest) fingerprint() string {
	b, _ := json.Marshal(r) // strings and integers: cannot fail
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (r PlaceRequest) total() int64 {
	var t int64
	for _, it := range r.Items {
		t += it.Quantity * it.UnitPrice
	}
	return t
}

// The Idempotency-Key header (see examples/internal/idempotency), and the
// header that marks an answer as a repeat.
const (
	// HeaderIdempotencyKey carries PlaceRequest.IdempotencyKey, as the
	// draft's quoted string ("8e03978e-...") or bare, as Stripe's clients
	// send it: both name the same key. It is also the "field" of the 400
	// and 422 answers about the key.
	HeaderIdempotencyKey = idempotency.Header
	// HeaderIdempotentReplayed is "true" on an answer to a POST /orders
	// whose key had created the order already.
	HeaderIdempotentReplayed = idempotency.ReplayedHeader
	// MaxIdempotencyKeyLength is the longest key, in bytes.
	MaxIdempotencyKeyLength = idempotency.MaxLength
)

// keyError turns an invalid key into a *ValidationError naming the header.
func keyError(err error) error {
	if e, ok := err.(*idempotency.Error); ok {
		return &ValidationError{Field: HeaderIdempotencyKey, Problem: e.Problem}
	}
	return err
}

// maxBody bounds a request body.
const maxBody = 1 << 20

// decodePlaceRequest reads a PlaceRequest, strictly: unknown fields, a
// wrong type, trailing data and an oversized body are errors naming what
// is wrong.
func decodePlaceRequest(body io.Reader) (PlaceRequest, error) {
	var req PlaceRequest
	if err := jsonbody.Decode(body, maxBody, &req); err != nil {
		return req, &ValidationError{Field: err.Field, Problem: err.Problem}
	}
	return req, req.Validate()
}

// Handler returns the service's HTTP API:
//
//	POST /orders               {"customer_id": "...", "items": [{"sku", "quantity", "unit_price"}]}
//	                           → 201 with the order (PENDING) and its Location; 400 {"error", "field"}
//	                           if invalid. With an Idempotency-Key header (1 to 255 printable ASCII
//	                           characters; 400 naming the field otherwise), a repeat of the request
//	                           creates nothing: 201 with the key's order as it is now, its Location
//	                           and Idempotent-Replayed: true; 422 {"error", "field": "Idempotency-Key"}
//	                           if the key came with another request
//	GET  /orders/{id}          → 200 with the order; ?wait=5s waits (up to 30s) for it to end
//	POST /orders/{id}/cancel   → 200 with the order; 409 if it has ended
//	GET  /orders/{id}/saga     → the CreateOrder saga's state and history (orchestrated orders)
//	GET  /orders/{id}/flow     → the CreateOrder flow and its events in causal order (choreographed orders)
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		key, err := idempotency.Key(r.Header)
		if err != nil {
			s.writeError(w, keyError(err))
			return
		}
		req, err := decodePlaceRequest(r.Body)
		if err != nil {
			s.writeError(w, err)
			return
		}
		req.IdempotencyKey = key
		o, replayed, err := s.place(r.Context(), req, message.NewID())
		if err != nil {
			s.writeError(w, err)
			return
		}
		w.Header().Set("Location", "/orders/"+o.ID)
		if replayed {
			w.Header().Set(HeaderIdempotentReplayed, "true")
		}
		// A repeat answers as the first request was answered (the draft's
		// advice, and Stripe's), with the order as it is now.
		writeJSON(w, http.StatusCreated, o)
	})
	mux.HandleFunc("GET /orders/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if ws := r.URL.Query().Get("wait"); ws != "" {
			d, err := time.ParseDuration(ws)
			if err != nil || d < 0 {
				s.writeError(w, &ValidationError{Field: "wait", Problem: "want a duration such as 5s"})
				return
			}
			ctx, cancel := context.WithTimeout(r.Context(), min(d, 30*time.Second))
			defer cancel()
			o, err := s.Await(ctx, id)
			if err == nil {
				writeJSON(w, http.StatusOK, o)
				return
			}
			if !errors.Is(err, context.DeadlineExceeded) || r.Context().Err() != nil {
				s.writeError(w, err)
				return
			}
			// The wait is over, possibly before Await read the order once:
			// answer with the order as it is now.
		}
		o, err := s.Get(r.Context(), id)
		if err != nil {
			s.writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, o)
	})
	mux.HandleFunc("POST /orders/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		o, err := s.Cancel(r.Context(), r.PathValue("id"))
		if err != nil {
			s.writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, o)
	})
	mux.HandleFunc("GET /orders/{id}/saga", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		info, err := s.orch.Get(r.Context(), id)
		if err != nil {
			s.writeError(w, fmt.Errorf("%w: no saga for order %q", ErrNotFound, id))
			return
		}
		hist, err := s.orch.History(r.Context(), id)
		if err != nil {
			s.writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"saga": info, "history": hist})
	})
	mux.HandleFunc("GET /orders/{id}/flow", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		f, err := s.flows.Get(r.Context(), id)
		if err != nil {
			s.writeError(w, fmt.Errorf("%w: no flow for order %q", ErrNotFound, id))
			return
		}
		hist, err := s.flows.History(r.Context(), id)
		if err != nil {
			s.writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"flow": f, "events": hist})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// writeError answers err with its status: 400 naming the field for an
// invalid request, 404, 409, 422 for a reused Idempotency-Key, or 500
// without internals.
func (s *Service) writeError(w http.ResponseWriter, err error) {
	type body struct {
		Error string `json:"error"`
		Field string `json:"field,omitempty"`
	}
	var ve *ValidationError
	switch {
	case errors.As(err, &ve):
		writeJSON(w, http.StatusBadRequest, body{Error: ve.Error(), Field: ve.Field})
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, body{Error: err.Error()})
	case errors.Is(err, ErrNotCancellable):
		writeJSON(w, http.StatusConflict, body{Error: err.Error()})
	case errors.Is(err, ErrIdempotencyKeyReused):
		writeJSON(w, http.StatusUnprocessableEntity, body{Error: err.Error(), Field: HeaderIdempotencyKey})
	default:
		s.cfg.Logger.Error("order: request failed", "err", err)
		writeJSON(w, http.StatusInternalServerError, body{Error: "internal error"})
	}
}
