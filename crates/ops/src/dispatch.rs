//! `billing dispatch [--now]`: one dispatch pass, the operator's button.

use billing_dispatch::PassSummary;
use billing_runtime::CommonArgs;
use chrono::{DateTime, Utc};

use crate::OpsError;

/// Runs one pass at `now` (the real clock when `None`).
pub async fn dispatch(
    common: &CommonArgs,
    now: Option<DateTime<Utc>>,
) -> Result<PassSummary, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    crate::topics::ensure(common).await?;
    Ok(billing_dispatch::run_pass(common, now.unwrap_or_else(Utc::now)).await?)
}
