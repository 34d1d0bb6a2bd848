package users

import (
	"encoding/json"
	"errors"
	"net/http"
)

// Handler returns the Users API:
//
//	GET /users/{id}  200, the User (CREATING between the two steps of its creation, then ACTIVE)
//
// An unknown id is answered 404 with {"error": text}.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /users/{id}", s.getUser)
	return mux
}

func (s *Service) getUser(w http.ResponseWriter, r *http.Request) {
	u, err := s.Get(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such user"})
	case err != nil:
		s.log.Warn("request failed", "err", err)
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "internal error"})
	default:
		writeJSON(w, http.StatusOK, u)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
