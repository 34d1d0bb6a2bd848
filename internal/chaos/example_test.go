package chaos_test

import (
	"context"
	"os"
	"time"

	"github.com/troupedev/troupe/internal/chaos"
)

// A run of five minutes with a fixed seed, its report on standard output.
// The troupe command runs the node processes; a program of its own passes
// Command to run them some other way (the tests run their own binary).
func ExampleRun() {
	rep, err := chaos.Run(context.Background(), chaos.Config{Duration: 5 * time.Minute, Seed: 42})
	if err != nil {
		panic(err) // the run could not be carried out: no PostgreSQL binaries, say
	}
	rep.Write(os.Stdout) // ends with "violations: N"
	if len(rep.Violations) > 0 {
		os.Exit(1)
	}
}
