//! Cron schedules as CronJobs write them: five fields (minute, hour, day of month, month,
//! day of week) with `*`, `?`, lists, ranges, steps and month and day names, or one of the
//! macros `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`; the times they name, in a
//! time zone.
//!
//! As in the cron library Kubernetes uses, when both day fields are restricted a day
//! matches if either does; when one is `*` (or `?`) both must.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Whether each day field was `*` or `?` (with no step above 1).
    any_day: bool,
    any_weekday: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field: the bits of the values it names, and whether it was a bare `*` or `?`.
fn field(
    text: &str,
    what: &str,
    min: u32,
    max: u32,
    names: &[&str],
) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + min);
        }
        s.parse::<u32>()
            .map_err(|_| format!("invalid {what} {s:?}"))
    };
    let mut bits = 0u64;
    let mut star = false;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                Some(
                    s.parse::<u32>()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| format!("invalid step {s:?} in {what}"))?,
                ),
            ),
            None => (part, None),
        };
        let (lo, hi) = if range == "*" || range == "?" {
            star |= step.is_none_or(|s| s == 1);
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `N/step` runs from N to the end of the range.
            (v, if step.is_some() { max } else { v })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{what} {range:?} is beyond the range {min}-{max}"));
        }
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            match v.checked_add(step) {
                Some(n) => v = n,
                None => break,
            }
        }
    }
    Ok((bits, star))
}

/// Parse a schedule; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<Schedule, String> {
    let text = text.trim();
    if text.starts_with("TZ=") || text.starts_with("CRON_TZ=") {
        return Err("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
    }
    let expanded = match text {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        t if t.starts_with('@') => return Err(format!("unrecognized descriptor: {t}")),
        t => t,
    };
    let f: Vec<&str> = expanded.split_whitespace().collect();
    if f.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {}: {text}",
            f.len()
        ));
    }
    let (minutes, _) = field(f[0], "minute", 0, 59, &[])?;
    let (hours, _) = field(f[1], "hour", 0, 23, &[])?;
    let (days, any_day) = field(f[2], "day of month", 1, 31, &[])?;
    let (months, _) = field(f[3], "month", 1, 12, &MONTHS)?;
    // 0-6 from Sunday: the cron library Kubernetes validates with refuses 7.
    let (weekdays, any_weekday) = field(f[4], "day of week", 0, 6, &WEEKDAYS)?;
    Ok(Schedule {
        minutes,
        hours,
        days,
        months,
        weekdays,
        any_day,
        any_weekday,
    })
}

/// The time zone a CronJob names (`spec.timeZone`), UTC when it names none.
pub fn zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None | Some("") => Ok(TimeZone::UTC),
        Some(n) => TimeZone::get(n).map_err(|_| format!("unknown time zone {n}")),
    }
}

impl Schedule {
    fn day_matches(&self, d: Date) -> bool {
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        if self.any_day || self.any_weekday {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first time after `t` that the schedule names, in `tz`; none within ten years
    /// (a date that never comes, like 30 February).
    pub fn next_after(&self, t: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let start = tz.to_datetime(t);
        let limit = start.year() + 10;
        // The next whole minute.
        let mut dt = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        loop {
            if dt.year() > limit {
                return None;
            }
            let midnight = |d: Date| d.to_datetime(Time::midnight());
            if self.months & (1 << dt.month()) == 0 {
                dt = midnight(dt.date().first_of_month().checked_add(1.month()).ok()?);
                continue;
            }
            if !self.day_matches(dt.date()) {
                dt = midnight(dt.date().tomorrow().ok()?);
                continue;
            }
            if self.hours & (1 << dt.hour()) == 0 {
                dt = hour_start(dt).checked_add(1.hour()).ok()?;
                continue;
            }
            if self.minutes & (1 << dt.minute()) == 0 {
                dt = dt.checked_add(1.minute()).ok()?;
                continue;
            }
            // A time that a daylight-saving change skips does not run (as with Kubernetes'
            // cron library); a repeated one runs at its first occurrence.
            let zoned = tz.to_zoned(dt).ok()?;
            let at = zoned.timestamp();
            if zoned.datetime() == dt && at > t {
                return Some(at);
            }
            dt = dt.checked_add(1.minute()).ok()?;
        }
    }
}

fn hour_start(dt: DateTime) -> DateTime {
    dt.with().minute(0).build().unwrap_or(dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(s: &str, from: &str) -> String {
        parse(s)
            .unwrap()
            .next_after(at(from), &TimeZone::UTC)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn fields_steps_names_and_macros() {
        assert_eq!(
            next("* * * * *", "2026-12-05T10:00:30Z"),
            "2026-12-05T10:01:00Z"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-12-05T10:01:00Z"),
            "2026-12-05T10:15:00Z"
        );
        assert_eq!(
            next("5/20 * * * *", "2026-12-05T10:26:00Z"),
            "2026-12-05T10:45:00Z"
        );
        assert_eq!(
            next("0 9-17/4 * * *", "2026-12-05T13:00:00Z"),
            "2026-12-05T17:00:00Z"
        );
        assert_eq!(
            next("30 2 * * MON-FRI", "2026-12-05T10:00:00Z"),
            "2026-12-07T02:30:00Z"
        );
        assert_eq!(
            next("0 0 1 JAN,jul *", "2026-12-05T00:00:00Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("@hourly", "2026-12-05T10:00:00Z"),
            "2026-12-05T11:00:00Z"
        );
        assert_eq!(
            next("@weekly", "2026-12-05T10:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
        assert_eq!(
            next("0 0 * * 0", "2026-12-05T10:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
        // Leap day: the next one is in 2028.
        assert_eq!(
            next("0 0 29 2 *", "2026-03-01T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
        assert_eq!(next("0 0 30 2 *", "2026-03-01T00:00:00Z"), "");
    }

    #[test]
    fn restricted_day_fields_match_either() {
        // The 13th, or any Friday: Friday 11 December comes first.
        assert_eq!(
            next("0 0 13 * FRI", "2026-12-05T10:00:00Z"),
            "2026-12-11T00:00:00Z"
        );
        // With the day of week `*`, only the 13th.
        assert_eq!(
            next("0 0 13 * *", "2026-12-05T10:00:00Z"),
            "2026-12-13T00:00:00Z"
        );
        // `*/2` restricts the day of month too, so either may match: Sunday the 6th.
        assert_eq!(
            next("0 0 */2 * SUN", "2026-12-05T10:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
    }

    #[test]
    fn bad_schedules_say_why() {
        // Steps run to the end of the field's own range, and a huge one stops there.
        assert!(parse("0 0 * * 1/2").is_ok_and(|s| s.weekdays == 0b10_1010));
        assert!(parse("59/4294967295 * * * *").is_ok_and(|s| s.minutes == 1 << 59));
        for (s, why) in [
            ("* * * *", "expected exactly 5 fields"),
            ("60 * * * *", "beyond the range 0-59"),
            ("* * * FOO *", "invalid month"),
            ("*/0 * * * *", "invalid step"),
            ("5-1 * * * *", "beyond the range"),
            ("@every 5m", "unrecognized descriptor"),
            ("CRON_TZ=UTC * * * * *", "use timeZone field instead"),
            ("0 0 * * 7", "beyond the range 0-6"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn time_zones_and_daylight_saving() {
        let s = parse("30 2 * * *").unwrap();
        let ny = zone(Some("America/New_York")).unwrap();
        // 02:30 does not exist on 8 March 2026 in New York: that day has no run.
        let t = s.next_after(at("2026-03-08T05:00:00Z"), &ny).unwrap();
        assert_eq!(t.to_string(), "2026-03-09T06:30:00Z");
        let t = s.next_after(at("2026-12-05T00:00:00Z"), &ny).unwrap();
        assert_eq!(t.to_string(), "2026-12-05T07:30:00Z");
        assert!(zone(Some("Mars/Olympus_Mons")).is_err());
        assert_eq!(zone(None).unwrap().iana_name(), Some("UTC"));
    }
}
