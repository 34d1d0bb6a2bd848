package order_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/troupedev/troupe/broker/natsjs"
	"github.com/troupedev/troupe/examples/delivery/order"
	"github.com/troupedev/troupe/examples/delivery/store"
	"github.com/troupedev/troupe/internal/pgtest"
	"github.com/troupedev/troupe/sqldb"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(pgtest.WithCluster(m))
}

var dialects = []string{"sqlite", "postgres"}

// startStore starts a Store service on a fresh database of one dialect,
// with pizza and a food whose id holds a slash on the menu, and serves its
// HTTP API.
func startStore(t *testing.T, kind string) *httptest.Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	nb, err := natsjs.New(ctx, natsjs.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nb.Close() })
	dbURL := "sqlite://" + filepath.Join(t.TempDir(), "store.db")
	if kind == "postgres" {
		dbURL = pgtest.URL(t)
	}
	db, err := sqldb.Open(ctx, dbURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := store.Migrate(ctx, db); err != nil {
		t.Fatal(err)
	}
	st, err := store.New(db, nb, store.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := st.Stop(context.Background()); err != nil {
			t.Errorf("stop the Store: %v", err)
		}
	})
	for _, id := range []string{"pizza", "half/half"} {
		if err := st.AddFood(ctx, id, "Food "+id, 1); err != nil {
			t.Fatal(err)
		}
	}
	srv := httptest.NewServer(st.Handler())
	t.Cleanup(srv.Close)
	return srv
}

// HTTPMenu reads the running Store's menu over its HTTP API: a food on
// the menu is on it, one that is not is not, and an id is asked as one
// path segment whatever it holds.
func TestHTTPMenu_ReadsTheStoresMenuOverHTTP(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			srv := startStore(t, kind)
			menu := order.HTTPMenu(srv.URL+"/", nil)
			for _, tc := range []struct {
				food string
				want bool
			}{
				{"pizza", true},
				{"sushi", false},
				{"half/half", true},
				{"half", false},
				{"pizza?x=1", false},
			} {
				got, err := menu.OnMenu(t.Context(), tc.food)
				if err != nil || got != tc.want {
					t.Errorf("OnMenu(%q) = %v, %v; want %v", tc.food, got, err, tc.want)
				}
			}
		})
	}
}

// Whatever keeps HTTPMenu from hearing the Store's answer is an error
// saying what happened, never "not on the menu": the order is then
// refused as the menu being unavailable, not as an unknown food.
func TestHTTPMenu_ErrsWhenTheStoreDoesNotAnswer(t *testing.T) {
	answer := func(status int, contentType, body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", contentType)
			w.WriteHeader(status)
			w.Write([]byte(body))
		}
	}
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	for _, tc := range []struct {
		name    string
		url     string               // set: the Store's URL
		handler http.HandlerFunc     // else: what the Store answers
		wantErr func(err error) bool // what the error says
		timeout time.Duration        // set: the client's timeout
	}{
		{name: "the Store down", url: down.URL,
			wantErr: func(err error) bool { return strings.Contains(err.Error(), "refused") }},
		{name: "the Store failing (500)", handler: answer(http.StatusInternalServerError, "application/json", `{"error": "internal error"}`),
			wantErr: func(err error) bool { return strings.Contains(err.Error(), "500 Internal Server Error") }},
		{name: "the Store restarting (503)", handler: answer(http.StatusServiceUnavailable, "text/plain", "service down"),
			wantErr: func(err error) bool { return strings.Contains(err.Error(), `503 Service Unavailable: "service down"`) }},
		{name: "a 200 that is not the food", handler: answer(http.StatusOK, "text/html", "<html>welcome</html>"),
			wantErr: func(err error) bool { return strings.Contains(err.Error(), `without food "pizza"`) }},
		{name: "a 404 that is not the Store's", handler: http.NotFound,
			wantErr: func(err error) bool { return strings.Contains(err.Error(), "without the Store's error") }},
		{name: "no answer in time", handler: func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }, timeout: 100 * time.Millisecond,
			wantErr: func(err error) bool {
				var ne net.Error
				return errors.As(err, &ne) && ne.Timeout()
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := tc.url
			if tc.handler != nil {
				srv := httptest.NewServer(tc.handler)
				defer srv.Close()
				u = srv.URL
			}
			var client *http.Client
			if tc.timeout > 0 {
				client = &http.Client{Timeout: tc.timeout}
			}
			got, err := order.HTTPMenu(u, client).OnMenu(t.Context(), "pizza")
			if err == nil {
				t.Fatalf("OnMenu = %v, nil; want an error", got)
			}
			if got || !tc.wantErr(err) {
				t.Errorf("OnMenu = %v, %v; want false and an error saying so", got, err)
			}
		})
	}
}
