package demo

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"
)

// runClients places orders 0..orders-1 from clients goroutines, each with
// its own random source (seeded by seed and stream), calling one for each.
// before, if not nil, runs before order n is handed out (the shop demo
// restarts its Order service halfway). It returns the first error of one,
// of before or of ctx, once every client has stopped.
func runClients(ctx context.Context, clients, orders int, seed, stream uint64,
	before func(n int) error, one func(ctx context.Context, rng *rand.Rand, n int) error) error {
	jobs := make(chan int)
	errc := make(chan error, clients)
	var wg sync.WaitGroup
	for c := range clients {
		rng := rand.New(rand.NewPCG(seed, uint64(c)+stream))
		wg.Go(func() {
			for n := range jobs {
				if err := one(ctx, rng, n); err != nil {
					errc <- err
					return
				}
			}
		})
	}
	var err error
feed:
	for n := range orders {
		if before != nil {
			if err = before(n); err != nil {
				break
			}
		}
		select {
		case jobs <- n:
		case err = <-errc:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errc:
		default:
		}
	}
	return err
}

// printProgress writes line() to out once a second, with the seconds since
// start before it, until done is closed or ctx ends. A line that cannot be
// made (ok false) is skipped.
func printProgress(ctx context.Context, out io.Writer, start time.Time, done <-chan struct{}, line func() (string, bool)) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		case <-t.C:
			if l, ok := line(); ok {
				fmt.Fprintf(out, "      %5.1fs  %s\n", time.Since(start).Seconds(), l)
			}
		}
	}
}
