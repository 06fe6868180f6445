//! `billing settle --month`: settlement, then the bill sink, then the dead-letter recorder,
//! each bounded, so the command returns once the month's bills are committed rows.

use billing_bill_sink::{SinkConfig, SinkSummary};
use billing_domain::BillingMonth;
use billing_runtime::{CommonArgs, LoopSummary};
use billing_settlement::{SettleConfig, Summary};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text},
};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// What the database holds for a month.
#[derive(Debug, Clone, Default, PartialEq, Eq, QueryableByName)]
pub struct MonthTotals {
    #[diesel(sql_type = BigInt)]
    pub bills: i64,
    #[diesel(sql_type = BigInt)]
    pub items: i64,
    #[diesel(sql_type = BigInt)]
    pub total_amount: i64,
    #[diesel(sql_type = BigInt)]
    pub discount_amount: i64,
    #[diesel(sql_type = BigInt)]
    pub vat_amount: i64,
    #[diesel(sql_type = BigInt)]
    pub final_amount: i64,
}

/// The month's rows in PostgreSQL.
pub async fn month_totals(
    database_url: &str,
    month: BillingMonth,
) -> Result<MonthTotals, OpsError> {
    let mut conn = billing_db::connect(database_url).await?;
    let mut rows: Vec<MonthTotals> = diesel::sql_query(
        "select count(*)::bigint as bills,
                coalesce(sum((select count(*) from bill_item i where i.bill_id = b.id)), 0)::bigint as items,
                coalesce(sum(total_amount), 0)::bigint as total_amount,
                coalesce(sum(discount_amount), 0)::bigint as discount_amount,
                coalesce(sum(vat_amount), 0)::bigint as vat_amount,
                coalesce(sum(final_amount), 0)::bigint as final_amount
         from bill b where billing_month = $1",
    )
    .bind::<Text, _>(month.to_string())
    .load(&mut conn)
    .await?;
    Ok(rows.pop().unwrap_or_default())
}

/// Everything a settle run did.
#[derive(Debug, Clone)]
pub struct SettleReport {
    pub settlement: Summary,
    pub sink: SinkSummary,
    pub dead_letters: LoopSummary,
    pub totals: MonthTotals,
}

/// Settles `month` and loads it, to completion. Safe to run again: the same bills result.
pub async fn settle(common: &CommonArgs, month: BillingMonth) -> Result<SettleReport, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    crate::topics::ensure(common).await?;
    let settlement =
        billing_settlement::run(common, SettleConfig::new(month), std::future::pending()).await?;
    let sink_config = SinkConfig {
        group_id: format!("{}{}", common.topic_prefix, billing_bill_sink::NAME),
        ..SinkConfig::bounded()
    };
    let sink = billing_bill_sink::run(common, sink_config, std::future::pending()).await?;
    let dead_letters = billing_dlq::run(common, true, std::future::pending()).await?;
    let totals = month_totals(&common.database_url, month).await?;
    Ok(SettleReport {
        settlement,
        sink,
        dead_letters,
        totals,
    })
}
