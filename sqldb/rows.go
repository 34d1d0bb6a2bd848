package sqldb

import (
	"iter"
	"strconv"
	"strings"
)

// Chunks splits n rows into the runs that multi-row statements (INSERT ...
// VALUES (...), (...); ... WHERE id IN (...)) should write, each of at
// most most rows, and yields each run's bounds [lo, hi).
//
// On SQLite each run's length is a power of two: 37 rows are written as
// 32, 4 and 1. A statement built for a run then has one of a few texts
// whatever the batch, each parsed once and kept prepared (see DB's
// statement cache), where a text for every batch size would be parsed
// again and again, and would crowd the cache. On PostgreSQL, where a
// statement costs a round trip unless queued (ExecLater), runs are as
// long as most allows.
//
// most must be at least 1.
func Chunks(d Dialect, n, most int) iter.Seq2[int, int] {
	if most < 1 {
		panic("sqldb: Chunks needs most >= 1")
	}
	return func(yield func(int, int) bool) {
		full := most
		if d == SQLite {
			full = floorPow2(most)
		}
		for lo := 0; lo < n; {
			size := min(full, n-lo)
			if d == SQLite {
				size = floorPow2(size)
			}
			if !yield(lo, lo+size) {
				return
			}
			lo += size
		}
	}
}

// floorPow2 returns the largest power of two not above n (n >= 1).
func floorPow2(n int) int {
	p := 1
	for p <= n/2 {
		p <<= 1
	}
	return p
}

// ValuesList returns rows parenthesized groups of cols placeholders,
// numbered from first: ValuesList(1, 2, 3) is "($1, $2, $3), ($4, $5,
// $6)", the rows of a multi-row INSERT; ValuesList(2, 3, 1) is "($2), ($3),
// ($4)".
func ValuesList(first, rows, cols int) string {
	var b strings.Builder
	b.Grow(rows * cols * 5)
	n := first
	for r := range rows {
		if r > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		for c := range cols {
			if c > 0 {
				b.WriteString(", ")
			}
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			n++
		}
		b.WriteByte(')')
	}
	return b.String()
}

// List returns n placeholders numbered from first and separated by
// commas: List(2, 3) is "$2, $3, $4", the inside of an IN (...) list.
func List(first, n int) string {
	var b strings.Builder
	b.Grow(n * 5)
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('$')
		b.WriteString(strconv.Itoa(first + i))
	}
	return b.String()
}
