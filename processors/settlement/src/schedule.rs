//! When the scheduled settlement runs: a day of the month and a local time, in BILLING_TZ.
//! It settles the month before the one it runs in.

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

use billing_domain::BillingMonth;

/// The first scheduled instant strictly after `now`. A day past a month's end means its
/// last day.
pub fn next_run(now: DateTime<Utc>, day: u32, time: NaiveTime, tz: Tz) -> DateTime<Utc> {
    let mut month = BillingMonth::containing(now, tz);
    loop {
        let local = month.delivery_date(day).and_time(time);
        if let Some(at) = tz.from_local_datetime(&local).earliest() {
            let at = at.with_timezone(&Utc);
            if at > now {
                return at;
            }
        }
        month = month.next();
    }
}

/// The month a run at `at` settles: the previous one.
pub fn month_settled_at(at: DateTime<Utc>, tz: Tz) -> BillingMonth {
    BillingMonth::containing(at, tz).previous()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn next_run_is_this_month_or_the_next_in_local_time() {
        let tz = chrono_tz::Asia::Seoul;
        let two = NaiveTime::from_hms_opt(2, 0, 0).unwrap();
        let now = "2026-11-24T10:00:00Z".parse().unwrap();
        // The 1st has passed in November: the next run is 2026-12-01 02:00 KST.
        assert_eq!(
            next_run(now, 1, two, tz).to_rfc3339(),
            "2026-11-30T17:00:00+00:00"
        );
        // The 30th is still ahead.
        assert_eq!(
            next_run(now, 30, two, tz).to_rfc3339(),
            "2026-11-29T17:00:00+00:00"
        );
        // Day 31 in a 30-day month means the 30th.
        assert_eq!(next_run(now, 31, two, tz), next_run(now, 30, two, tz));
        assert_eq!(
            month_settled_at(next_run(now, 1, two, tz), tz).to_string(),
            "2026-11"
        );
    }
}
