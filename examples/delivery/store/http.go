package store

import (
	"encoding/json"
	"errors"
	"net/http"
)

// Handler returns the service's HTTP API:
//
//	GET /foods      → the menu, each food with its packets counted (free, held, assigned)
//	GET /foods/{id} → one food; 404 if it is not on the menu
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /foods", func(w http.ResponseWriter, r *http.Request) {
		foods, err := s.Foods(r.Context())
		if err != nil {
			s.cfg.Logger.Error("store: list foods failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
			return
		}
		writeJSON(w, http.StatusOK, foods)
	})
	mux.HandleFunc("GET /foods/{id}", func(w http.ResponseWriter, r *http.Request) {
		f, err := s.Food(r.Context(), r.PathValue("id"))
		switch {
		case errors.Is(err, ErrNotFound):
			writeJSON(w, http.StatusNotFound, apiError{Error: err.Error()})
		case err != nil:
			s.cfg.Logger.Error("store: get food failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
		default:
			writeJSON(w, http.StatusOK, f)
		}
	})
	return mux
}

type apiError struct {
	Error string `json:"error"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
