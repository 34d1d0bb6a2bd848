package sqldb_test

import (
	"context"
	"fmt"
	"log"
	"strings"
	"sync"

	"github.com/troupedev/troupe/sqldb"
)

// placeOrders is a Batcher's function: it inserts every order of the batch
// with one statement and returns their ids, in the orders' order.
func placeOrders(ctx context.Context, tx sqldb.Tx, requestIDs []string) ([]int64, error) {
	values := make([]string, len(requestIDs))
	args := make([]any, len(requestIDs))
	for i, id := range requestIDs {
		values[i] = fmt.Sprintf("($%d)", i+1)
		args[i] = id
	}
	rows, err := tx.Query(ctx, "INSERT INTO orders (request_id) VALUES "+strings.Join(values, ", ")+
		" RETURNING id, request_id", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	ids := map[string]int64{} // RETURNING promises no order: match by key
	for rows.Next() {
		var id int64
		var requestID string
		if err := rows.Scan(&id, &requestID); err != nil {
			return nil, err
		}
		ids[requestID] = id
	}
	if err := rows.Close(); err != nil {
		return nil, err
	}
	out := make([]int64, len(requestIDs))
	for i, id := range requestIDs {
		out[i] = ids[id]
	}
	return out, nil
}

// Concurrent requests each place an order: those that arrive together are
// written by one INSERT in one transaction, and each gets its own order's
// id.
func ExampleBatcher() {
	ctx := context.Background()
	db, cleanup := exampleDB(ctx)
	defer cleanup()
	if _, err := db.Exec(ctx, "CREATE TABLE orders (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE)"); err != nil {
		log.Fatal(err)
	}

	orders := sqldb.NewBatcher(db, sqldb.BatcherConfig{}, placeOrders)

	const requests = 20
	ids := make([]int64, requests)
	var wg sync.WaitGroup
	for i := range requests {
		wg.Go(func() { // one HTTP request
			id, err := orders.Do(ctx, fmt.Sprintf("req-%02d", i))
			if err != nil {
				log.Fatal(err)
			}
			ids[i] = id
		})
	}
	wg.Wait()

	mismatched := 0
	for i, id := range ids {
		var requestID string
		if err := db.QueryRow(ctx, "SELECT request_id FROM orders WHERE id = $1", id).Scan(&requestID); err != nil {
			log.Fatal(err)
		}
		if requestID != fmt.Sprintf("req-%02d", i) {
			mismatched++
		}
	}
	fmt.Println(requests, "orders placed;", mismatched, "callers got another's id")
	// Output: 20 orders placed; 0 callers got another's id
}
