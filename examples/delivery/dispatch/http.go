package dispatch

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/troupedev/troupe/reserve"
)

// Handler returns the service's HTTP API:
//
//	POST /reservations/agent/try      the saga's phase 1 (saga.Participant.HTTPHandler)
//	POST /reservations/agent/confirm  the saga's phase 2
//	GET  /agents                      → every agent, with the order it is out for
//	POST /deliveries/{order}/delivered → the order's agent is back and free; 404 if none was assigned
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST "+TryPath, s.part.HTTPHandler(s.db, TryAgent))
	confirm := s.part.HTTPHandler(s.db, ConfirmAgent)
	mux.HandleFunc("POST "+ConfirmPath, func(w http.ResponseWriter, r *http.Request) {
		if s.inject() {
			http.Error(w, "dispatch: injected: busy, call again", http.StatusServiceUnavailable)
			return
		}
		confirm.ServeHTTP(w, r)
	})
	mux.HandleFunc("GET /agents", func(w http.ResponseWriter, r *http.Request) {
		agents, err := s.Agents(r.Context())
		if err != nil {
			s.cfg.Logger.Error("dispatch: list agents failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
			return
		}
		writeJSON(w, http.StatusOK, agents)
	})
	mux.HandleFunc("POST /deliveries/{order}/delivered", func(w http.ResponseWriter, r *http.Request) {
		res, err := s.Delivered(r.Context(), r.PathValue("order"))
		switch {
		case errors.Is(err, ErrNotFound):
			writeJSON(w, http.StatusNotFound, apiError{Error: err.Error()})
		case err != nil:
			s.cfg.Logger.Error("dispatch: delivered failed", "err", err)
			writeJSON(w, http.StatusInternalServerError, apiError{Error: "internal error"})
		default:
			writeJSON(w, http.StatusOK, Agent{ID: res.Resource, State: reserve.ResourceFree})
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
