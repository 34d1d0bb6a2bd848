package sqldb_test

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"github.com/troupedev/troupe/sqldb"
)

func chunkSizes(d sqldb.Dialect, n, most int) []int {
	var sizes []int
	next := 0
	for lo, hi := range sqldb.Chunks(d, n, most) {
		if lo != next {
			panic(fmt.Sprintf("run starts at %d, want %d", lo, next))
		}
		sizes = append(sizes, hi-lo)
		next = hi
	}
	return sizes
}

func TestChunks_SQLiteRunsArePowersOfTwoAndCoverEveryRowOnce(t *testing.T) {
	for _, c := range []struct {
		n, most int
		want    []int
	}{
		{0, 500, nil},
		{1, 500, []int{1}},
		{37, 500, []int{32, 4, 1}},
		{64, 500, []int{64}},
		{1100, 500, []int{256, 256, 256, 256, 64, 8, 4}},
		{7, 3, []int{2, 2, 2, 1}},
	} {
		got := chunkSizes(sqldb.SQLite, c.n, c.most)
		if !slices.Equal(got, c.want) {
			t.Errorf("SQLite: Chunks(%d, %d) = %v, want %v", c.n, c.most, got, c.want)
		}
	}
	// Whatever the batch, few distinct statement sizes.
	sizes := map[int]bool{}
	for n := range 1000 {
		for _, s := range chunkSizes(sqldb.SQLite, n, 500) {
			sizes[s] = true
		}
	}
	if len(sizes) > 9 {
		t.Errorf("batches of 0 to 999 rows use %d statement sizes, want at most 9", len(sizes))
	}
}

func TestChunks_PostgresRunsAreAsLongAsAllowed(t *testing.T) {
	if got := chunkSizes(sqldb.Postgres, 1100, 500); !slices.Equal(got, []int{500, 500, 100}) {
		t.Errorf("Postgres: Chunks(1100, 500) = %v, want [500 500 100]", got)
	}
	if got := chunkSizes(sqldb.Postgres, 37, 500); !slices.Equal(got, []int{37}) {
		t.Errorf("Postgres: Chunks(37, 500) = %v, want [37]", got)
	}
}

func TestChunks_StopsWhenTheLoopBreaks(t *testing.T) {
	runs := 0
	for range sqldb.Chunks(sqldb.SQLite, 1000, 1) {
		runs++
		if runs == 3 {
			break
		}
	}
	if runs != 3 {
		t.Fatalf("ran %d runs after breaking at 3", runs)
	}
}

func TestValuesListAndList_NumberPlaceholdersFromFirst(t *testing.T) {
	if got, want := sqldb.ValuesList(1, 2, 3), "($1, $2, $3), ($4, $5, $6)"; got != want {
		t.Errorf("ValuesList(1, 2, 3) = %q, want %q", got, want)
	}
	if got, want := sqldb.ValuesList(2, 3, 1), "($2), ($3), ($4)"; got != want {
		t.Errorf("ValuesList(2, 3, 1) = %q, want %q", got, want)
	}
	if got, want := sqldb.List(2, 3), "$2, $3, $4"; got != want {
		t.Errorf("List(2, 3) = %q, want %q", got, want)
	}
	if got := sqldb.List(1, 0); got != "" {
		t.Errorf("List(1, 0) = %q, want empty", got)
	}
}

// The statements Chunks shapes write what one statement per row would, on
// both dialects.
func TestChunks_MultiRowStatementsWriteEveryRow(t *testing.T) {
	forEachDialect(t, func(t *testing.T, dc dialectCase) {
		ctx := testCtx(t)
		db := dc.openFresh(t)
		if _, err := db.Exec(ctx, `CREATE TABLE chunked (id INTEGER PRIMARY KEY, name TEXT NOT NULL)`); err != nil {
			t.Fatal(err)
		}
		const n = 77
		err := db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
			for lo, hi := range sqldb.Chunks(tx.Dialect(), n, 20) {
				var args []any
				for i := lo; i < hi; i++ {
					args = append(args, i, fmt.Sprint("row ", i))
				}
				if err := sqldb.ExecLater(ctx, tx, `INSERT INTO chunked (id, name) VALUES `+sqldb.ValuesList(1, hi-lo, 2), args...); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var count, sum int
		if err := db.QueryRow(ctx, `SELECT count(*), coalesce(sum(id), 0) FROM chunked WHERE name = 'row ' || id`).Scan(&count, &sum); err != nil {
			t.Fatal(err)
		}
		if count != n || sum != n*(n-1)/2 {
			t.Fatalf("%d rows with ids summing to %d, want %d rows summing to %d", count, sum, n, n*(n-1)/2)
		}
		var deleted []any
		for i := 0; i < n; i += 2 {
			deleted = append(deleted, i)
		}
		var gone int64
		for lo, hi := range sqldb.Chunks(db.Dialect(), len(deleted), 20) {
			k, err := db.Exec(ctx, `DELETE FROM chunked WHERE id IN (`+sqldb.List(1, hi-lo)+`)`, deleted[lo:hi]...)
			if err != nil {
				t.Fatal(err)
			}
			gone += k
		}
		if gone != int64(len(deleted)) {
			t.Fatalf("deleted %d rows, want %d", gone, len(deleted))
		}
	})
}
