package pgcluster

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestFindBinDir_NoneInstalledSaysHowToInstall(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := findBinDir("", filepath.Join(t.TempDir(), "*", "bin"))
	if !errors.Is(err, ErrBinariesNotFound) {
		t.Fatalf("err = %v, want ErrBinariesNotFound", err)
	}
	const want = `PostgreSQL binaries not found (looked on PATH and under /usr/lib/postgresql/*/bin): install them with "apt-get install postgresql"`
	if err.Error() != want {
		t.Errorf("message = %q, want %q", err, want)
	}
}

func TestFindBinDir_PicksHighestVersion(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	root := t.TempDir()
	for _, v := range []string{"9", "15", "13", "16"} {
		bin := filepath.Join(root, v, "bin")
		if err := os.MkdirAll(bin, 0o755); err != nil {
			t.Fatal(err)
		}
		if v == "16" {
			continue // incomplete install: skipped
		}
		for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
			if err := os.WriteFile(filepath.Join(bin, name), nil, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, err := findBinDir("", filepath.Join(root, "*", "bin"))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(root, "15", "bin"); got != want {
		t.Errorf("found %s, want %s", got, want)
	}
}
