//! The billing month.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// A calendar month, `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BillingMonth {
    year: i32,
    month: u32,
}

/// A month that does not parse or does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid billing month {0:?}: expected YYYY-MM")]
pub struct MonthError(pub String);

impl BillingMonth {
    /// The month `year`-`month`, if valid.
    pub fn new(year: i32, month: u32) -> Result<Self, MonthError> {
        if (1..=12).contains(&month) && (1970..=9999).contains(&year) {
            Ok(BillingMonth { year, month })
        } else {
            Err(MonthError(format!("{year}-{month}")))
        }
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    /// `yyyymm` as a number, e.g. 202611.
    pub fn number(self) -> i64 {
        i64::from(self.year) * 100 + i64::from(self.month)
    }

    /// The first day.
    pub fn first_day(self) -> NaiveDate {
        // The constructor admits only real months.
        NaiveDate::from_ymd_opt(self.year, self.month, 1).unwrap_or(NaiveDate::MIN)
    }

    /// The following month.
    pub fn next(self) -> BillingMonth {
        if self.month == 12 {
            BillingMonth {
                year: self.year + 1,
                month: 1,
            }
        } else {
            BillingMonth {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The preceding month.
    pub fn previous(self) -> BillingMonth {
        if self.month == 1 {
            BillingMonth {
                year: self.year - 1,
                month: 12,
            }
        } else {
            BillingMonth {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// Number of days in the month.
    pub fn days(self) -> u32 {
        let next = self.next().first_day();
        u32::try_from((next - self.first_day()).num_days()).unwrap_or(31)
    }

    /// The day a member who chose `delivery_day` gets the bill: past the month's end means
    /// the last day.
    pub fn delivery_date(self, delivery_day: u32) -> NaiveDate {
        let day = delivery_day.clamp(1, self.days());
        self.first_day()
            .with_day(day)
            .unwrap_or_else(|| self.first_day())
    }

    /// The month's start and end (exclusive) as instants, in time zone `tz`.
    pub fn bounds(self, tz: Tz) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = |m: BillingMonth| {
            tz.from_local_datetime(&m.first_day().and_hms_opt(0, 0, 0).unwrap_or_default())
                .earliest()
                .map(|d| d.with_timezone(&Utc))
                .unwrap_or_default()
        };
        (start(self), start(self.next()))
    }

    /// The month that contains `instant` in time zone `tz`.
    pub fn containing(instant: DateTime<Utc>, tz: Tz) -> BillingMonth {
        let local = instant.with_timezone(&tz);
        BillingMonth {
            year: local.year(),
            month: local.month(),
        }
    }
}

impl fmt::Display for BillingMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for BillingMonth {
    type Err = MonthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MonthError(s.to_string());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year = y.parse().map_err(|_| bad())?;
        let month = m.parse().map_err(|_| bad())?;
        BillingMonth::new(year, month).map_err(|_| bad())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: BillingMonth = "2026-11".parse().unwrap();
        assert_eq!(m.to_string(), "2026-11");
        assert_eq!(m.number(), 202611);
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
            assert!(bad.parse::<BillingMonth>().is_err(), "{bad}");
        }
    }

    #[test]
    fn delivery_day_past_the_end_is_the_last_day() {
        let nov: BillingMonth = "2026-11".parse().unwrap();
        assert_eq!(nov.days(), 30);
        assert_eq!(nov.delivery_date(31).to_string(), "2026-11-30");
        let feb: BillingMonth = "2028-02".parse().unwrap();
        assert_eq!(feb.delivery_date(30).to_string(), "2028-02-29");
    }

    #[test]
    fn bounds_are_in_the_business_time_zone() {
        let m: BillingMonth = "2026-12".parse().unwrap();
        let (start, end) = m.bounds(chrono_tz::Asia::Seoul);
        assert_eq!(start.to_rfc3339(), "2026-11-30T15:00:00+00:00");
        assert_eq!(end.to_rfc3339(), "2026-12-31T15:00:00+00:00");
        assert_eq!(BillingMonth::containing(start, chrono_tz::Asia::Seoul), m);
    }
}
