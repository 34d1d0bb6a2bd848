// Command troupe runs Troupe's demo, benchmarks and tools.
//
//	troupe demo            watch the reference flows run on embedded defaults
//	troupe bench [NAME]    run a benchmark and report throughput and latency
//	troupe version         print the version
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	_ "time/tzdata" // cron schedules read in a time zone work on machines without a zone database

	"github.com/troupedev/troupe/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
