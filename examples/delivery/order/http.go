package order

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/troupedev/troupe/examples/internal/jsonbody"
)

// ErrInvalid is matched by every *ValidationError.
var ErrInvalid = errors.New("order: invalid request")

// ValidationError says which field of a request is wrong and why.
type ValidationError struct {
	// Field is the JSON name of the field at fault, e.g. "quantity";
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
	// FoodID is a food of the Store's menu.
	FoodID string `json:"food_id"`
	// Quantity is how many packets of it, 1 to MaxQuantity.
	Quantity int `json:"quantity"`
}

// Validate checks the request's fields, naming the first at fault. Place
// checks the food against the menu too.
func (r PlaceRequest) Validate() error {
	bad := func(field, problem string) error { return &ValidationError{Field: field, Problem: problem} }
	switch {
	case strings.TrimSpace(r.FoodID) == "":
		return bad("food_id", "required")
	case len(r.FoodID) > 100:
		return bad("food_id", "longer than 100 characters")
	case r.Quantity < 1 || r.Quantity > MaxQuantity:
		return bad("quantity", fmt.Sprintf("must be between 1 and %d, have %d", MaxQuantity, r.Quantity))
	}
	return nil
}

// maxBody bounds a request body.
const maxBody = 1 << 16

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
//	POST /orders          {"food_id": "...", "quantity": 1}
//	                      → 201 with the order (PENDING); 400 {"error", "field"} if invalid
//	                        or not on the menu; 503 if the menu cannot be read
//	GET  /orders/{id}     → 200 with the order: PENDING, PLACED (with its packets and
//	                        agent) or NOT_PLACED (with the reason); ?wait=5s waits (up
//	                        to 30s) for it to end
//	GET  /orders/{id}/saga → the place-order saga's state and history
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /orders", func(w http.ResponseWriter, r *http.Request) {
		req, err := decodePlaceRequest(r.Body)
		if err != nil {
			s.writeError(w, err)
			return
		}
		o, err := s.Place(r.Context(), req)
		if err != nil {
			s.writeError(w, err)
			return
		}
		w.Header().Set("Location", "/orders/"+o.ID)
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
			// The wait is over: answer with the order as it is now.
		}
		o, err := s.Get(r.Context(), id)
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
// invalid request, 404, 503 while the menu cannot be read, or 500 without
// internals.
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
	case errors.Is(err, ErrMenuUnavailable):
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, body{Error: "the menu is unavailable; try again"})
	default:
		s.cfg.Logger.Error("order: request failed", "err", err)
		writeJSON(w, http.StatusInternalServerError, body{Error: "internal error"})
	}
}
