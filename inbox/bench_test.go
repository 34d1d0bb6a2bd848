package inbox_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/troupedev/troupe/broker"
	"github.com/troupedev/troupe/inbox"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// BenchmarkInbox measures messages/s through Handler without a broker: the
// broker.Handler is called with batches of synthesized deliveries, and each
// message's handler inserts one row. ns/op is per message.
func BenchmarkInbox(b *testing.B) {
	for _, dialect := range []string{"sqlite", "postgres"} {
		b.Run(dialect, func(b *testing.B) {
			db := openDB(b, dialect)
			ib := newInbox(b, db.DB, inbox.Config{})
			h := ib.Handler("bench", func(ctx context.Context, tx sqldb.Tx, m *message.Message) error {
				return applyEffect(ctx, tx, "bench", m)
			})
			for _, size := range []int{1, 10, 100} {
				b.Run(fmt.Sprintf("batch=%d", size), func(b *testing.B) {
					ctx := context.Background()
					msgs := newMessages(b.N)
					b.ResetTimer()
					for i := 0; i < b.N; i += size {
						batch := deliveries(1, msgs[i:min(i+size, b.N)]...)
						h(ctx, batch)
						for _, d := range batch {
							if s, _, _ := d.Settlement(); s != broker.Acked {
								b.Fatalf("delivery settled %v", s)
							}
						}
					}
					b.StopTimer()
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
				})
			}
		})
	}
}
