package registration

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/mail"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits of the API's input.
const (
	maxBody      = 64 << 10 // bytes of a request body
	maxEmailLen  = 254      // bytes of an address, as SMTP allows
	maxNameRunes = 100
)

// Handler returns the Registration API:
//
//	POST /registrations              {"email": ..., "name": ...}  201, the Registration
//	GET  /registrations/{id}                                      200, the Registration
//	POST /registrations/{id}/confirm {"token": ...}               200, the Registration
//
// Errors are JSON objects {"error": text, "field": name}, with field set
// when one field is at fault: 400 for a body that is not one JSON object,
// has a field Registration does not know, or a missing or invalid field;
// 403 for a wrong token; 404 for an unknown id.
//
// Confirming is a POST, not a GET of the emailed link: mail scanners and
// browsers' prefetchers follow links, and must not confirm on their own.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /registrations", s.postRegistration)
	mux.HandleFunc("GET /registrations/{id}", s.getRegistration)
	mux.HandleFunc("POST /registrations/{id}/confirm", s.postConfirm)
	return mux
}

// apiError is the body of every error answer.
type apiError struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"`
}

func (s *Service) postRegistration(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Email string `json:"email"`
		Name  string `json:"name"`
	}
	if e := decodeBody(w, r, &in); e != nil {
		writeJSON(w, http.StatusBadRequest, e)
		return
	}
	reg, err := s.Register(r.Context(), in.Email, in.Name)
	var invalid *FieldError
	switch {
	case errors.As(err, &invalid):
		writeJSON(w, http.StatusBadRequest, &apiError{Error: invalid.Problem, Field: invalid.Field})
		return
	case err != nil:
		s.internalError(w, err)
		return
	}
	w.Header().Set("Location", "/registrations/"+reg.ID)
	writeJSON(w, http.StatusCreated, reg)
}

func (s *Service) getRegistration(w http.ResponseWriter, r *http.Request) {
	reg, err := s.Get(r.Context(), r.PathValue("id"))
	switch {
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, &apiError{Error: "no such registration"})
	case err != nil:
		s.internalError(w, err)
	default:
		writeJSON(w, http.StatusOK, reg)
	}
}

func (s *Service) postConfirm(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Token string `json:"token"`
	}
	if e := decodeBody(w, r, &in); e != nil {
		writeJSON(w, http.StatusBadRequest, e)
		return
	}
	if in.Token == "" {
		writeJSON(w, http.StatusBadRequest, &apiError{Error: "token is required", Field: "token"})
		return
	}
	reg, err := s.Confirm(r.Context(), r.PathValue("id"), in.Token)
	switch {
	case errors.Is(err, ErrNotFound):
		writeJSON(w, http.StatusNotFound, &apiError{Error: "no such registration"})
	case errors.Is(err, ErrWrongToken):
		writeJSON(w, http.StatusForbidden, &apiError{Error: "wrong confirmation token", Field: "token"})
	case err != nil:
		s.internalError(w, err)
	default:
		writeJSON(w, http.StatusOK, reg)
	}
}

// validate checks a new registration's email and name, already trimmed.
func validate(email, name string) *FieldError {
	switch {
	case email == "":
		return &FieldError{"email", "email is required"}
	case !validEmail(email):
		return &FieldError{"email", "email must be a plain address such as ada@example.com"}
	case name == "":
		return &FieldError{"name", "name is required"}
	case utf8.RuneCountInString(name) > maxNameRunes:
		return &FieldError{"name", fmt.Sprintf("name must be at most %d characters", maxNameRunes)}
	case strings.ContainsFunc(name, unicode.IsControl):
		return &FieldError{"name", "name must not contain control characters"}
	}
	return nil
}

// validEmail reports whether s is a bare address (no display name, no angle
// brackets) that net/mail can parse.
func validEmail(s string) bool {
	if len(s) > maxEmailLen {
		return false
	}
	a, err := mail.ParseAddress(s)
	return err == nil && a.Name == "" && a.Address == s
}

// decodeBody decodes r's body, one JSON object with only v's fields, into v.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) *apiError {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if _, err := dec.Token(); err != io.EOF {
			return &apiError{Error: "malformed JSON: the body must hold one JSON object and nothing after it"}
		}
		return nil
	}
	var (
		syntax  *json.SyntaxError
		typ     *json.UnmarshalTypeError
		tooLong *http.MaxBytesError
	)
	switch {
	case errors.Is(err, io.EOF):
		return &apiError{Error: "the body is empty: send a JSON object"}
	case errors.As(err, &syntax):
		return &apiError{Error: fmt.Sprintf("malformed JSON at byte %d: %v", syntax.Offset, err)}
	case errors.Is(err, io.ErrUnexpectedEOF):
		return &apiError{Error: "malformed JSON: the body ends too early"}
	case errors.As(err, &typ) && typ.Field != "":
		// Every field of the API is a string.
		return &apiError{Error: typ.Field + " must be a string", Field: typ.Field}
	case errors.As(err, &typ):
		return &apiError{Error: "malformed JSON: the body must be a JSON object"}
	case errors.As(err, &tooLong):
		return &apiError{Error: fmt.Sprintf("the body is larger than %d bytes", maxBody)}
	}
	// encoding/json reports an unknown field only in its error's text.
	if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		f = strings.Trim(f, `"`)
		return &apiError{Error: fmt.Sprintf("unknown field %q", f), Field: f}
	}
	return &apiError{Error: "malformed JSON: " + err.Error()}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Service) internalError(w http.ResponseWriter, err error) {
	s.log.Warn("request failed", "err", err)
	writeJSON(w, http.StatusInternalServerError, &apiError{Error: "internal error"})
}
