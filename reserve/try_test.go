package reserve_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/troupedev/troupe/reserve"
	"github.com/troupedev/troupe/sqldb"
)

// 32 orders race for 5 packets of one dish. On PostgreSQL all 32
// transactions are open at once and run their Try together, so the row
// locks (not a serializing lock) must keep two orders off one packet.
func TestTry_ConcurrentOrdersNeverHoldTheSamePacket(t *testing.T) {
	const orders, packets = 32, 5
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, orders+4)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var ids []string
			for i := range packets {
				ids = append(ids, fmt.Sprintf("packet-%d", i))
			}
			e.add(t, "pizza", ids...)

			// On PostgreSQL every transaction waits, begun, until all are
			// (SQLite runs one write transaction at a time).
			var arrived sync.WaitGroup
			allIn := make(chan struct{})
			if kind == "postgres" {
				arrived.Add(orders)
				go func() { arrived.Wait(); close(allIn) }()
			}

			errs := make([]error, orders)
			var wg sync.WaitGroup
			for i := range orders {
				wg.Go(func() {
					order := fmt.Sprintf("order-%02d", i)
					var refusal error
					errs[i] = e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
						if kind == "postgres" {
							arrived.Done()
							select {
							case <-allIn:
							case <-ctx.Done():
								return ctx.Err()
							}
						}
						_, err := e.r.TryTx(ctx, tx, reserve.Try{ID: order, Pool: "pizza", Owner: order, ExpiresAt: t0.Add(time.Minute)})
						if errors.Is(err, reserve.ErrRefused) {
							refusal = err
							return nil
						}
						return err
					})
					if errs[i] == nil {
						errs[i] = refusal
					}
				})
			}
			wg.Wait()

			granted := map[string]bool{}
			refused := 0
			for i, err := range errs {
				switch {
				case err == nil:
					granted[fmt.Sprintf("order-%02d", i)] = true
				case errors.Is(err, reserve.ErrUnavailable):
					refused++
				default:
					t.Fatalf("order-%02d: %v", i, err)
				}
			}
			if len(granted) != packets || refused != orders-packets {
				t.Fatalf("%d orders granted and %d refused, want %d and %d", len(granted), refused, packets, orders-packets)
			}
			holders := map[string]bool{}
			for _, p := range e.resources(t, "pizza") {
				if p.State != reserve.ResourceHeld || !granted[p.Reservation] || holders[p.Reservation] {
					t.Fatalf("packet %s is %s by %q: want each held by a different granted order", p.ID, p.State, p.Reservation)
				}
				holders[p.Reservation] = true
			}
			for order := range granted {
				if res := e.get(t, order); res.State != reserve.Held || res.Resource == "" {
					t.Fatalf("granted %s is %s with resource %q", order, res.State, res.Resource)
				}
			}
			if n := e.count(t, `SELECT COUNT(*) FROM troupe_reservations WHERE state = 'refused'`); n != orders-packets {
				t.Fatalf("%d refusals recorded, want %d", n, orders-packets)
			}
		})
	}
}

// Orders that all want the same agent: one gets it, the others are refused.
func TestTry_OneSpecificAgentIsHeldByOneOrderOnly(t *testing.T) {
	const orders = 8
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, orders+4)
			e.add(t, "agents", "ada", "bob")
			errs := make([]error, orders)
			var wg sync.WaitGroup
			for i := range orders {
				wg.Go(func() {
					order := fmt.Sprintf("order-%d", i)
					_, errs[i] = e.r.Try(context.Background(), reserve.Try{ID: order, Pool: "agents", Resource: "ada", Owner: order, ExpiresAt: t0.Add(time.Minute)})
				})
			}
			wg.Wait()
			winner := ""
			for i, err := range errs {
				switch {
				case err == nil && winner == "":
					winner = fmt.Sprintf("order-%d", i)
				case err == nil:
					t.Fatalf("both %s and order-%d hold ada", winner, i)
				case !errors.Is(err, reserve.ErrUnavailable):
					t.Fatalf("order-%d: %v", i, err)
				}
			}
			if winner == "" {
				t.Fatal("no order got ada, who was free")
			}
			e.wantResource(t, "agents", "ada", reserve.ResourceHeld, winner)
			e.wantResource(t, "agents", "bob", reserve.ResourceFree, "")
		})
	}
}

// A refusal is the reservation's answer for good: a repeated Try is refused
// again even once a packet is free.
func TestTry_RefusalIsRecordedAndRepeated(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			e.add(t, "pizza", "p1")
			if _, err := e.try(t, "order-1", "pizza", time.Minute); err != nil {
				t.Fatal(err)
			}
			res, err := e.try(t, "order-2", "pizza", time.Minute)
			if !errors.Is(err, reserve.ErrUnavailable) || res.State != reserve.Refused {
				t.Fatalf("Try on an empty pool: %+v, %v; want refused, ErrUnavailable", res, err)
			}
			e.add(t, "pizza", "p2")
			if _, err := e.try(t, "order-2", "pizza", time.Minute); !errors.Is(err, reserve.ErrUnavailable) {
				t.Fatalf("repeated refused Try: %v, want ErrUnavailable", err)
			}
			e.wantResource(t, "pizza", "p2", reserve.ResourceFree, "")
			if _, err := e.r.Confirm(context.Background(), "order-2"); !errors.Is(err, reserve.ErrUnavailable) {
				t.Fatalf("Confirm of a refused reservation: %v, want ErrUnavailable", err)
			}
			if _, err := e.try(t, "order-3", "pizza", time.Minute); err != nil {
				t.Fatalf("a new order after p2 was added: %v", err)
			}
		})
	}
}

// A Try that meets the last free packet being taken by a transaction that
// then rolls back waits for it and gets the packet: a refusal means sold
// out, not busy.
func TestTry_WaitsForAPacketBeingTakenRatherThanRefuse(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind, 0)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			e.add(t, "pizza", "p1")

			xHolds, rollBack := make(chan struct{}), make(chan struct{})
			errRollback := errors.New("order-x rolls back")
			xDone := make(chan error, 1)
			go func() {
				xDone <- e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
					if _, err := e.r.TryTx(ctx, tx, reserve.Try{ID: "order-x", Pool: "pizza", Owner: "order-x", ExpiresAt: t0.Add(time.Minute)}); err != nil {
						return err
					}
					close(xHolds)
					select {
					case <-rollBack:
						return errRollback
					case <-ctx.Done():
						return ctx.Err()
					}
				})
			}()
			select {
			case <-xHolds:
			case err := <-xDone:
				t.Fatalf("order-x: %v", err)
			}

			type answer struct {
				res reserve.Reservation
				err error
			}
			yDone := make(chan answer, 1)
			go func() {
				res, err := e.try(t, "order-y", "pizza", time.Minute)
				yDone <- answer{res, err}
			}()
			if kind == "postgres" { // SQLite: order-y waits for the write lock
				waitFor(t, "order-y to wait for order-x's row lock (or answer)", func() bool {
					return len(yDone) > 0 ||
						e.count(t, `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) == 1
				})
			}
			close(rollBack)
			if err := <-xDone; !errors.Is(err, errRollback) {
				t.Fatalf("order-x: %v", err)
			}
			y := <-yDone
			if y.err != nil || y.res.Resource != "p1" {
				t.Fatalf("order-y: %+v, %v; want p1", y.res, y.err)
			}
			e.wantResource(t, "pizza", "p1", reserve.ResourceHeld, "order-y")
		})
	}
}

// A Try that waited for the last packet's taker and was refused keeps no
// lock on the packet: the winner confirms it while the refused order's
// transaction is still open. (A lock kept on a packet the Try did not take
// is what let concurrent Trys deadlock.) PostgreSQL only: on SQLite every
// write transaction, the refused one included, holds the database's write
// lock, which a Confirm waits for by design.
func TestTry_RefusedTryDoesNotBlockTheWinnersConfirm(t *testing.T) {
	e := newEnv(t, "postgres", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e.add(t, "pizza", "p1")
	try := func(id string) reserve.Try {
		return reserve.Try{ID: id, Pool: "pizza", Owner: id, ExpiresAt: t0.Add(time.Minute)}
	}
	lockWaits := func() int {
		return e.count(t, `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)
	}

	// order-1 takes p1 and commits when told.
	took1, commit1, done1 := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		done1 <- e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			if _, err := e.r.TryTx(ctx, tx, try("order-1")); err != nil {
				return err
			}
			close(took1)
			select {
			case <-commit1:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	select {
	case <-took1:
	case err := <-done1:
		t.Fatalf("order-1: %v", err)
	}

	// order-2 waits for order-1, is refused, and keeps its transaction
	// open until told.
	answer2, end2, done2 := make(chan error, 1), make(chan struct{}), make(chan error, 1)
	go func() {
		done2 <- e.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			_, err := e.r.TryTx(ctx, tx, try("order-2"))
			answer2 <- err
			if !errors.Is(err, reserve.ErrRefused) {
				return err
			}
			select {
			case <-end2:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	waitFor(t, "order-2 to wait for order-1's transaction (or answer)", func() bool { return len(answer2) > 0 || lockWaits() == 1 })
	close(commit1)
	if err := <-done1; err != nil {
		t.Fatalf("order-1: %v", err)
	}
	if err := <-answer2; !errors.Is(err, reserve.ErrUnavailable) {
		close(end2)
		t.Fatalf("order-2: %v, want ErrUnavailable", err)
	}

	confirmed := make(chan error, 1)
	go func() {
		_, err := e.r.Confirm(ctx, "order-1")
		confirmed <- err
	}()
	waitFor(t, "order-1's Confirm to answer (or wait for a lock)", func() bool { return len(confirmed) > 0 || lockWaits() == 1 })
	blocked := len(confirmed) == 0
	close(end2) // a Confirm waiting for order-2's lock now goes on
	if err := <-done2; err != nil {
		t.Fatalf("order-2: %v", err)
	}
	if err := <-confirmed; err != nil {
		t.Fatalf("confirm order-1: %v", err)
	}
	if blocked {
		t.Fatal("order-1's Confirm waited for the transaction of order-2, which was refused: order-2 kept a lock on p1")
	}
	e.wantResource(t, "pizza", "p1", reserve.ResourceAssigned, "order-1")
}
