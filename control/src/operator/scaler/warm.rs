//! Warm windows: five-field cron schedules in UTC and the replica floor they raise.
//!
//! A window is open at `t` when some minute in `(t - duration, t]` matches its schedule. The
//! matcher understands `*`, lists, ranges, `*/n` and `a-b/n` steps (and `a/n`, meaning
//! `a-max/n`), day-of-week 0 and 7 both Sunday, and Vixie cron's rule for days: when both
//! day-of-month and day-of-week are restricted (neither starts with `*`), either may match.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::DateTime;
use k8s_openapi::jiff::tz::TimeZone;

use crate::crd::Scaling;
use crate::crd::duration;

/// The replicas a pool keeps at `now`: `minReplicas`, or more while a warm window is open;
/// never above `maxReplicas`. A window that does not parse raises nothing (validation reports it).
pub fn floor(scaling: &Scaling, now: Timestamp) -> i32 {
    let warm = scaling
        .warm_windows
        .iter()
        .filter(|w| {
            let schedule = Schedule::parse(&w.schedule);
            let length = duration::parse(&w.duration);
            matches!((schedule, length), (Ok(s), Ok(d)) if s.open(d, now))
        })
        .map(|w| w.min_replicas)
        .max()
        .unwrap_or(0);
    scaling
        .min_replicas
        .max(warm)
        .min(scaling.max_replicas)
        .max(0)
}

/// A parsed schedule: one bit per allowed value of each field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    /// Bit 0 is Sunday (7 is folded onto it).
    days_of_week: u64,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// A schedule that is not five valid cron fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadSchedule(String);

/// Windows longer than this are treated as this long (the search is bounded).
const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, BadSchedule> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(BadSchedule(format!("{text:?} does not have five fields")));
        };
        let mut days_of_week = field(dow, 0, 7)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(Self {
            minutes: field(minute, 0, 59)?,
            hours: field(hour, 0, 23)?,
            days_of_month: field(dom, 1, 31)?,
            months: field(month, 1, 12)?,
            days_of_week,
            dom_restricted: !dom.starts_with('*'),
            dow_restricted: !dow.starts_with('*'),
        })
    }

    /// Whether the minute `at` falls in matches.
    pub fn matches(&self, at: DateTime) -> bool {
        self.day_matches(at) && bit(self.hours, at.hour()) && bit(self.minutes, at.minute())
    }

    /// Whether some minute in `(at - length, at]` matches.
    pub fn open(&self, length: Duration, at: Timestamp) -> bool {
        let length = i64::try_from(length.min(LONGEST).as_secs()).unwrap_or(i64::MAX);
        let now = at.as_second();
        // Minutes are counted from the epoch; minute m starts at second 60 m.
        let last = now.div_euclid(60);
        let first = (now - length).div_euclid(60) + 1;
        let mut m = last;
        while m >= first {
            let Ok(ts) = Timestamp::from_second(m * 60) else {
                return false;
            };
            let civil = TimeZone::UTC.to_datetime(ts);
            let into_day = i64::from(civil.hour()) * 60 + i64::from(civil.minute());
            if !self.day_matches(civil) {
                m -= into_day + 1; // the last minute of the day before
            } else if !bit(self.hours, civil.hour()) {
                m -= i64::from(civil.minute()) + 1; // the last minute of the hour before
            } else if !bit(self.minutes, civil.minute()) {
                m -= 1;
            } else {
                return true;
            }
        }
        false
    }

    fn day_matches(&self, at: DateTime) -> bool {
        if !bit(self.months, at.month()) {
            return false;
        }
        let dom = bit(self.days_of_month, at.day());
        let dow = bit(self.days_of_week, at.weekday().to_sunday_zero_offset());
        if self.dom_restricted && self.dow_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }
}

fn bit(set: u64, value: i8) -> bool {
    u32::try_from(value).is_ok_and(|v| v < 64 && set & (1 << v) != 0)
}

/// One field: a comma-separated list of `*`, `n`, `a-b`, each optionally `/step`.
fn field(text: &str, low: u32, high: u32) -> Result<u64, BadSchedule> {
    let bad = |why: &str| BadSchedule(format!("{text:?}: {why} (allowed {low}-{high})"));
    let mut set = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| bad("bad step"))?;
                if step == 0 {
                    return Err(bad("step 0"));
                }
                (range, Some(step))
            }
            None => (item, None),
        };
        let number = |n: &str| {
            n.parse::<u32>()
                .ok()
                .filter(|n| (low..=high).contains(n))
                .ok_or_else(|| bad("value out of range"))
        };
        let (from, to) = match range {
            "*" => (low, high),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                // `a/n` runs from a to the end of the range.
                None if step.is_some() => (number(r)?, high),
                None => {
                    let n = number(r)?;
                    (n, n)
                }
            },
        };
        if from > to {
            return Err(bad("empty range"));
        }
        let step = step.unwrap_or(1) as usize;
        for v in (from..=to).step_by(step) {
            set |= 1 << v;
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WarmWindow;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn civil(text: &str) -> DateTime {
        TimeZone::UTC.to_datetime(at(text))
    }

    fn matches(schedule: &str, when: &str) -> bool {
        Schedule::parse(schedule).unwrap().matches(civil(when))
    }

    fn open(schedule: &str, length: &str, when: &str) -> bool {
        let length = duration::parse(length).unwrap();
        Schedule::parse(schedule).unwrap().open(length, at(when))
    }

    #[test]
    fn fields_accept_stars_lists_ranges_and_steps() {
        assert!(matches("* * * * *", "2024-05-06T10:17:00Z"));
        assert!(matches("17 10 * * *", "2024-05-06T10:17:59Z"));
        assert!(!matches("17 10 * * *", "2024-05-06T10:18:00Z"));
        assert!(matches("0,15,30,45 * * * *", "2024-05-06T10:45:00Z"));
        assert!(!matches("0,15,30,45 * * * *", "2024-05-06T10:46:00Z"));
        assert!(matches("*/15 * * * *", "2024-05-06T10:30:00Z"));
        assert!(!matches("*/15 * * * *", "2024-05-06T10:31:00Z"));
        assert!(matches("10-20/5 * * * *", "2024-05-06T10:15:00Z"));
        assert!(!matches("10-20/5 * * * *", "2024-05-06T10:25:00Z"));
        assert!(!matches("10-20/5 * * * *", "2024-05-06T10:12:00Z"));
        assert!(matches("50/5 * * * *", "2024-05-06T10:55:00Z"));
        assert!(!matches("50/5 * * * *", "2024-05-06T10:05:00Z"));
        assert!(matches("0 8-17 * * *", "2024-05-06T17:00:00Z"));
        assert!(!matches("0 8-17 * * *", "2024-05-06T18:00:00Z"));
        assert!(matches("0 0 * 2 *", "2024-02-29T00:00:00Z"));
        assert!(!matches("0 0 * 2 *", "2024-03-01T00:00:00Z"));
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        // 2024-05-05 is a Sunday, 2024-05-06 a Monday.
        assert!(matches("0 9 * * 0", "2024-05-05T09:00:00Z"));
        assert!(matches("0 9 * * 7", "2024-05-05T09:00:00Z"));
        assert!(!matches("0 9 * * 7", "2024-05-06T09:00:00Z"));
        assert!(matches("0 9 * * 1-5", "2024-05-06T09:00:00Z"));
        assert!(!matches("0 9 * * 1-5", "2024-05-05T09:00:00Z"));
        assert!(matches("0 9 * * 5-7", "2024-05-05T09:00:00Z"));
    }

    #[test]
    fn restricted_day_fields_match_either_else_both() {
        // Both restricted: the 1st of the month OR any Monday.
        assert!(matches("0 0 1 * 1", "2024-05-06T00:00:00Z"));
        assert!(matches("0 0 1 * 1", "2024-05-01T00:00:00Z"));
        assert!(!matches("0 0 1 * 1", "2024-05-07T00:00:00Z"));
        // Day-of-week starred: only the day of the month counts.
        assert!(!matches("0 0 1 * *", "2024-05-06T00:00:00Z"));
        assert!(matches("0 0 1 * *", "2024-05-01T00:00:00Z"));
        // A stepped star is still a star (Vixie): both must match.
        assert!(!matches("0 0 */2 * 1", "2024-05-06T00:00:00Z"));
        assert!(matches("0 0 */2 * 1", "2024-05-13T00:00:00Z"));
    }

    #[test]
    fn bad_schedules_are_refused() {
        for bad in [
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "5-1 * * * *",
            "a * * * *",
            "1,,2 * * * *",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_window_is_open_for_its_duration_after_a_matching_minute() {
        let weekdays_at_8 = "0 8 * * 1-5";
        assert!(!open(weekdays_at_8, "1h", "2024-05-06T07:59:59Z"));
        assert!(open(weekdays_at_8, "1h", "2024-05-06T08:00:00Z"));
        assert!(open(weekdays_at_8, "1h", "2024-05-06T08:59:59Z"));
        assert!(!open(weekdays_at_8, "1h", "2024-05-06T09:00:00Z"));
        // Saturday: no window; Friday's has closed long ago.
        assert!(!open(weekdays_at_8, "1h", "2024-05-11T08:30:00Z"));
        // A window crossing midnight and a month boundary.
        assert!(open("30 23 30 4 *", "2h", "2024-05-01T01:29:00Z"));
        assert!(!open("30 23 30 4 *", "2h", "2024-05-01T01:30:00Z"));
    }

    #[test]
    fn long_windows_are_found_without_walking_every_minute() {
        // Friday 18:00 opens a window for the weekend, seen on Sunday evening.
        assert!(open("0 18 * * 5", "3d", "2024-05-12T20:00:00Z"));
        assert!(!open("0 18 * * 5", "2d", "2024-05-12T20:00:00Z"));
        // Once a year, a window of a year: open almost all the time.
        assert!(open("0 0 1 1 *", "365d", "2024-12-30T00:00:00Z"));
        assert!(!open("0 0 29 2 *", "30d", "2023-03-15T00:00:00Z"));
    }

    #[test]
    fn the_floor_is_the_highest_open_window_capped_by_max() {
        let mut scaling = Scaling {
            min_replicas: 1,
            max_replicas: 3,
            ..Scaling::default()
        };
        let window = |schedule: &str, min_replicas| WarmWindow {
            schedule: schedule.into(),
            duration: "1h".into(),
            min_replicas,
        };
        let monday_8 = at("2024-05-06T08:10:00Z");
        assert_eq!(floor(&scaling, monday_8), 1);
        scaling.warm_windows = vec![window("0 8 * * 1", 2), window("0 7 * * *", 5)];
        assert_eq!(floor(&scaling, monday_8), 2);
        scaling.warm_windows.push(window("5 8 * * *", 9));
        assert_eq!(floor(&scaling, monday_8), 3);
        scaling.warm_windows = vec![window("not cron", 2)];
        assert_eq!(floor(&scaling, monday_8), 1);
    }
}
