package walrelay

import (
	"testing"
	"time"
)

func TestWithoutReplication_KeepsEverythingElse(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u@h:5432/db?replication=database&sslmode=disable": "postgres://u@h:5432/db?sslmode=disable",
		"postgres://u@h/db":                        "postgres://u@h/db",
		"host=h dbname=db replication=database":    "host=h dbname=db",
		"replication=database host=h dbname=db":    " host=h dbname=db",
		"postgresql://u@h/db?replication=database": "postgresql://u@h/db",
	} {
		if got := withoutReplication(in); got != want {
			t.Errorf("withoutReplication(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestReplicationConfig_DropsPoolSettingsAndAsksForReplication(t *testing.T) {
	cfg, err := replicationConfig("postgres://u@h/db?pool_max_conns=4&application_name=x")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cfg.RuntimeParams["pool_max_conns"]; ok {
		t.Error("pool_max_conns would be sent to the server")
	}
	if cfg.RuntimeParams["replication"] != "database" || cfg.RuntimeParams["application_name"] != "x" {
		t.Errorf("runtime params %v", cfg.RuntimeParams)
	}
}

func TestBackoff_DoublesUpToTheCap(t *testing.T) {
	got := []time.Duration{}
	for a := range 6 {
		got = append(got, backoff(100*time.Millisecond, time.Second, a))
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("backoff = %v, want %v ms", got, want)
		}
	}
}
