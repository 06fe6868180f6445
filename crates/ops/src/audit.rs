//! The audit trail: every operator action (who, what, when, how it ended), written by the
//! console for each state-changing request, shown on its own page.

use billing_runtime::CommonArgs;
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text, Timestamptz},
};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// One recorded action.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct Entry {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Timestamptz)]
    pub at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub operator: String,
    #[diesel(sql_type = Text)]
    pub action: String,
    #[diesel(sql_type = Text)]
    pub detail: String,
    #[diesel(sql_type = Text)]
    pub result: String,
}

/// Records that `operator` did `action` (`detail` names its arguments) with `result` (`ok`
/// or the error an operator saw).
pub async fn record(
    common: &CommonArgs,
    operator: &str,
    action: &str,
    detail: &str,
    result: &str,
) -> Result<(), OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    diesel::sql_query(
        "insert into audit (operator, action, detail, result) values ($1, $2, $3, $4)",
    )
    .bind::<Text, _>(operator)
    .bind::<Text, _>(action)
    .bind::<Text, _>(detail)
    .bind::<Text, _>(result)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// The latest `limit` actions, newest first.
pub async fn list(common: &CommonArgs, limit: i64) -> Result<Vec<Entry>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    Ok(diesel::sql_query(
        "select id, at, operator, action, detail, result from audit order by id desc limit $1",
    )
    .bind::<BigInt, _>(limit.clamp(1, 10_000))
    .load(&mut conn)
    .await?)
}
