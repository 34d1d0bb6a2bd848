package chaos

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/troupedev/troupe/examples/shop/order"
)

// Report is what a run did and found.
type Report struct {
	// Seed reproduces the run's workload and fault schedule.
	Seed uint64
	// Duration is the configured length of the workload; Worked how long
	// it ran, the last fault's recovery included.
	Duration, Worked time.Duration
	// Examples are the examples run.
	Examples []string
	// ShopMode is how the shop ran CreateOrder.
	ShopMode order.Mode
	// Setup says what ran where.
	Setup string
	// Counts are the orders and sagas, by example.
	Counts map[string]Counts
	// Faults counts the faults the harness injected, by kind (FaultKinds);
	// Kills counts the service kills by process.
	Faults, Kills map[string]int
	// Messages sums the node processes' own fault counts.
	Messages NodeStats
	// Clients sums the workload's requests.
	Clients ClientStats
	// Exits lists the times a process exited on its own, and why (it was
	// started again each time). They are not violations: a service may
	// exit when its database is gone, as long as nothing is lost.
	Exits []string
	// DeadLettered counts the messages in the broker's dead-letter topics,
	// by topic: messages a consumer gave up on after its deliveries were
	// spent on the faults (none is poison). Not a violation by itself:
	// what it broke, if anything, shows in the invariants.
	DeadLettered map[string]int
	// Quiesce is how long it took, after the workload, for every order
	// and saga to end and every message to be delivered.
	Quiesce time.Duration
	// Violations lists every broken invariant. A run passes when it is
	// empty.
	Violations []string
	// Stuck describes a few sagas that had not ended when the run gave up
	// waiting for quiescence, to start the search for the cause.
	Stuck []string
	// Dir is where the run's logs were kept (empty when they were removed).
	Dir string
}

// Counts are an example's orders by state, sagas by status and, for the
// choreographed shop, flows by status.
type Counts struct {
	Orders, Sagas, Flows map[string]int
}

// Sagas returns how many business transactions the run ran, over all
// examples: sagas, and the choreographed shop's flows.
func (r *Report) Sagas() int {
	n := 0
	for _, c := range r.Counts {
		for _, v := range c.Sagas {
			n += v
		}
		for _, v := range c.Flows {
			n += v
		}
	}
	return n
}

// Write writes the report; its last line is "violations: N".
func (r *Report) Write(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "  %s\t%s\n", k, fmt.Sprintf(format, args...)) }
	fmt.Fprintf(w, "\nTroupe chaos: seed %d, %v of workload on %s\n", r.Seed, r.Duration, strings.Join(r.Examples, " and "))
	if slices.Contains(r.Examples, Shop) {
		fmt.Fprintf(w, "  the shop's CreateOrder runs %s\n", r.ShopMode)
	}
	fmt.Fprintf(w, "  %s\n\n", r.Setup)
	label := "sagas run"
	if r.ShopMode == order.Choreographed && slices.Contains(r.Examples, Shop) {
		label = "sagas and choreographed flows run"
	}
	row(label, "%d", r.Sagas())
	for _, e := range r.Examples {
		c := r.Counts[e]
		row("  "+e+" orders", "%s", counted(c.Orders))
		if len(c.Flows) > 0 {
			row("  "+e+" flows (choreographed)", "%s", counted(c.Flows))
		} else {
			row("  "+e+" sagas", "%s", counted(c.Sagas))
		}
	}
	row("orders taken over HTTP", "%d (%d seen ending by their client)", r.Clients.Taken, r.Clients.Ended)
	row("  requests failed, sent again", "%d (a process down or restarting; the same Idempotency-Key each time)", r.Clients.Failed)
	row("  orders sent again after their 201", "%d (each must answer with the same order)", r.Clients.Replayed)
	row("faults injected", "")
	for _, k := range FaultKinds {
		v := fmt.Sprint(r.Faults[k])
		if k == FaultKill && len(r.Kills) > 0 {
			v += " (" + counted(r.Kills) + ")"
		}
		row("  "+k, "%s", v)
	}
	row("  messages published twice", "%d of %d published (%d of the copies late; every batch shuffled)",
		r.Messages.Duplicated, r.Messages.Published, r.Messages.Delayed)
	row("  deliveries and calls failed on purpose", "%d", r.Messages.Failed)
	row("messages dead-lettered", "%s", counted(r.DeadLettered))
	row("processes that exited on their own", "%d", len(r.Exits))
	row("time to quiesce", "%.1fs", r.Quiesce.Seconds())
	tw.Flush()
	for _, e := range r.Exits {
		fmt.Fprintf(w, "  exit: %s\n", e)
	}
	for _, v := range r.Violations {
		fmt.Fprintf(w, "  VIOLATION %s\n", v)
	}
	for _, s := range r.Stuck {
		fmt.Fprintf(w, "  stuck: %s\n", s)
	}
	if len(r.Violations) > 0 {
		fmt.Fprintf(w, "  reproduce with: troupe chaos --duration %v --seed %d --examples %s --shop-mode %s\n", r.Duration, r.Seed, strings.Join(r.Examples, ","), r.ShopMode)
		if r.Dir != "" {
			fmt.Fprintf(w, "  the processes' logs are in %s\n", r.Dir)
		}
	}
	fmt.Fprintf(w, "violations: %d\n", len(r.Violations))
}

// counted writes m as "k1 n1, k2 n2" in key order.
func counted(m map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
