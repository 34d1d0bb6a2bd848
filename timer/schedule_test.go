package timer_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	_ "time/tzdata" // zones from Go's database, not the machine's

	"github.com/troupedev/troupe/internal/clocktest"
	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
	"github.com/troupedev/troupe/timer"
)

// occurrenceOf returns the id of the named schedule's occurrence at t.
func occurrenceOf(name string, t time.Time) string {
	return name + "@" + t.UTC().Format(time.RFC3339Nano)
}

// scheduleMsg is a schedule's message template.
func scheduleMsg() *message.Message { return newMsg("template") }

// putSchedule puts sch with s, failing the test on an error.
func putSchedule(t testing.TB, s *timer.Scheduler, sch timer.Schedule) {
	t.Helper()
	if err := s.PutSchedule(context.Background(), sch); err != nil {
		t.Fatal(err)
	}
}

// pendingOccurrences returns the ids of the named schedule's pending (not
// failed) timers, by due time.
func pendingOccurrences(t testing.TB, db *sqldb.DB, name string) []string {
	t.Helper()
	return queryColumn(t, db, `SELECT id FROM troupe_timers WHERE schedule = $1 AND failed_at IS NULL ORDER BY due_at, id`, name)
}

// outboxOrder returns the ids of the outbox's messages, in the order they
// were added.
func outboxOrder(t testing.TB, db *sqldb.DB) []string {
	t.Helper()
	return queryColumn(t, db, `SELECT id FROM troupe_outbox ORDER BY seq`)
}

// effectTimerIDs returns the timer ids of the effects table, sorted.
func effectTimerIDs(t testing.TB, db *sqldb.DB) []string {
	t.Helper()
	ids := queryColumn(t, db, `SELECT timer_id FROM effects`)
	slices.Sort(ids)
	return ids
}

// queryColumn returns the one text column that q selects.
func queryColumn(t testing.TB, db *sqldb.DB, q string, args ...any) []string {
	t.Helper()
	rs, err := db.Query(context.Background(), q, args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	out := []string{}
	for rs.Next() {
		var s string
		if err := rs.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// waitForList waits until get returns want.
func waitForList(t testing.TB, what string, want []string, get func() []string) {
	t.Helper()
	var got []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		if got = get(); slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: have %q, want %q", what, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// scheduleWarnings is a slog.Handler that records the scheduler's log
// lines at Warn and above.
type scheduleWarnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *scheduleWarnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *scheduleWarnings) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		msg += " " + a.String()
		return true
	})
	w.msgs = append(w.msgs, msg)
	return nil
}
func (w *scheduleWarnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *scheduleWarnings) WithGroup(string) slog.Handler      { return w }

func (w *scheduleWarnings) lines() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.msgs)
}

func TestSchedule_CronFiresEachOccurrenceOnceWithItsIDAndTime(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			putSchedule(t, s, timer.Schedule{Name: "ticks", Cron: "*/5 * * * *", Target: timer.ToTopic("ticks"), Message: scheduleMsg()})
			run(t, s)
			var want []string
			for k := 1; k <= 6; k++ {
				at := t0.Add(time.Duration(5*k) * time.Minute)
				clock.Set(at)
				want = append(want, occurrenceOf("ticks", at))
				waitForList(t, "the occurrences in the outbox", want, func() []string { return outboxOrder(t, db) })
			}
			// Each message is its occurrence: its id and its time.
			rs, err := db.Query(context.Background(), `SELECT envelope FROM troupe_outbox ORDER BY seq`)
			if err != nil {
				t.Fatal(err)
			}
			defer rs.Close()
			for k := 1; rs.Next(); k++ {
				var env []byte
				if err := rs.Scan(&env); err != nil {
					t.Fatal(err)
				}
				m, err := message.DecodeJSON(env)
				if err != nil {
					t.Fatal(err)
				}
				at := t0.Add(time.Duration(5*k) * time.Minute)
				if m.ID != occurrenceOf("ticks", at) || !m.Time.Equal(at) || m.Type != scheduleMsg().Type {
					t.Errorf("message %d: id %q, time %s, type %q; want %q at %s", k, m.ID, m.Time, m.Type, occurrenceOf("ticks", at), at)
				}
			}
			if got, want := pendingOccurrences(t, db, "ticks"), []string{occurrenceOf("ticks", t0.Add(35*time.Minute))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q", got, want)
			}
		})
	}
}

func TestSchedule_CronInATimeZoneFiresAtTheZonesWallClockAcrossDaylightSaving(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			// New York's clocks go forward on 2030-03-10, at 07:00 UTC.
			start := time.Date(2030, 3, 9, 12, 0, 0, 0, time.UTC)
			clock := clocktest.New(start)
			s := newScheduler(t, db, timer.Config{Clock: clock})
			putSchedule(t, s, timer.Schedule{Name: "report", Cron: "0 9 * * *", TimeZone: "America/New_York", Target: timer.ToTopic("t"), Message: scheduleMsg()})
			putSchedule(t, s, timer.Schedule{Name: "night", Cron: "30 2 * * *", TimeZone: "America/New_York", Target: timer.ToTopic("t"), Message: scheduleMsg()})
			infos, err := s.Schedules(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			winter9 := time.Date(2030, 3, 9, 14, 0, 0, 0, time.UTC)
			jump := time.Date(2030, 3, 10, 7, 0, 0, 0, time.UTC)
			summer9 := time.Date(2030, 3, 10, 13, 0, 0, 0, time.UTC)
			if len(infos) != 2 || infos[0].Name != "night" || !infos[0].Next.Equal(jump) || infos[1].Name != "report" || !infos[1].Next.Equal(winter9) {
				t.Fatalf("Schedules() = %+v; want night next at %s, report at %s", infos, jump, winter9)
			}
			if infos[1].TimeZone != "America/New_York" || infos[1].Cron != "0 9 * * *" {
				t.Fatalf("report listed as %+v", infos[1])
			}
			run(t, s)
			want := []string{}
			for _, step := range []struct {
				at   time.Time
				name string
			}{{winter9, "report"}, {jump, "night"}, {summer9, "report"}} {
				clock.Set(step.at)
				want = append(want, occurrenceOf(step.name, step.at))
				waitForList(t, "the occurrences in the outbox", want, func() []string { return outboxOrder(t, db) })
			}
			if got, want := pendingOccurrences(t, db, "night"), []string{occurrenceOf("night", time.Date(2030, 3, 11, 6, 30, 0, 0, time.UTC))}; !slices.Equal(got, want) {
				t.Fatalf("night pending %q, want %q (02:30 EDT)", got, want)
			}
		})
	}
}

func TestSchedule_EveryFiresEachOccurrenceOnceAcrossTwoSchedulers(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			db1, url := openDB(t, kind)
			db2, err := sqldb.Open(ctx, url, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db2.Close() })
			clock := newClock()
			start := t0.Add(3 * time.Minute)
			const every = 7 * time.Minute
			sch := timer.Schedule{Name: "sweep", Every: every, Start: start, Target: timer.ToHandler("sweep"), Message: scheduleMsg()}
			var scheds []*timer.Scheduler
			for i, db := range []*sqldb.DB{db1, db2} {
				s := newScheduler(t, db, timer.Config{Clock: clock, Owner: []string{"a", "b"}[i]})
				if err := s.Handle("sweep", recordEffect([]string{"a", "b"}[i])); err != nil {
					t.Fatal(err)
				}
				scheds = append(scheds, s)
			}
			// Both instances start up at once and put their schedules.
			errs := make(chan error, 2)
			for _, s := range scheds {
				go func() { errs <- s.PutSchedule(ctx, sch) }()
			}
			for range scheds {
				if err := <-errs; err != nil {
					t.Fatalf("PutSchedule from a second instance: %v", err)
				}
			}
			if n := countRows(t, db1, `SELECT count(*) FROM troupe_schedules`); n != 1 {
				t.Fatalf("%d schedules stored, want 1", n)
			}
			if got, want := pendingOccurrences(t, db1, "sweep"), []string{occurrenceOf("sweep", start)}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q", got, want)
			}
			for _, s := range scheds {
				run(t, s)
			}
			var want []string
			for k := range 5 {
				at := start.Add(time.Duration(k) * every)
				clock.Set(at)
				want = append(want, occurrenceOf("sweep", at))
				slices.Sort(want)
				waitForList(t, "one effect per occurrence", want, func() []string { return effectTimerIDs(t, db1) })
			}
			if got, want := pendingOccurrences(t, db1, "sweep"), []string{occurrenceOf("sweep", start.Add(5*every))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q", got, want)
			}
		})
	}
}

func TestSchedule_MissedOccurrencesAfterDowntimeFollowThePolicy(t *testing.T) {
	const every = 10 * time.Minute
	at := func(m int) time.Time { return t0.Add(time.Duration(m) * time.Minute) }
	ids := func(ms ...int) []string {
		out := []string{}
		for _, m := range ms {
			out = append(out, occurrenceOf("p", at(m)))
		}
		return out
	}
	cases := []struct {
		name   string
		missed timer.MissedPolicy
		grace  time.Duration
		// fired is what fires at 01:05, after downtime since 00:00.
		fired []string
	}{
		{"fire-once fires the first missed occurrence only", timer.MissedFireOnce, 0, ids(10)},
		{"skip fires none of those more than Grace late", timer.MissedSkip, 0, ids()},
		{"skip fires those less than Grace late", timer.MissedSkip, 30 * time.Minute, ids(40, 50, 60)},
		{"fire-all fires every missed occurrence in order", timer.MissedFireAll, 0, ids(10, 20, 30, 40, 50, 60)},
	}
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					db, _ := openDB(t, kind)
					clock := newClock()
					s := newScheduler(t, db, timer.Config{Clock: clock})
					sch := timer.Schedule{Name: "p", Every: every, Missed: c.missed, Grace: c.grace, Target: timer.ToTopic("t"), Message: scheduleMsg()}
					putSchedule(t, s, sch)
					clock.Set(at(65)) // no scheduler ran meanwhile
					// The service starts again and puts its schedules, as
					// at every start-up: the same definition keeps the
					// backlog as it was.
					putSchedule(t, s, sch)
					run(t, s)
					// Then it goes on with the first occurrence after now.
					waitForList(t, "the next occurrence", ids(70), func() []string { return pendingOccurrences(t, db, "p") })
					if got := outboxOrder(t, db); !slices.Equal(got, c.fired) {
						t.Fatalf("fired %q after the downtime, want %q", got, c.fired)
					}
					clock.Set(at(70))
					waitForList(t, "the occurrence after the downtime", append(c.fired, ids(70)...), func() []string { return outboxOrder(t, db) })
				})
			}
		})
	}
}

func TestPutSchedule_SameDefinitionKeepsTheOccurrenceAChangedOneReplacesItAndDeleteRemovesIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			hourly := timer.Schedule{Name: "a", Cron: "0 * * * *", Target: timer.ToTopic("t"), Message: scheduleMsg()}
			putSchedule(t, s, hourly)
			want := []string{occurrenceOf("a", t0.Add(time.Hour))}
			if got := pendingOccurrences(t, db, "a"); !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q", got, want)
			}

			// Put again, at a later start-up: nothing changes.
			clock.Set(t0.Add(10 * time.Minute))
			putSchedule(t, s, timer.Schedule{Name: "a", Cron: "0 * * * *", Target: timer.ToTopic("t"), Message: scheduleMsg()})
			if got := pendingOccurrences(t, db, "a"); !slices.Equal(got, want) {
				t.Fatalf("pending %q after the same Put, want %q", got, want)
			}

			// Changed: its first occurrence after now replaces the pending one.
			clock.Set(t0.Add(30 * time.Minute))
			changed := hourly
			changed.Cron = "*/20 * * * *"
			putSchedule(t, s, changed)
			if got, want := pendingOccurrences(t, db, "a"), []string{occurrenceOf("a", t0.Add(40*time.Minute))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q after a changed Put, want %q", got, want)
			}
			putSchedule(t, s, timer.Schedule{Name: "b", Every: 15 * time.Minute, Missed: timer.MissedSkip, Target: timer.ToTopic("t"), Message: scheduleMsg()})
			infos, err := s.Schedules(ctx)
			if err != nil {
				t.Fatal(err)
			}
			wantInfos := []timer.ScheduleInfo{
				{Name: "a", Cron: "*/20 * * * *", Kind: timer.KindTopic, Target: "t", Next: t0.Add(40 * time.Minute)},
				{Name: "b", Every: 15 * time.Minute, Missed: timer.MissedSkip, Kind: timer.KindTopic, Target: "t", Next: t0.Add(45 * time.Minute)},
			}
			for i := range min(len(infos), len(wantInfos)) {
				if infos[i].Next.Equal(wantInfos[i].Next) {
					infos[i].Next = wantInfos[i].Next // the same instant, maybe another *Location
				}
			}
			if !slices.Equal(infos, wantInfos) {
				t.Fatalf("Schedules() = %+v\nwant %+v", infos, wantInfos)
			}

			ok, err := s.DeleteSchedule(ctx, "a")
			if err != nil || !ok {
				t.Fatalf("DeleteSchedule = %v, %v; want true", ok, err)
			}
			if got := pendingOccurrences(t, db, "a"); len(got) != 0 {
				t.Fatalf("pending %q after DeleteSchedule", got)
			}
			if ok, err := s.DeleteSchedule(ctx, "a"); err != nil || ok {
				t.Fatalf("DeleteSchedule again = %v, %v; want false", ok, err)
			}
			if infos, err := s.Schedules(ctx); err != nil || len(infos) != 1 || infos[0].Name != "b" {
				t.Fatalf("Schedules() after the delete = %+v, %v; want b alone", infos, err)
			}

			// Nothing of a fires any more: b's occurrences show the
			// scheduler ran past a's.
			run(t, s)
			clock.Set(t0.Add(2 * time.Hour))
			waitForList(t, "b's next occurrence", []string{occurrenceOf("b", t0.Add(2*time.Hour+15*time.Minute))}, func() []string { return pendingOccurrences(t, db, "b") })
			// (b skips 00:45, late, and fires 02:00, on time.)
			if got, want := outboxOrder(t, db), []string{occurrenceOf("b", t0.Add(2*time.Hour))}; !slices.Equal(got, want) {
				t.Fatalf("outbox %q; want %q alone", got, want)
			}
		})
	}
}

func TestPutSchedule_SameDefinitionRearmsAScheduleWithoutAPendingOccurrence(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			sch := timer.Schedule{Name: "a", Every: time.Hour, Target: timer.ToTopic("t"), Message: scheduleMsg()}
			putSchedule(t, s, sch)
			if ok, err := s.Cancel(context.Background(), occurrenceOf("a", t0.Add(time.Hour))); err != nil || !ok {
				t.Fatalf("Cancel = %v, %v", ok, err)
			}
			clock.Set(t0.Add(90 * time.Minute))
			putSchedule(t, s, sch)
			if got, want := pendingOccurrences(t, db, "a"), []string{occurrenceOf("a", t0.Add(2*time.Hour))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q", got, want)
			}
		})
	}
}

func TestPutSchedule_RefusesAnInvalidScheduleWithAClearError(t *testing.T) {
	ok := func() timer.Schedule {
		return timer.Schedule{Name: "job", Cron: "0 9 * * *", Target: timer.ToTopic("t"), Message: scheduleMsg()}
	}
	with := func(f func(*timer.Schedule)) timer.Schedule { s := ok(); f(&s); return s }
	cases := []struct {
		name     string
		sch      timer.Schedule
		wantErr  []error
		mentions string
	}{
		{"invalid cron", with(func(s *timer.Schedule) { s.Cron = "61 * * * *" }), nil, `"61 * * * *"`},
		{"cron with too few fields", with(func(s *timer.Schedule) { s.Cron = "0 9 * *" }), nil, `"0 9 * *"`},
		{"unknown time zone", with(func(s *timer.Schedule) { s.TimeZone = "Mars/Olympus_Mons" }), []error{timer.ErrUnknownTimeZone}, "Mars/Olympus_Mons"},
		{"the machine's zone", with(func(s *timer.Schedule) { s.TimeZone = "Local" }), []error{timer.ErrUnknownTimeZone}, "Local"},
		{"both Cron and Every", with(func(s *timer.Schedule) { s.Every = time.Hour }), nil, "both Cron and Every"},
		{"neither Cron nor Every", with(func(s *timer.Schedule) { s.Cron = "" }), nil, "neither"},
		{"negative Every", with(func(s *timer.Schedule) { s.Cron, s.Every = "", -time.Hour }), nil, "negative"},
		{"sub-second Every", with(func(s *timer.Schedule) { s.Cron, s.Every = "", time.Millisecond }), nil, "1ms"},
		{"zone with Every", with(func(s *timer.Schedule) { s.Cron, s.Every, s.TimeZone = "", time.Hour, "Europe/Paris" }), nil, "TimeZone"},
		{"TZ= in the expression", with(func(s *timer.Schedule) { s.Cron = "TZ=Europe/Paris 0 9 * * *" }), nil, "Schedule.TimeZone"},
		{"CRON_TZ= in the expression", with(func(s *timer.Schedule) { s.Cron = "CRON_TZ=Europe/Paris 0 9 * * *" }), nil, "Schedule.TimeZone"},
		{"@every in Cron", with(func(s *timer.Schedule) { s.Cron = "@every 1h" }), nil, "Schedule.Every"},
		{"name with @", with(func(s *timer.Schedule) { s.Name = "daily@9" }), nil, `"daily@9"`},
		{"empty name", with(func(s *timer.Schedule) { s.Name = "" }), nil, "empty name"},
		{"Target without Message", with(func(s *timer.Schedule) { s.Message = nil }), nil, "no Message"},
		{"Message without Target", with(func(s *timer.Schedule) { s.Target = timer.Target{} }), []error{timer.ErrInvalidTimer}, "target"},
		{"HTTP with a Target", with(func(s *timer.Schedule) { s.HTTP = &timer.HTTPTask{URL: "http://127.0.0.1:1/x"} }), nil, "both HTTP"},
		{"HTTP without a URL", timer.Schedule{Name: "job", Every: time.Hour, HTTP: &timer.HTTPTask{}}, []error{timer.ErrInvalidTimer}, "URL"},
		{"a cron that never occurs", with(func(s *timer.Schedule) { s.Cron = "0 0 30 2 *" }), nil, "never occurs"},
		{"negative Grace", with(func(s *timer.Schedule) { s.Grace = -time.Second }), nil, "Grace"},
		{"unknown missed policy", with(func(s *timer.Schedule) { s.Missed = 7 }), nil, "missed policy"},
	}
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			s := newScheduler(t, db, timer.Config{Clock: newClock()})
			for _, c := range cases {
				err := s.PutSchedule(context.Background(), c.sch)
				for _, want := range append([]error{timer.ErrInvalidSchedule}, c.wantErr...) {
					if !errors.Is(err, want) {
						t.Errorf("%s: err %v, want %v", c.name, err, want)
					}
				}
				if err != nil && !strings.Contains(err.Error(), c.mentions) {
					t.Errorf("%s: error %q does not mention %s", c.name, err, c.mentions)
				}
			}
			if n := countRows(t, db, `SELECT count(*) FROM troupe_schedules`) + countRows(t, db, `SELECT count(*) FROM troupe_timers`); n != 0 {
				t.Fatalf("%d rows stored by refused schedules", n)
			}
			putSchedule(t, s, ok()) // and the valid one is accepted
		})
	}
}

func TestSchedule_RetriedHandlerOccurrencePlansItsSuccessorOnce(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, Backoff: func(int) time.Duration { return 15 * time.Minute }})
			first := occurrenceOf("p", t0.Add(10*time.Minute))
			if err := s.Handle("flaky", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				if f.ID == first && f.Attempt == 1 {
					return errors.New("not yet")
				}
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			// MissedFireAll plans from the occurrence time: an occurrence
			// that planned again when retried would bring back 00:20.
			putSchedule(t, s, timer.Schedule{Name: "p", Every: 10 * time.Minute, Missed: timer.MissedFireAll, Target: timer.ToHandler("flaky"), Message: scheduleMsg()})
			run(t, s)
			clock.Set(t0.Add(10 * time.Minute)) // 00:10 fails; retried at 00:25
			waitFor(t, "the failed first attempt", func() bool {
				return countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE id = $1 AND attempts = 1`, first) == 1
			})
			clock.Set(t0.Add(20 * time.Minute)) // 00:20 fires
			waitForList(t, "00:20's effect", []string{occurrenceOf("p", t0.Add(20*time.Minute))}, func() []string { return effectTimerIDs(t, db) })
			clock.Set(t0.Add(25 * time.Minute)) // 00:10 succeeds
			want := []string{first, occurrenceOf("p", t0.Add(20*time.Minute))}
			waitForList(t, "00:10's effect", want, func() []string { return effectTimerIDs(t, db) })
			if got, want := pendingOccurrences(t, db, "p"), []string{occurrenceOf("p", t0.Add(30*time.Minute))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q alone", got, want)
			}
		})
	}
}

func TestSchedule_OperatorRetryOfAFailedOccurrenceStartsNoSecondChain(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			ctx := context.Background()
			db, _ := openDB(t, kind)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock})
			first := occurrenceOf("p", t0.Add(10*time.Minute))
			var mu sync.Mutex
			broken := true
			if err := s.Handle("job", func(ctx context.Context, tx sqldb.Tx, f *timer.Fired) error {
				mu.Lock()
				defer mu.Unlock()
				if broken && f.ID == first {
					return timer.Permanent(errors.New("broken"))
				}
				return recordEffect("")(ctx, tx, f)
			}); err != nil {
				t.Fatal(err)
			}
			putSchedule(t, s, timer.Schedule{Name: "p", Every: 10 * time.Minute, Missed: timer.MissedFireAll, Target: timer.ToHandler("job"), Message: scheduleMsg()})
			run(t, s)
			clock.Set(t0.Add(10 * time.Minute))
			waitFor(t, "the failed occurrence", func() bool {
				return countRows(t, db, `SELECT count(*) FROM troupe_timers WHERE id = $1 AND failed_at IS NOT NULL`, first) == 1
			})
			clock.Set(t0.Add(20 * time.Minute))
			waitForList(t, "00:20's effect", []string{occurrenceOf("p", t0.Add(20*time.Minute))}, func() []string { return effectTimerIDs(t, db) })
			clock.Set(t0.Add(25 * time.Minute))
			mu.Lock()
			broken = false
			mu.Unlock()
			if ok, err := s.Retry(ctx, first); err != nil || !ok {
				t.Fatalf("Retry = %v, %v", ok, err)
			}
			s.Notify() // the clock stands still: no poll would find it
			want := []string{first, occurrenceOf("p", t0.Add(20*time.Minute))}
			waitForList(t, "00:10's effect", want, func() []string { return effectTimerIDs(t, db) })
			if got, want := pendingOccurrences(t, db, "p"), []string{occurrenceOf("p", t0.Add(30*time.Minute))}; !slices.Equal(got, want) {
				t.Fatalf("pending %q, want %q alone", got, want)
			}
		})
	}
}

func TestSchedule_HTTPOccurrenceCallsTheURLWithItsIDAsIdempotencyKey(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			var mu sync.Mutex
			var keys []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				defer mu.Unlock()
				if r.URL.Path == "/sweep" && r.Method == http.MethodPut {
					keys = append(keys, r.Header.Get(timer.IdempotencyKeyHeader))
				}
			}))
			t.Cleanup(srv.Close)
			clock := newClock()
			s := newScheduler(t, db, timer.Config{Clock: clock, HTTPClient: srv.Client()})
			putSchedule(t, s, timer.Schedule{Name: "h", Every: 10 * time.Minute, HTTP: &timer.HTTPTask{Method: http.MethodPut, URL: srv.URL + "/sweep"}})
			run(t, s)
			var want []string
			for k := 1; k <= 3; k++ {
				at := t0.Add(time.Duration(10*k) * time.Minute)
				clock.Set(at)
				want = append(want, occurrenceOf("h", at))
				// The call's outcome is recorded, and the next occurrence
				// pending, before the clock moves on.
				waitForList(t, "the next occurrence alone", []string{occurrenceOf("h", at.Add(10*time.Minute))}, func() []string { return pendingOccurrences(t, db, "h") })
				waitForList(t, "the calls", want, func() []string { mu.Lock(); defer mu.Unlock(); return slices.Clone(keys) })
			}
		})
	}
}

// holdScheduleLock runs fn in a transaction that first puts sch unchanged,
// which on PostgreSQL locks the schedule's row; with the clock then at due,
// it waits until a firing transaction waits for that lock, so fn runs while
// a scheduler holds the due occurrence.
func holdScheduleLock(t *testing.T, db *sqldb.DB, s *timer.Scheduler, clock *clocktest.Clock, due time.Time, sch timer.Schedule, fn func(ctx context.Context, tx sqldb.Tx) error) {
	t.Helper()
	err := db.InTx(context.Background(), func(ctx context.Context, tx sqldb.Tx) error {
		if err := s.PutScheduleTx(ctx, tx, sch); err != nil {
			return err
		}
		clock.Set(due)
		if db.Dialect() == sqldb.Postgres {
			waitFor(t, "a firing waiting for the schedule's row", func() bool {
				return countRows(t, db, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) > 0
			})
		}
		return fn(ctx, tx)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestDeleteSchedule_WhileAnOccurrenceIsBeingFiredNeitherDeadlocksNorFiresIt(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			warnings := &scheduleWarnings{}
			s := newScheduler(t, db, timer.Config{Clock: clock, Logger: slog.New(warnings)})
			if err := s.Handle("job", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			sch := timer.Schedule{Name: "p", Every: 10 * time.Minute, Target: timer.ToHandler("job"), Message: scheduleMsg()}
			putSchedule(t, s, sch)
			run(t, s)
			holdScheduleLock(t, db, s, clock, t0.Add(10*time.Minute), sch, func(ctx context.Context, tx sqldb.Tx) error {
				ok, err := s.DeleteScheduleTx(ctx, tx, "p")
				if err == nil && !ok {
					t.Error("DeleteScheduleTx found no schedule")
				}
				return err
			})
			waitFor(t, "the occurrence dropped", func() bool { return countRows(t, db, `SELECT count(*) FROM troupe_timers`) == 0 })
			if got := effectTimerIDs(t, db); len(got) != 0 {
				t.Fatalf("effects %q of a deleted schedule", got)
			}
			if w := warnings.lines(); len(w) != 0 {
				t.Fatalf("warnings: %q", w)
			}
		})
	}
}

func TestPutSchedule_ChangedWhileAnOccurrenceIsBeingFiredNeitherDeadlocksNorForks(t *testing.T) {
	for _, kind := range dialects {
		t.Run(kind, func(t *testing.T) {
			db, _ := openDB(t, kind)
			clock := newClock()
			warnings := &scheduleWarnings{}
			s := newScheduler(t, db, timer.Config{Clock: clock, Logger: slog.New(warnings)})
			if err := s.Handle("job", recordEffect("")); err != nil {
				t.Fatal(err)
			}
			sch := timer.Schedule{Name: "p", Every: 10 * time.Minute, Missed: timer.MissedFireAll, Target: timer.ToHandler("job"), Message: scheduleMsg()}
			putSchedule(t, s, sch)
			run(t, s)
			changed := sch
			changed.Every, changed.Start = 15*time.Minute, t0.Add(time.Minute) // 00:01, 00:16, ...
			holdScheduleLock(t, db, s, clock, t0.Add(10*time.Minute), sch, func(ctx context.Context, tx sqldb.Tx) error {
				return s.PutScheduleTx(ctx, tx, changed)
			})
			// On PostgreSQL the occurrence was being fired: it completes. On
			// SQLite the Put came first and replaced it.
			var want []string
			if kind == "postgres" {
				want = []string{occurrenceOf("p", t0.Add(10*time.Minute))}
			}
			waitForList(t, "the fired occurrences", want, func() []string { return effectTimerIDs(t, db) })
			// Either way the changed schedule's first occurrence is its only
			// one: none was planned from the old one.
			waitForList(t, "the pending occurrences", []string{occurrenceOf("p", t0.Add(16*time.Minute))}, func() []string { return pendingOccurrences(t, db, "p") })
			if w := warnings.lines(); len(w) != 0 {
				t.Fatalf("warnings: %q", w)
			}
		})
	}
}
