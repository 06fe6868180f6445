//! The dispatch processor's own triggers: a pass at start, then one at every multiple of
//! the interval on the clock (on the hour by default), and one whenever a reservation's time
//! comes. Time is read from the injected [`Clock`], so a simulated clock plays a month of
//! hourly passes in minutes.

use std::{future::Future, time::Duration};

use billing_runtime::{Clock, CommonArgs};
use chrono::{DateTime, Utc};

use crate::{DispatchError, PassSummary, Trigger, reservation, run_pass};

/// How often the schedule runs passes.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// Clock time between scheduled passes (aligned to its multiples since the epoch).
    pub interval: chrono::Duration,
    /// Real time between looks at the reservations (new ones may be registered any time), and
    /// the wait before retrying a failed pass.
    pub poll: Duration,
}

/// What the schedule did before it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleSummary {
    pub passes: u64,
    pub failed_passes: u64,
    pub published: u64,
}

/// The first multiple of `interval` (since the epoch) strictly after `now`.
pub fn next_tick(now: DateTime<Utc>, interval: chrono::Duration) -> DateTime<Utc> {
    let step = interval.num_milliseconds().max(1);
    let t = now.timestamp_millis();
    let next = (t.div_euclid(step) + 1) * step;
    DateTime::from_timestamp_millis(next).unwrap_or(now)
}

/// Which trigger, if any, is due at `now`: a reservation before the schedule, so the pass is
/// recorded as the reservation's.
pub fn due(
    now: DateTime<Utc>,
    next_scheduled: DateTime<Utc>,
    next_reservation: Option<DateTime<Utc>>,
) -> Option<Trigger> {
    if next_reservation.is_some_and(|r| r <= now) {
        Some(Trigger::Reservation)
    } else if next_scheduled <= now {
        Some(Trigger::Schedule)
    } else {
        None
    }
}

/// Runs passes on the schedule and at reservations until `shutdown` resolves. A failed pass
/// loses nothing (its outbox rows stay) and is retried after `poll`.
pub async fn run(
    common: &CommonArgs,
    config: &ScheduleConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ScheduleSummary, DispatchError> {
    let clock: Clock = common.clock;
    let mut summary = ScheduleSummary::default();
    let m = billing_runtime::metrics::global();
    let passes = |result: &str| {
        m.counter(
            "billing_dispatch_passes_total",
            "Dispatch passes by result: ok, failed.",
            &[("result", result)],
        )
    };
    let (passes_ok, passes_failed) = (passes("ok"), passes("failed"));
    let published_total = m.counter(
        "billing_dispatch_published_total",
        "Email requests published by dispatch passes.",
        &[],
    );
    let mut next_scheduled = clock.now();
    tokio::pin!(shutdown);
    loop {
        billing_runtime::metrics::global().beat();
        let now = clock.now();
        let next_reservation = match next_reservation(common).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read reservations");
                None
            }
        };
        let mut wait = config.poll;
        if let Some(trigger) = due(now, next_scheduled, next_reservation) {
            match run_pass(common, now, trigger).await {
                Ok(PassSummary { published, .. }) => {
                    summary.passes += 1;
                    summary.published += published;
                    passes_ok.inc();
                    published_total.inc_by(published);
                    if next_scheduled <= now {
                        next_scheduled = next_tick(now, config.interval);
                    }
                    wait = Duration::ZERO;
                }
                Err(e) => {
                    summary.failed_passes += 1;
                    passes_failed.inc();
                    tracing::warn!(error = %e, "dispatch pass failed; retrying");
                }
            }
        } else {
            let wake = next_reservation.map_or(next_scheduled, |r| r.min(next_scheduled));
            wait = clock.real_until(wake).min(config.poll);
        }
        tokio::select! {
            () = &mut shutdown => return Ok(summary),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn next_reservation(common: &CommonArgs) -> Result<Option<DateTime<Utc>>, DispatchError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    reservation::next_fire_at(&mut conn).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ticks_fall_on_the_hour_and_reservations_come_first() {
        let hour = chrono::Duration::hours(1);
        assert_eq!(
            next_tick(t("2026-12-24T10:17:03+09:00"), hour),
            t("2026-12-24T11:00:00+09:00")
        );
        assert_eq!(
            next_tick(t("2026-12-24T11:00:00+09:00"), hour),
            t("2026-12-24T12:00:00+09:00")
        );
        let now = t("2026-12-24T10:30:00+09:00");
        let later = t("2026-12-24T11:00:00+09:00");
        assert_eq!(due(now, later, None), None);
        assert_eq!(due(now, now, None), Some(Trigger::Schedule));
        assert_eq!(due(now, now, Some(now)), Some(Trigger::Reservation));
        assert_eq!(due(now, later, Some(later)), None);
    }
}
