//! `billing quiet-hours show|set`: the system quiet hours, when no message is sent and no
//! dispatch pass selects bills. One row; the window is read in its own time zone and may
//! cross midnight (21:00 to 08:00). Channels see a change when they next re-read their
//! settings (every 10 s); dispatch at its next pass.

use billing_runtime::CommonArgs;
use chrono::{DateTime, NaiveTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Text, Time, Timestamptz},
};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// The system quiet hours: `[start, end)` in `time_zone`.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct QuietHours {
    #[diesel(sql_type = Time)]
    pub start_time: NaiveTime,
    #[diesel(sql_type = Time)]
    pub end_time: NaiveTime,
    #[diesel(sql_type = Text)]
    pub time_zone: String,
    #[diesel(sql_type = Timestamptz)]
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Display for QuietHours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-{} {}",
            self.start_time.format("%H:%M"),
            self.end_time.format("%H:%M"),
            self.time_zone
        )
    }
}

/// A local time of day, `HH:MM` from 00:00 to 23:59.
pub fn parse_time(s: &str) -> Result<NaiveTime, OpsError> {
    let valid = s.len() == 5 && s.as_bytes()[2] == b':';
    NaiveTime::parse_from_str(s, "%H:%M")
        .ok()
        .filter(|_| valid)
        .ok_or_else(|| {
            OpsError::Invalid(format!("{s:?} is not a time of day HH:MM (00:00 to 23:59)"))
        })
}

/// The quiet hours now in force.
pub async fn show(common: &CommonArgs) -> Result<QuietHours, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    diesel::sql_query(
        "select start_time, end_time, time_zone, updated_at from quiet_hours where id = 1",
    )
    .get_result(&mut conn)
    .await
    .map_err(|e| match e {
        diesel::result::Error::NotFound => {
            OpsError::NotFound("no quiet hours row: run `billing migrate`".into())
        }
        e => e.into(),
    })
}

/// Sets the quiet hours to `[start, end)` in `BILLING_TZ` (`start` after `end` crosses
/// midnight; equal times are refused: they would mean no window or the whole day).
pub async fn set(common: &CommonArgs, start: &str, end: &str) -> Result<QuietHours, OpsError> {
    let (start, end) = (parse_time(start)?, parse_time(end)?);
    if start == end {
        return Err(OpsError::Invalid(
            "quiet hours must start and end at different times".into(),
        ));
    }
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(diesel::sql_query(
        "insert into quiet_hours (id, start_time, end_time, time_zone, updated_at)
         values (1, $1, $2, $3, now())
         on conflict (id) do update set start_time = excluded.start_time,
           end_time = excluded.end_time, time_zone = excluded.time_zone, updated_at = now()
         returning start_time, end_time, time_zone, updated_at",
    )
    .bind::<Time, _>(start)
    .bind::<Time, _>(end)
    .bind::<Text, _>(common.billing_tz.name())
    .get_result(&mut conn)
    .await?)
}
