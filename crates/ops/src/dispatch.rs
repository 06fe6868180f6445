//! Dispatch for operators: one pass now (`billing dispatch [--now]`, the console's button)
//! and reservations (`billing reservation add|list|cancel`).

pub use billing_dispatch::{PassSummary, Preview, Reservation, Scope};
use billing_dispatch::{Trigger, reservation};
use billing_runtime::CommonArgs;
use chrono::{DateTime, Utc};

use crate::OpsError;

/// Runs one pass at `now` (the configured clock when `None`).
pub async fn dispatch(
    common: &CommonArgs,
    now: Option<DateTime<Utc>>,
) -> Result<PassSummary, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    crate::topics::ensure(common).await?;
    let now = now.unwrap_or_else(|| common.clock.now());
    Ok(billing_dispatch::run_pass(common, now, Trigger::Operator).await?)
}

/// What a pass at `now` would dispatch and hold, without doing it.
pub async fn preview(common: &CommonArgs, now: Option<DateTime<Utc>>) -> Result<Preview, OpsError> {
    let now = now.unwrap_or_else(|| common.clock.now());
    Ok(billing_dispatch::preview(common, now).await?)
}

/// One recorded pass.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct Pass {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub id: i64,
    #[diesel(sql_type = diesel::sql_types::Timestamptz)]
    pub run_at: DateTime<Utc>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub trigger: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub selected: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub held: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    pub completed_at: Option<DateTime<Utc>>,
}

/// The latest `limit` passes, newest first.
pub async fn passes(common: &CommonArgs, limit: i64) -> Result<Vec<Pass>, OpsError> {
    use diesel_async::RunQueryDsl;
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(diesel::sql_query(
        "select id, run_at, trigger, selected, held, completed_at from dispatch_pass order by id desc limit $1",
    )
    .bind::<diesel::sql_types::BigInt, _>(limit.clamp(1, 1000))
    .load(&mut conn)
    .await?)
}

/// Registers a reservation: the first dispatch pass at or after `fire_at` sends the bills in
/// `scope`, once.
pub async fn reserve(
    common: &CommonArgs,
    fire_at: DateTime<Utc>,
    scope: Scope,
    note: Option<String>,
) -> Result<Reservation, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(reservation::reserve(&mut conn, fire_at, scope, note).await?)
}

/// Reservations not fired yet (all of them with `all`).
pub async fn reservations(common: &CommonArgs, all: bool) -> Result<Vec<Reservation>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(reservation::list(&mut conn, all).await?)
}

/// Cancels a reservation that has not fired.
pub async fn cancel_reservation(common: &CommonArgs, id: i64) -> Result<(), OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    if reservation::cancel(&mut conn, id).await? {
        Ok(())
    } else {
        Err(OpsError::NotFound(format!(
            "no reservation {id} waiting to fire"
        )))
    }
}
