//! The clock every processor reads: the system clock in production, or a simulated clock that
//! separate processes agree on without talking to each other (the demo plays a month in
//! minutes, and the dispatch, email and SMS processors must see the same quiet hours).
//!
//! A simulated clock is `sim:<start RFC 3339>,<speed>,<anchor unix ms>`: at the real instant
//! `anchor` it reads `start`, and it runs `speed` times faster than real time. Every process
//! given the same string computes the same instant.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};

/// Where `now` comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clock {
    /// The system clock.
    System,
    /// A clock running `speed` times real time, reading `start` at the real instant `anchor`.
    Simulated {
        start: DateTime<Utc>,
        speed: f64,
        anchor: DateTime<Utc>,
    },
}

impl Clock {
    /// A simulated clock starting now at `start`.
    pub fn simulated(start: DateTime<Utc>, speed: f64) -> Self {
        Clock::Simulated {
            start,
            speed,
            anchor: Utc::now(),
        }
    }

    /// The current instant.
    #[allow(clippy::cast_possible_truncation)] // milliseconds: far inside i64 and f64's range
    pub fn now(&self) -> DateTime<Utc> {
        match *self {
            Clock::System => Utc::now(),
            Clock::Simulated {
                start,
                speed,
                anchor,
            } => {
                let real = (Utc::now() - anchor).num_milliseconds() as f64;
                start + chrono::Duration::milliseconds((real * speed) as i64)
            }
        }
    }

    /// The real time to wait until the clock reads `t` (zero if it already does).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // non-negative milliseconds
    pub fn real_until(&self, t: DateTime<Utc>) -> Duration {
        let ahead = (t - self.now()).num_milliseconds().max(0) as f64;
        match *self {
            Clock::System => Duration::from_millis(ahead as u64),
            Clock::Simulated { speed, .. } => Duration::from_millis((ahead / speed).ceil() as u64),
        }
    }
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Clock::System => f.write_str("system"),
            Clock::Simulated {
                start,
                speed,
                anchor,
            } => write!(
                f,
                "sim:{},{speed},{}",
                start.to_rfc3339(),
                anchor.timestamp_millis()
            ),
        }
    }
}

impl FromStr for Clock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "system" {
            return Ok(Clock::System);
        }
        let spec = s.strip_prefix("sim:").ok_or_else(|| {
            format!("expected `system` or `sim:<start>,<speed>,<anchor ms>`, got {s:?}")
        })?;
        let mut parts = spec.split(',');
        let (Some(start), Some(speed), Some(anchor), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!(
                "expected `sim:<start>,<speed>,<anchor ms>`, got {s:?}"
            ));
        };
        let start = DateTime::parse_from_rfc3339(start)
            .map_err(|e| format!("clock start {start:?}: {e}"))?
            .with_timezone(&Utc);
        let speed: f64 = speed
            .parse()
            .map_err(|e| format!("clock speed {speed:?}: {e}"))?;
        if !(speed.is_finite() && speed > 0.0) {
            return Err(format!("clock speed must be positive, got {speed}"));
        }
        let anchor = anchor
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| format!("clock anchor {anchor:?} is not unix milliseconds"))?;
        Ok(Clock::Simulated {
            start,
            speed,
            anchor,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_clock_round_trips_and_runs_fast() {
        let start = DateTime::parse_from_rfc3339("2026-12-01T00:00:00+09:00")
            .unwrap()
            .with_timezone(&Utc);
        let anchor = Utc::now() - chrono::Duration::seconds(10);
        let clock = Clock::Simulated {
            start,
            speed: 360.0,
            anchor,
        };
        let parsed: Clock = clock.to_string().parse().unwrap();
        let elapsed = parsed.now() - start;
        // 10 real seconds at 360x: one simulated hour (and a little more while the test runs)
        assert!(elapsed >= chrono::Duration::hours(1), "{elapsed}");
        assert!(elapsed < chrono::Duration::minutes(70), "{elapsed}");
        let wait = parsed.real_until(start + chrono::Duration::hours(2));
        assert!(
            wait <= Duration::from_secs(10) && wait > Duration::from_secs(9),
            "{wait:?}"
        );
        assert_eq!("system".parse::<Clock>().unwrap(), Clock::System);
        assert!("sim:yesterday,1,0".parse::<Clock>().is_err());
        assert!("sim:2026-12-01T00:00:00Z,0,0".parse::<Clock>().is_err());
    }
}
