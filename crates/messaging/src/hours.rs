//! Forbidden hours at send time: the system quiet hours and the member's do-not-disturb
//! window, either of which may cross midnight. A message due inside one waits until the
//! instant both have closed.

use chrono::{DateTime, Days, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A daily window `[start, end)` in a time zone; `start > end` crosses midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub tz: Tz,
}

impl Window {
    fn contains_local(&self, t: NaiveTime) -> bool {
        if self.start <= self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Whether `now` falls inside the window.
    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        self.contains_local(now.with_timezone(&self.tz).time())
    }

    /// When the window holding `now` closes (`now` itself if it is outside).
    pub fn closes_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let local: NaiveDateTime = now.with_timezone(&self.tz).naive_local();
        if !self.contains_local(local.time()) {
            return now;
        }
        let mut end = local.date().and_time(self.end);
        if end <= local {
            end = end.checked_add_days(Days::new(1)).unwrap_or(end);
        }
        self.tz
            .from_local_datetime(&end)
            .earliest()
            .map_or(now, |t| t.with_timezone(&Utc))
    }
}

/// The instant after `now` when no window holds any more, or `None` if none holds now.
pub fn forbidden_until(now: DateTime<Utc>, windows: &[Window]) -> Option<DateTime<Utc>> {
    let mut t = now;
    // Each step moves past one window; windows can chain (quiet hours ending inside a DND).
    for _ in 0..=windows.len() * 2 {
        match windows.iter().find(|w| w.contains(t)) {
            Some(w) => t = w.closes_after(t),
            None => break,
        }
    }
    (t > now).then_some(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn kst(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("{s}+09:00"))
            .unwrap()
            .with_timezone(&Utc)
    }

    fn w(s: &str, e: &str) -> Window {
        Window {
            start: s.parse().unwrap(),
            end: e.parse().unwrap(),
            tz: chrono_tz::Asia::Seoul,
        }
    }

    #[test]
    fn windows_close_on_the_right_day() {
        let quiet = w("21:00", "08:00");
        let dnd = w("07:30", "09:15");
        assert_eq!(
            forbidden_until(kst("2026-12-01T22:00:00"), &[quiet]),
            Some(kst("2026-12-02T08:00:00"))
        );
        assert_eq!(
            forbidden_until(kst("2026-12-02T03:00:00"), &[quiet]),
            Some(kst("2026-12-02T08:00:00"))
        );
        assert_eq!(forbidden_until(kst("2026-12-02T12:00:00"), &[quiet]), None);
        // quiet hours end inside the member's window: wait for both
        assert_eq!(
            forbidden_until(kst("2026-12-02T05:00:00"), &[quiet, dnd]),
            Some(kst("2026-12-02T09:15:00"))
        );
        assert_eq!(
            forbidden_until(kst("2026-12-02T09:00:00"), &[quiet, dnd]),
            Some(kst("2026-12-02T09:15:00"))
        );
    }
}
