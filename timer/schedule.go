package timer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	cron "github.com/netresearch/go-cron"

	"github.com/troupedev/troupe/message"
	"github.com/troupedev/troupe/sqldb"
)

// ErrInvalidSchedule is matched by the error PutScheduleTx returns for a
// schedule that cannot be stored: no name, an invalid cron expression, both
// or neither of Cron and Every, a bad target or message.
var ErrInvalidSchedule = errors.New("timer: invalid schedule")

// ErrUnknownTimeZone is matched (with ErrInvalidSchedule) by the error for
// a Schedule.TimeZone that is not a known IANA zone name.
var ErrUnknownTimeZone = errors.New("timer: unknown time zone")

// MissedPolicy says what a recurring schedule does with occurrences that
// fell due while no scheduler ran (or while the database was down).
type MissedPolicy int

// The missed-occurrence policies. The zero value is MissedFireOnce.
const (
	// MissedFireOnce fires one occurrence for all that were missed, at once,
	// then continues with the first occurrence after now. A job that
	// reconciles state ("send the daily report") wants this.
	MissedFireOnce MissedPolicy = iota
	// MissedSkip drops every occurrence that is more than Schedule.Grace
	// late and continues with the first one that is not: one still within
	// Grace fires at once, else the first occurrence after now. A job
	// whose late run is worthless ("wake the warehouse at 06:00") wants
	// this.
	MissedSkip
	// MissedFireAll fires every missed occurrence, oldest first, one after
	// another, each with its own occurrence time. A job that must account
	// for every period ("bill each hour") wants this.
	MissedFireAll
)

var missedNames = []string{"fire-once", "skip", "fire-all"}

// String returns "fire-once", "skip" or "fire-all".
func (p MissedPolicy) String() string {
	if p >= 0 && int(p) < len(missedNames) {
		return missedNames[p]
	}
	return "MissedPolicy(" + strconv.Itoa(int(p)) + ")"
}

// ParseMissedPolicy returns the policy named "fire-once", "skip" or
// "fire-all".
func ParseMissedPolicy(s string) (MissedPolicy, error) {
	if i := slices.Index(missedNames, s); i >= 0 {
		return MissedPolicy(i), nil
	}
	return 0, fmt.Errorf("%w: missed policy %q: want fire-once, skip or fire-all", ErrInvalidSchedule, s)
}

// DefaultGrace is Schedule.Grace's default.
const DefaultGrace = time.Minute

// A Schedule fires a timer at every occurrence of a cron expression or a
// fixed interval. Each occurrence fires once across every scheduler on the
// database: the schedule keeps one pending timer, for its next occurrence,
// and firing it inserts the following one in the same transaction.
//
// An occurrence's timer id, which is also its message id or its HTTP
// task's idempotency key, is the schedule's name, "@", and the occurrence
// time in UTC (RFC 3339): "daily-report@2026-11-23T06:00:00Z". Its message's
// Time is the occurrence time.
type Schedule struct {
	// Name identifies the schedule; it is stable across deployments.
	// Required.
	Name string

	// Cron is a five-field cron expression (minute hour day-of-month month
	// day-of-week, e.g. "30 6 * * mon-fri") or a descriptor (@hourly,
	// @daily, @weekly, @monthly, @yearly), read in TimeZone. As in
	// crontab(5), when both day fields are restricted a day matching
	// either one occurs ("0 0 1 * mon": the 1st, and every Monday).
	// Exactly one of Cron and Every is set.
	Cron string

	// TimeZone is the IANA name of the zone Cron is read in, e.g.
	// "Europe/Paris". Default "UTC". Across a daylight-saving change, a
	// time that does not exist (02:30 when clocks jump from 02:00 to 03:00)
	// fires at the jump, and a time that occurs twice fires once (at its
	// first instant). A schedule whose hour field is "*" runs every hour
	// and follows real time instead: nothing extra at the jump, and both
	// passes of a repeated hour. Zones come from the machine's zone
	// database; a binary that may run without one embeds Go's with import
	// _ "time/tzdata" (cmd/troupe does).
	TimeZone string

	// Every is a fixed interval: occurrences at Start + k·Every, the same
	// instants on every instance and across restarts. At least 1 s.
	Every time.Duration

	// Start anchors Every. Default: the Unix epoch, so Every: time.Hour
	// fires on the hour (UTC).
	Start time.Time

	// Missed is the policy for occurrences missed during downtime. Default
	// MissedFireOnce.
	Missed MissedPolicy

	// Grace is how late an occurrence may fire before MissedSkip counts it
	// as missed. Default 1 min.
	Grace time.Duration

	// Target is where each occurrence's Message goes (ToTopic or
	// ToHandler). Set Target and Message, or HTTP.
	Target Target

	// Message is the template of each occurrence's message; its ID and
	// Time are set per occurrence.
	Message *message.Message

	// HTTP is the call each occurrence makes; its ID is set per occurrence.
	HTTP *HTTPTask
}

// scheduleDef is a Schedule as stored, in JSON.
type scheduleDef struct {
	Name     string        `json:"name"`
	Cron     string        `json:"cron,omitempty"`
	TimeZone string        `json:"time_zone,omitempty"`
	Every    time.Duration `json:"every,omitempty"`
	Start    time.Time     `json:"start"`
	Missed   string        `json:"missed"`
	Grace    time.Duration `json:"grace"`
	Kind     Kind          `json:"kind"`
	Target   string        `json:"target,omitempty"`
	Message  []byte        `json:"message,omitempty"` // envelope, without id
	HTTP     *HTTPTask     `json:"http,omitempty"`
}

// recurrence yields occurrence times.
type recurrence interface {
	// next returns the first occurrence strictly after t, in UTC, or the
	// zero time when there is none.
	next(t time.Time) time.Time
}

// cronParser reads Schedule.Cron: five fields or a descriptor, the day
// fields combined as crontab(5) does (either matches when both are
// restricted; the library's default is both).
var cronParser = cron.NewParser(cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor | cron.DowOrDom)

// allHours is the hour field's bits for every hour of the day.
const allHours = 1<<24 - 1

type cronRecurrence struct {
	s   cron.Schedule
	loc *time.Location
	// fixedHour is set when the hour field does not match every hour: the
	// schedule names wall-clock times, which a daylight-saving change can
	// skip or repeat. A schedule that runs every hour follows real time.
	fixedHour bool
}

func (c cronRecurrence) next(t time.Time) time.Time {
	for {
		n := c.s.Next(t.In(c.loc))
		if n.IsZero() || !c.fixedHour {
			return n.UTC()
		}
		if jump, ok := c.skippedBy(t, n); ok {
			return jump.UTC()
		}
		if !repeatsWallClock(n) {
			return n.UTC()
		}
		t = n // the second pass of a repeated hour: fired at the first
	}
}

// skippedBy returns the instant the clock jumped forward, after t and not
// after n, when the wall-clock times the jump skipped include one the
// schedule names. The library would run it at the same minute after the
// jump (02:30 becomes 03:30); like ISC cron, it runs at the jump.
func (c cronRecurrence) skippedBy(t, n time.Time) (time.Time, bool) {
	jump, _ := n.ZoneBounds()
	if jump.IsZero() || !jump.After(t) || jump.After(n) {
		return time.Time{}, false
	}
	_, before := jump.Add(-time.Nanosecond).Zone()
	_, after := jump.Zone()
	if after <= before {
		return time.Time{}, false
	}
	// The wall clock went from from to to. Read the schedule on the wall
	// clock itself, written as UTC, where no time is skipped.
	from := time.Unix(jump.Unix()+int64(before), 0).UTC()
	to := time.Unix(jump.Unix()+int64(after), 0).UTC()
	m := c.s.Next(from.Add(-time.Second))
	if m.IsZero() || !m.Before(to) {
		return time.Time{}, false
	}
	return jump, true
}

// repeatsWallClock reports whether n's wall-clock time was also read at an
// earlier instant: n lies in the second pass of an hour that the clock went
// back over.
func repeatsWallClock(n time.Time) bool {
	back, _ := n.ZoneBounds()
	if back.IsZero() {
		return false
	}
	_, before := back.Add(-time.Nanosecond).Zone()
	_, after := n.Zone()
	return before > after && n.Sub(back) < time.Duration(before-after)*time.Second
}

type everyRecurrence struct {
	start time.Time
	every time.Duration
}

func (e everyRecurrence) next(t time.Time) time.Time {
	if t.Before(e.start) {
		return e.start.UTC()
	}
	// t.Sub saturates beyond 292 years: bring start near t first, by
	// whole intervals.
	const span = 100 * 365 * 24 * time.Hour
	start := e.start
	for t.Sub(start) > span {
		start = start.Add(max(span/e.every, 1) * e.every)
	}
	k := t.Sub(start)/e.every + 1
	return start.Add(k * e.every).UTC()
}

// minEvery is the shortest Schedule.Every: a shorter interval would fire
// faster than a missed-occurrence catch-up (MissedFireAll) can go.
const minEvery = time.Second

// recurrence parses the definition's timing.
func (d *scheduleDef) recurrence() (recurrence, error) {
	switch {
	case d.Cron != "" && d.Every != 0:
		return nil, fmt.Errorf("%w: %q sets both Cron and Every", ErrInvalidSchedule, d.Name)
	case d.Every < 0:
		return nil, fmt.Errorf("%w: %q: Every %v is negative", ErrInvalidSchedule, d.Name, d.Every)
	case d.Every > 0 && d.Every < minEvery:
		return nil, fmt.Errorf("%w: %q: Every %v is shorter than %v", ErrInvalidSchedule, d.Name, d.Every, minEvery)
	case d.Every > 0:
		if d.TimeZone != "" {
			return nil, fmt.Errorf("%w: %q: TimeZone applies to Cron only (an interval is the same in every zone)", ErrInvalidSchedule, d.Name)
		}
		return everyRecurrence{start: d.Start, every: d.Every}, nil
	case d.Cron == "":
		return nil, fmt.Errorf("%w: %q sets neither Cron nor Every", ErrInvalidSchedule, d.Name)
	}
	spec := strings.TrimSpace(d.Cron)
	if strings.HasPrefix(spec, "TZ=") || strings.HasPrefix(spec, "CRON_TZ=") {
		return nil, fmt.Errorf("%w: %q: cron %q: put the zone in Schedule.TimeZone, not in the expression", ErrInvalidSchedule, d.Name, d.Cron)
	}
	if strings.HasPrefix(spec, "@every") {
		return nil, fmt.Errorf("%w: %q: cron %q: use Schedule.Every for a fixed interval", ErrInvalidSchedule, d.Name, d.Cron)
	}
	zone := d.TimeZone
	if zone == "" {
		zone = "UTC"
	}
	if zone == "Local" {
		return nil, fmt.Errorf("%w: %w: %q: \"Local\" differs from machine to machine; name the zone", ErrInvalidSchedule, ErrUnknownTimeZone, d.Name)
	}
	loc, err := time.LoadLocation(zone)
	if err != nil {
		return nil, fmt.Errorf("%w: %w: %q: %q: %v", ErrInvalidSchedule, ErrUnknownTimeZone, d.Name, zone, err)
	}
	s, err := cronParser.Parse(spec)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: cron %q: %v", ErrInvalidSchedule, d.Name, d.Cron, err)
	}
	rec := cronRecurrence{s: s, loc: loc}
	if fields, ok := s.(*cron.SpecSchedule); ok {
		rec.fixedHour = fields.Hour&allHours != allHours
	}
	return rec, nil
}

// define checks sch and returns its stored form and recurrence.
func (s *Scheduler) define(sch Schedule) (*scheduleDef, recurrence, error) {
	if sch.Name == "" {
		return nil, nil, fmt.Errorf("%w: empty name", ErrInvalidSchedule)
	}
	if strings.Contains(sch.Name, "@") {
		return nil, nil, fmt.Errorf("%w: name %q contains '@', which separates the name from the occurrence time in timer ids", ErrInvalidSchedule, sch.Name)
	}
	if sch.Missed < MissedFireOnce || sch.Missed > MissedFireAll {
		return nil, nil, fmt.Errorf("%w: %q: unknown missed policy %d", ErrInvalidSchedule, sch.Name, int(sch.Missed))
	}
	if sch.Grace < 0 {
		return nil, nil, fmt.Errorf("%w: %q: Grace %v is negative", ErrInvalidSchedule, sch.Name, sch.Grace)
	}
	d := &scheduleDef{
		Name: sch.Name, Cron: sch.Cron, TimeZone: sch.TimeZone, Every: sch.Every, Start: sch.Start.UTC(),
		Missed: sch.Missed.String(), Grace: sch.Grace,
	}
	if d.Start.IsZero() {
		d.Start = time.Unix(0, 0).UTC()
	}
	if d.Grace == 0 {
		d.Grace = DefaultGrace
	}
	switch {
	case sch.HTTP != nil && (sch.Message != nil || sch.Target != Target{}):
		return nil, nil, fmt.Errorf("%w: %q sets both HTTP and a Target or Message", ErrInvalidSchedule, sch.Name)
	case sch.HTTP != nil:
		task := *sch.HTTP
		task.ID = sch.Name + "@template"
		if err := s.checkTask(&task); err != nil {
			return nil, nil, fmt.Errorf("%w: %q: %w", ErrInvalidSchedule, sch.Name, err)
		}
		task.ID = ""
		d.Kind, d.HTTP = KindHTTP, &task
	default:
		if err := sch.Target.validate(); err != nil {
			return nil, nil, fmt.Errorf("%w: %q: %w", ErrInvalidSchedule, sch.Name, err)
		}
		if sch.Message == nil {
			return nil, nil, fmt.Errorf("%w: %q has a Target but no Message", ErrInvalidSchedule, sch.Name)
		}
		m := sch.Message.Clone()
		m.ID, m.Time = sch.Name+"@template", time.Unix(0, 0).UTC()
		env, err := message.EncodeJSON(m)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %q: message: %w", ErrInvalidSchedule, sch.Name, err)
		}
		d.Kind, d.Target, d.Message = sch.Target.kind, sch.Target.name, env
	}
	rec, err := d.recurrence()
	if err != nil {
		return nil, nil, err
	}
	return d, rec, nil
}

// PutScheduleTx creates the schedule, or replaces the one of the same name,
// in tx. Putting a schedule identical to the stored one changes nothing (its
// pending occurrence stays), so services can put their schedules at every
// start-up, from every instance at once; if the schedule has no pending
// occurrence (its next one could not be planned), it gets its first after
// now. A changed schedule's pending occurrence is replaced by its first
// occurrence after now; one being fired concurrently completes, with no
// successor.
func (s *Scheduler) PutScheduleTx(ctx context.Context, tx sqldb.Tx, sch Schedule) error {
	d, rec, err := s.define(sch)
	if err != nil {
		return err
	}
	now := s.cfg.Clock.Now().UTC()
	first := rec.next(now)
	if first.IsZero() {
		return fmt.Errorf("%w: %q never occurs (cron %q)", ErrInvalidSchedule, sch.Name, sch.Cron)
	}
	def, err := json.Marshal(d)
	if err != nil {
		return fmt.Errorf("timer: encode schedule %q: %w", sch.Name, err)
	}
	old, found, err := readDefinition(ctx, tx, sch.Name)
	if err != nil {
		return err
	}
	if !found {
		n, err := tx.Exec(ctx, `INSERT INTO troupe_schedules (name, definition, created_at, updated_at) VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO NOTHING`, sch.Name, def, now)
		if err != nil {
			return fmt.Errorf("timer: create schedule %q: %w", sch.Name, err)
		}
		if n == 1 {
			return s.insertOccurrence(ctx, tx, d, first)
		}
		// Created by a concurrent Put (another instance starting up), which
		// has committed: go on as if it had been there (PostgreSQL only).
		if old, found, err = readDefinition(ctx, tx, sch.Name); err != nil {
			return err
		}
		if !found {
			return fmt.Errorf("timer: schedule %q was created and deleted concurrently; put it again", sch.Name)
		}
	}
	if bytes.Equal(old, def) {
		var pending int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM troupe_timers WHERE schedule = $1 AND failed_at IS NULL`, sch.Name).Scan(&pending); err != nil {
			return fmt.Errorf("timer: read the pending occurrence of %q: %w", sch.Name, err)
		}
		if pending > 0 {
			return nil
		}
		return s.insertOccurrence(ctx, tx, d, first)
	}
	if _, err := tx.Exec(ctx, `UPDATE troupe_schedules SET definition = $1, updated_at = $2 WHERE name = $3`, def, now, sch.Name); err != nil {
		return fmt.Errorf("timer: update schedule %q: %w", sch.Name, err)
	}
	if err := deletePending(ctx, tx, sch.Name); err != nil {
		return fmt.Errorf("timer: replace the pending occurrence of %q: %w", sch.Name, err)
	}
	return s.insertOccurrence(ctx, tx, d, first)
}

// readDefinition reads the stored definition of the named schedule, locked
// on PostgreSQL until tx ends.
func readDefinition(ctx context.Context, tx sqldb.Tx, name string) ([]byte, bool, error) {
	q := `SELECT definition FROM troupe_schedules WHERE name = $1`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	var def []byte
	err := tx.QueryRow(ctx, q, name).Scan(&def)
	switch {
	case errors.Is(err, sqldb.ErrNoRows):
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("timer: read schedule %q: %w", name, err)
	}
	return def, true, nil
}

// deletePending deletes the pending occurrences of the named schedule (not
// the failed ones, kept for an operator). Call it holding the schedule's
// row lock. On PostgreSQL it skips an occurrence whose row a firing
// transaction holds: that transaction waits for the schedule's row next
// (planNext), so waiting for it here would deadlock. Once tx commits, that
// firing sees the schedule deleted, and drops the occurrence, or replaced,
// and fires it without a successor.
func deletePending(ctx context.Context, tx sqldb.Tx, name string) error {
	q := `DELETE FROM troupe_timers WHERE schedule = $1 AND failed_at IS NULL`
	if tx.Dialect() == sqldb.Postgres {
		q = `DELETE FROM troupe_timers WHERE id IN (
			SELECT id FROM troupe_timers WHERE schedule = $1 AND failed_at IS NULL FOR UPDATE SKIP LOCKED)`
	}
	_, err := tx.Exec(ctx, q, name)
	return err
}

// PutSchedule is PutScheduleTx in a transaction of its own.
func (s *Scheduler) PutSchedule(ctx context.Context, sch Schedule) error {
	return s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error { return s.PutScheduleTx(ctx, tx, sch) })
}

// DeleteScheduleTx deletes the named schedule and its pending occurrence in
// tx, and reports whether it existed. Once tx commits, no occurrence of the
// schedule fires any more: one being fired concurrently either committed
// first (and its successor is deleted here) or finds the schedule gone and
// is dropped. Failed occurrences are kept for an operator (one retried
// with RetryTx is dropped, its schedule gone), and an HTTP call already
// under way may still reach its URL.
func (s *Scheduler) DeleteScheduleTx(ctx context.Context, tx sqldb.Tx, name string) (bool, error) {
	// The schedule's row first, then its timers: the order planNext locks
	// them in.
	n, err := tx.Exec(ctx, `DELETE FROM troupe_schedules WHERE name = $1`, name)
	if err != nil {
		return false, fmt.Errorf("timer: delete schedule %q: %w", name, err)
	}
	if err := deletePending(ctx, tx, name); err != nil {
		return false, fmt.Errorf("timer: delete the pending occurrence of %q: %w", name, err)
	}
	return n == 1, nil
}

// DeleteSchedule is DeleteScheduleTx in a transaction of its own.
func (s *Scheduler) DeleteSchedule(ctx context.Context, name string) (bool, error) {
	var ok bool
	err := s.db.InTx(ctx, func(ctx context.Context, tx sqldb.Tx) error {
		var err error
		ok, err = s.DeleteScheduleTx(ctx, tx, name)
		return err
	})
	return ok, err
}

// occurrenceID is the timer id of a schedule's occurrence at t.
func occurrenceID(name string, t time.Time) string {
	return name + "@" + t.UTC().Format(time.RFC3339Nano)
}

// insertOccurrence stores the timer of d's occurrence at t; an occurrence
// already stored is left as it is.
func (s *Scheduler) insertOccurrence(ctx context.Context, tx sqldb.Tx, d *scheduleDef, t time.Time) error {
	id := occurrenceID(d.Name, t)
	var payload []byte
	if d.Kind == KindHTTP {
		task := *d.HTTP
		task.ID = id
		var err error
		if payload, err = json.Marshal(task); err != nil {
			return fmt.Errorf("timer: encode the HTTP task of %q: %w", id, err)
		}
	} else {
		m, err := message.DecodeJSON(d.Message)
		if err != nil {
			return fmt.Errorf("timer: schedule %q: stored message: %w", d.Name, err)
		}
		m.ID, m.Time = id, t.UTC()
		if payload, err = message.EncodeJSON(m); err != nil {
			return fmt.Errorf("timer: encode the message of %q: %w", id, err)
		}
	}
	err := s.insert(ctx, tx, id, d.Kind, d.Target, t, payload, d.Name)
	if errors.Is(err, ErrExists) {
		return nil
	}
	return err
}

// occurrenceTime reads the occurrence time out of the id of an occurrence
// of the named schedule (see occurrenceID).
func occurrenceTime(id, name string) (time.Time, bool) {
	ts, ok := strings.CutPrefix(id, name+"@")
	if !ok {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, ts)
	return t, err == nil
}

// planNext inserts, in tx, the next occurrence of each recurring schedule
// whose occurrence is among rows, and returns the ids of the occurrences
// not to fire: those MissedSkip drops, and those whose schedule no longer
// exists (retried ones too).
//
// Only an occurrence's first attempt plans its successor (a retried one
// planned it when it first fired), and only if the schedule has no later
// occurrence pending: an occurrence an operator retried (RetryTx), or one
// that a concurrent PutScheduleTx replaced while it was being fired, fires
// without starting a second chain of occurrences.
//
// On PostgreSQL the schedules' rows are locked, in name order, before
// anything is inserted: a concurrent PutScheduleTx or DeleteScheduleTx,
// which locks the schedule's row before its timers' and skips those a
// firing holds (deletePending), either commits first, and is seen here, or
// waits for this transaction and then removes the occurrence inserted
// here.
func (s *Scheduler) planNext(ctx context.Context, tx sqldb.Tx, now time.Time, rows []dueRow) (map[string]bool, error) {
	var names []string
	for _, r := range rows {
		if r.schedule != "" && !slices.Contains(names, r.schedule) {
			names = append(names, r.schedule)
		}
	}
	if len(names) == 0 {
		return nil, nil
	}
	slices.Sort(names) // lock in one order
	args := make([]any, len(names))
	for i, n := range names {
		args[i] = n
	}
	in := sqldb.List(1, len(names))
	q := `SELECT name, definition FROM troupe_schedules WHERE name IN (` + in + `) ORDER BY name`
	if tx.Dialect() == sqldb.Postgres {
		q += ` FOR UPDATE`
	}
	rs, err := tx.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("read schedules: %w", err)
	}
	defs := map[string]*scheduleDef{}
	for rs.Next() {
		var name string
		var raw []byte
		if err := rs.Scan(&name, &raw); err != nil {
			rs.Close()
			return nil, fmt.Errorf("read schedules: %w", err)
		}
		d := &scheduleDef{}
		if err := json.Unmarshal(raw, d); err != nil {
			rs.Close()
			return nil, fmt.Errorf("schedule %q: stored definition: %w", name, err)
		}
		defs[name] = d
	}
	if err := rs.Close(); err != nil {
		return nil, fmt.Errorf("read schedules: %w", err)
	}
	// The latest pending occurrence of each schedule, read under the
	// schedules' locks, which every insert of an occurrence holds.
	latest := map[string]time.Time{}
	rs, err = tx.Query(ctx, `SELECT schedule, id FROM troupe_timers WHERE schedule IN (`+in+`) AND failed_at IS NULL`, args...)
	if err != nil {
		return nil, fmt.Errorf("read pending occurrences: %w", err)
	}
	for rs.Next() {
		var name, id string
		if err := rs.Scan(&name, &id); err != nil {
			rs.Close()
			return nil, fmt.Errorf("read pending occurrences: %w", err)
		}
		if t, ok := occurrenceTime(id, name); ok && t.After(latest[name]) {
			latest[name] = t
		}
	}
	if err := rs.Close(); err != nil {
		return nil, fmt.Errorf("read pending occurrences: %w", err)
	}

	skip := map[string]bool{}
	for _, r := range rows {
		if r.schedule == "" {
			continue
		}
		d := defs[r.schedule]
		if d == nil {
			skip[r.id] = true // the schedule was deleted
			continue
		}
		if r.attempts > 0 {
			continue
		}
		// The occurrence time, from the id: due_at moves when the timer is
		// rescheduled or retried.
		occurred, ok := occurrenceTime(r.id, d.Name)
		if !ok {
			occurred = r.due
		}
		late := now.Sub(r.due)
		policy, _ := ParseMissedPolicy(d.Missed)
		var after time.Time // the successor is the first occurrence after it
		switch policy {
		case MissedFireAll:
			after = occurred
		case MissedSkip:
			if late > d.Grace {
				skip[r.id] = true
				s.log.Info("timer: skipping a missed occurrence", "schedule", d.Name, "occurrence", occurred, "late", late)
			}
			// The first occurrence at most Grace late: it still fires.
			after = now.Add(-d.Grace - time.Nanosecond)
		default:
			after = now
		}
		if after.Before(occurred) {
			after = occurred
		}
		if latest[d.Name].After(occurred) {
			continue // its successor is pending already
		}
		rec, err := d.recurrence()
		if err != nil {
			// Not the whole batch's failure: this occurrence fires, and the
			// schedule resumes when it is put again.
			s.log.Error("timer: cannot plan the next occurrence of a schedule; it stops until put again", "schedule", d.Name, "err", err)
			continue
		}
		next := rec.next(after)
		if next.IsZero() {
			s.log.Warn("timer: schedule has no further occurrence", "schedule", d.Name)
			continue
		}
		if err := s.insertOccurrence(ctx, tx, d, next); err != nil {
			return nil, err
		}
		latest[d.Name] = next
	}
	return skip, nil
}

// ScheduleInfo is a recurring schedule as stored, with its next occurrence.
type ScheduleInfo struct {
	// Name is the schedule's name.
	Name string
	// Cron, TimeZone and Every are its timing.
	Cron, TimeZone string
	// Every is its interval, when it has one.
	Every time.Duration
	// Missed is its policy for missed occurrences.
	Missed MissedPolicy
	// Kind and Target say where its occurrences go.
	Kind Kind
	// Target is the topic or handler name ("" for HTTP).
	Target string
	// Next is the due time of its pending occurrence (zero if none).
	Next time.Time
}

// Schedules lists the stored schedules, by name.
func (s *Scheduler) Schedules(ctx context.Context) ([]ScheduleInfo, error) {
	// A join, not a subquery, so that SQLite keeps due_at's type.
	rs, err := s.db.Query(ctx, `SELECT s.name, s.definition, t.due_at FROM troupe_schedules s
		LEFT JOIN troupe_timers t ON t.schedule = s.name AND t.failed_at IS NULL ORDER BY s.name, t.due_at`)
	if err != nil {
		return nil, fmt.Errorf("timer: list schedules: %w", err)
	}
	var out []ScheduleInfo
	for rs.Next() {
		var name string
		var raw []byte
		var next *time.Time
		if err := rs.Scan(&name, &raw, &next); err != nil {
			rs.Close()
			return nil, fmt.Errorf("timer: list schedules: %w", err)
		}
		if len(out) > 0 && out[len(out)-1].Name == name {
			continue // a later pending occurrence of the same schedule
		}
		var d scheduleDef
		if err := json.Unmarshal(raw, &d); err != nil {
			rs.Close()
			return nil, fmt.Errorf("timer: schedule %q: stored definition: %w", name, err)
		}
		policy, _ := ParseMissedPolicy(d.Missed)
		info := ScheduleInfo{Name: name, Cron: d.Cron, TimeZone: d.TimeZone, Every: d.Every, Missed: policy, Kind: d.Kind, Target: d.Target}
		if next != nil {
			info.Next = next.UTC()
		}
		out = append(out, info)
	}
	if err := rs.Close(); err != nil {
		return nil, fmt.Errorf("timer: list schedules: %w", err)
	}
	return out, nil
}
