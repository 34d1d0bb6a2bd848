package customer

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
)

// Handler returns the service's HTTP API:
//
//	POST /customers      {"id", "name", "credit_limit"} → 201; 400 {"error", "field"}
//	GET  /customers      → every customer
//	GET  /customers/{id} → the customer, with its reserved credit
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /customers", func(w http.ResponseWriter, r *http.Request) {
		var c Customer
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			writeJSON(w, http.StatusBadRequest, apiError{Error: "malformed JSON: " + err.Error()})
			return
		}
		switch {
		case strings.TrimSpace(c.ID) == "":
			writeJSON(w, http.StatusBadRequest, apiError{Error: "required", Field: "id"})
			return
		case strings.TrimSpace(c.Name) == "":
			writeJSON(w, http.StatusBadRequest, apiError{Error: "required", Field: "name"})
			return
		case c.CreditLimit < 0:
			writeJSON(w, http.StatusBadRequest, apiError{Error: "must not be negative", Field: "credit_limit"})
			return
		case c.Reserved != 0:
			writeJSON(w, http.StatusBadRequest, apiError{Error: "set by the service", Field: "reserved"})
			return
		}
		if err := s.Create(r.Context(), c); err != nil {
			s.cfg.Logger.Error("customer: create failed", "err", err)
			writeJSON(w, http.StatusConflict, apiError{Error: "could not create the customer (does the id exist already?)"})
			return
		}
		writeJSON(w, http.StatusCreated, c)
	})
	mux.HandleFunc("GET /customers", func(w http.ResponseWriter, r *http.Request) {
		cs, err := s.List(r.Context())
		if err != nil {
			s.cfg.Logger.Error("customer: list failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
			return
		}
		writeJSON(w, http.StatusOK, cs)
	})
	mux.HandleFunc("GET /customers/{id}", func(w http.ResponseWriter, r *http.Request) {
		c, err := s.Get(r.Context(), r.PathValue("id"))
		switch {
		case errors.Is(err, ErrNotFound):
			writeJSON(w, http.StatusNotFound, apiError{Error: err.Error()})
		case err != nil:
			s.cfg.Logger.Error("customer: get failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
		default:
			writeJSON(w, http.StatusOK, c)
		}
	})
	return mux
}

type apiError struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
