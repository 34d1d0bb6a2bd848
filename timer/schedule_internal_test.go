package timer

import (
	"testing"
	"time"
	_ "time/tzdata" // zones from Go's database, not the machine's
)

// nextOccurrences returns the first n occurrences of the schedule after from.
func nextOccurrences(t *testing.T, d scheduleDef, from time.Time, n int) []time.Time {
	t.Helper()
	rec, err := d.recurrence()
	if err != nil {
		t.Fatal(err)
	}
	var out []time.Time
	for at := from; len(out) < n; {
		at = rec.next(at)
		if at.IsZero() {
			t.Fatalf("no occurrence after %s", out[len(out)-1])
		}
		if at.Location() != time.UTC {
			t.Fatalf("occurrence %s is not in UTC", at)
		}
		out = append(out, at)
	}
	return out
}

// parseUTC parses an RFC 3339 time.
func parseUTC(t *testing.T, s string) time.Time {
	t.Helper()
	at, err := time.Parse(time.RFC3339, s)
	if err != nil {
		t.Fatal(err)
	}
	return at.UTC()
}

// wantOccurrences checks got against RFC 3339 times.
func wantOccurrences(t *testing.T, got []time.Time, want ...string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d occurrences %v, want %v", len(got), got, want)
	}
	for i := range want {
		if w := parseUTC(t, want[i]); !got[i].Equal(w) {
			t.Errorf("occurrence %d = %s, want %s", i, got[i].Format(time.RFC3339), want[i])
		}
	}
}

func TestCronRecurrence_NineInNewYorkIsFourteenUTCInWinterAndThirteenInSummer(t *testing.T) {
	d := scheduleDef{Name: "report", Cron: "0 9 * * *", TimeZone: "America/New_York"}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-01-15T00:00:00Z"), 2), "2030-01-15T14:00:00Z", "2030-01-16T14:00:00Z")
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-07-15T00:00:00Z"), 2), "2030-07-15T13:00:00Z", "2030-07-16T13:00:00Z")
	// The day the clocks go forward (2030-03-10) and back (2030-11-03).
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-09T00:00:00Z"), 3), "2030-03-09T14:00:00Z", "2030-03-10T13:00:00Z", "2030-03-11T13:00:00Z")
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-11-02T00:00:00Z"), 3), "2030-11-02T13:00:00Z", "2030-11-03T14:00:00Z", "2030-11-04T14:00:00Z")
}

func TestCronRecurrence_TimeSkippedBySpringForwardFiresOnceAtTheJump(t *testing.T) {
	// On 2030-03-10 New York's clocks go from 02:00 EST to 03:00 EDT
	// (07:00 UTC): 02:30 does not exist that day.
	d := scheduleDef{Name: "night", Cron: "30 2 * * *", TimeZone: "America/New_York"}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-08T12:00:00Z"), 4),
		"2030-03-09T07:30:00Z", // 02:30 EST
		"2030-03-10T07:00:00Z", // the jump, 03:00 EDT
		"2030-03-11T06:30:00Z", // 02:30 EDT
		"2030-03-12T06:30:00Z")
	// From within the day, after the jump: the next day.
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-10T07:00:00Z"), 1), "2030-03-11T06:30:00Z")
	// A time on the hour of the jump, and two of the same day's hours.
	d.Cron = "0 2,4 * * *"
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-10T00:00:00Z"), 3), "2030-03-10T07:00:00Z", "2030-03-10T08:00:00Z", "2030-03-11T06:00:00Z")
}

func TestCronRecurrence_TimeRepeatedByFallBackFiresOnce(t *testing.T) {
	// On 2030-11-03 New York's clocks go back from 02:00 EDT to 01:00 EST
	// (06:00 UTC): 01:30 happens at 05:30 and at 06:30 UTC.
	d := scheduleDef{Name: "night", Cron: "30 1 * * *", TimeZone: "America/New_York"}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-11-02T12:00:00Z"), 3),
		"2030-11-03T05:30:00Z", // 01:30 EDT, the first pass
		"2030-11-04T06:30:00Z", // 01:30 EST, the next day
		"2030-11-05T06:30:00Z")
	// Put during the second pass, after the first pass's 01:30: not today.
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-11-03T06:10:00Z"), 1), "2030-11-04T06:30:00Z")
	// 02:30 is not repeated: once, in EST.
	d.Cron = "30 2 * * *"
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-11-02T12:00:00Z"), 2), "2030-11-03T07:30:00Z", "2030-11-04T07:30:00Z")
}

func TestCronRecurrence_HourlyScheduleFollowsRealTimeAcrossClockChanges(t *testing.T) {
	d := scheduleDef{Name: "hourly", Cron: "30 * * * *", TimeZone: "America/New_York"}
	// Spring forward: one hour apart in real time, nothing extra at the jump.
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-10T05:00:00Z"), 3), "2030-03-10T05:30:00Z", "2030-03-10T06:30:00Z", "2030-03-10T07:30:00Z")
	// Fall back: both passes of 01:30.
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-11-03T05:00:00Z"), 3), "2030-11-03T05:30:00Z", "2030-11-03T06:30:00Z", "2030-11-03T07:30:00Z")
}

func TestCronRecurrence_EitherDayFieldMatchesAsInCrontab(t *testing.T) {
	// 2030-04-01 is a Monday; so are 04-08 and 04-15. May 1st is a Wednesday.
	d := scheduleDef{Name: "d", Cron: "0 0 1 * mon"}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-03-31T12:00:00Z"), 3), "2030-04-01T00:00:00Z", "2030-04-08T00:00:00Z", "2030-04-15T00:00:00Z")
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-04-29T12:00:00Z"), 2), "2030-05-01T00:00:00Z", "2030-05-06T00:00:00Z")
	// One field restricted: that one decides.
	d.Cron = "0 0 * * mon"
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-04-29T12:00:00Z"), 1), "2030-05-06T00:00:00Z")
}

func TestCronRecurrence_DescriptorsAndUTCDefault(t *testing.T) {
	d := scheduleDef{Name: "d", Cron: "@daily"}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-01-01T00:00:00Z"), 2), "2030-01-02T00:00:00Z", "2030-01-03T00:00:00Z")
	d = scheduleDef{Name: "d", Cron: "@hourly", TimeZone: "Asia/Kolkata"} // +05:30
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-01-01T00:00:00Z"), 2), "2030-01-01T00:30:00Z", "2030-01-01T01:30:00Z")
}

func TestEveryRecurrence_OccursAtStartPlusWholeIntervals(t *testing.T) {
	start := parseUTC(t, "2030-01-01T00:03:00Z")
	d := scheduleDef{Name: "e", Every: 7 * time.Minute, Start: start}
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2029-12-31T00:00:00Z"), 2), "2030-01-01T00:03:00Z", "2030-01-01T00:10:00Z")
	// Strictly after: from an occurrence, the next one.
	wantOccurrences(t, nextOccurrences(t, d, start.Add(7*time.Minute), 1), "2030-01-01T00:17:00Z")
	wantOccurrences(t, nextOccurrences(t, d, start.Add(7*time.Minute+time.Nanosecond), 1), "2030-01-01T00:17:00Z")
	// A start centuries away, beyond what a time.Duration spans.
	d.Start = time.Date(1600, 1, 1, 0, 0, 0, 0, time.UTC)
	d.Every = time.Hour
	wantOccurrences(t, nextOccurrences(t, d, parseUTC(t, "2030-06-01T10:20:00Z"), 2), "2030-06-01T11:00:00Z", "2030-06-01T12:00:00Z")
}

func TestOccurrenceTime_ReadsBackTheOccurrenceID(t *testing.T) {
	at := time.Date(2030, 3, 10, 7, 0, 0, 500, time.UTC)
	id := occurrenceID("night", at.In(time.FixedZone("X", 3600)))
	if id != "night@2030-03-10T07:00:00.0000005Z" {
		t.Fatalf("id %q", id)
	}
	got, ok := occurrenceTime(id, "night")
	if !ok || !got.Equal(at) {
		t.Fatalf("occurrenceTime(%q) = %v, %v; want %v", id, got, ok, at)
	}
	if _, ok := occurrenceTime(id, "nigh"); ok {
		t.Fatal("read the time of another schedule's occurrence")
	}
}

func TestCronRecurrence_DaylightSavingEdgesAroundTheWorld(t *testing.T) {
	cases := []struct {
		name, cron, zone, from string
		n                      int
	}{
		{"santiago midnight spring", "0 0 * * *", "America/Santiago", "2024-09-06T12:00:00Z", 4},
		{"santiago midnight fall", "0 0 * * *", "America/Santiago", "2024-04-05T12:00:00Z", 4},
		{"santiago 23:30 fall", "30 23 * * *", "America/Santiago", "2024-04-05T12:00:00Z", 4},
		{"havana midnight spring", "30 0 * * *", "America/Havana", "2024-03-09T12:00:00Z", 3},
		{"lord howe 30min spring", "15 2 * * *", "Australia/Lord_Howe", "2024-10-04T00:00:00Z", 4},
		{"lord howe 30min fall", "45 1 * * *", "Australia/Lord_Howe", "2024-04-05T00:00:00Z", 4},
		{"paris two skipped", "0,30 2 * * *", "Europe/Paris", "2024-03-30T12:00:00Z", 4},
		{"paris quarter skipped", "*/15 2 * * *", "Europe/Paris", "2024-03-30T23:00:00Z", 6},
		{"paris 2-3 range", "30 2-3 * * *", "Europe/Paris", "2024-03-30T23:00:00Z", 4},
		{"paris fall quarter", "*/20 2 * * *", "Europe/Paris", "2024-10-26T23:00:00Z", 6},
	}
	for _, c := range cases {
		d := scheduleDef{Name: "x", Cron: c.cron, TimeZone: c.zone}
		rec, err := d.recurrence()
		if err != nil {
			t.Fatal(err)
		}
		loc, _ := time.LoadLocation(c.zone)
		at := parseUTC(t, c.from)
		s := c.name + ":"
		for i := 0; i < c.n; i++ {
			at = rec.next(at)
			s += " " + at.Format("01-02T15:04Z") + "(" + at.In(loc).Format("15:04 MST") + ")"
		}
		t.Log(s)
	}
}
