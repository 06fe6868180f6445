//! Dispatch for operators: one pass now (`billing dispatch [--now]`, the console's button)
//! and reservations (`billing reservation add|list|cancel`).

pub use billing_dispatch::{PassSummary, Reservation, Scope};
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
