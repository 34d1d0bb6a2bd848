package sqldb

import (
	"fmt"
	"strings"
	"testing"
)

func TestPositional_RewritesOrderedDollarPlaceholdersOnly(t *testing.T) {
	many := func(format string, n int) string {
		var parts []string
		for i := 1; i <= n; i++ {
			parts = append(parts, fmt.Sprintf(format, i))
		}
		return strings.Join(parts, ", ")
	}
	q20 := "INSERT INTO t VALUES (" + many("$%d", 20) + ")"
	want20 := "INSERT INTO t VALUES (" + strings.Repeat("?, ", 19) + "?)"
	tests := []struct {
		name, in, want string
	}{
		{"few placeholders are left alone", "SELECT $1, $2", "SELECT $1, $2"},
		{"in order, each once", q20, want20},
		{"out of order", "INSERT INTO t VALUES ($2, " + many("$%d", 20)[4:] + ", $1)", "INSERT INTO t VALUES ($2, " + many("$%d", 20)[4:] + ", $1)"},
		{"repeated", q20 + " AND $1", q20 + " AND $1"},
		{"quoted dollars are text", "SELECT '$$ $1 '' $x', \"$col\", [$b], `$c` -- $9\n /* $7 */ ," + many("$%d", 20),
			"SELECT '$$ $1 '' $x', \"$col\", [$b], `$c` -- $9\n /* $7 */ ," + strings.Repeat("?, ", 19) + "?"},
		{"already uses ?", q20 + " AND ?", q20 + " AND ?"},
		{"named parameter", q20 + " AND $21abc", q20 + " AND $21abc"},
		{"unterminated quote", q20 + " '", q20 + " '"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := positional(tt.in); got != tt.want {
				t.Errorf("positional(%q)\n got %q\nwant %q", tt.in, got, tt.want)
			}
		})
	}
}
