//! `billing settle --month`: settlement with the bill sink loading beside it, then the
//! dead-letter recorder, so the command returns once the month's bills are committed rows.

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

/// The sink stopped before it was told to: its error, or a panic.
fn sink_ended(
    joined: Result<Result<SinkSummary, billing_bill_sink::SinkError>, tokio::task::JoinError>,
) -> OpsError {
    match joined {
        Ok(Err(e)) => e.into(),
        Ok(Ok(_)) => OpsError::Stack("the bill sink stopped early".into()),
        Err(e) => OpsError::Stack(format!("bill sink task: {e}")),
    }
}

/// Waits until `group`'s offsets in PostgreSQL reach the current ends of `bills` and `members`.
async fn wait_loaded(common: &CommonArgs, group: &str) -> Result<(), OpsError> {
    use billing_schema::catalogue::{BILLS, MEMBERS};
    let catalogue = common.catalogue();
    let topics = vec![catalogue.name(&BILLS.spec), catalogue.name(&MEMBERS.spec)];
    let consumer: rdkafka::consumer::BaseConsumer =
        common.kafka().consumer_config(group).create()?;
    let ends = billing_runtime::consumer::end_offsets(&consumer, &topics)?;
    loop {
        let stored = billing_bill_sink::stored_offsets(&common.database_url, group).await?;
        if billing_bill_sink::reached(&ends, &stored) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
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
///
/// The sink loads while settlement still produces: it runs unbounded beside it, and is
/// stopped once the offsets it committed in PostgreSQL (with its rows) reach the ends of
/// `bills` and `members` as they stand after settlement's last bill was acknowledged. So the
/// command still returns only when every bill is a committed row.
pub async fn settle(common: &CommonArgs, month: BillingMonth) -> Result<SettleReport, OpsError> {
    billing_db::migrate(&common.database_url).await?;
    crate::topics::ensure(common).await?;
    let group = format!("{}{}", common.topic_prefix, billing_bill_sink::NAME);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sink_config = SinkConfig {
        group_id: group.clone(),
        bounded: false,
        ..SinkConfig::bounded()
    };
    let sink_common = common.clone();
    let mut sink = tokio::spawn(async move {
        let stopped = async {
            let _ = stopped.await;
        };
        billing_bill_sink::run(&sink_common, sink_config, stopped).await
    });
    let settled = tokio::select! {
        r = billing_settlement::run(common, SettleConfig::new(month), std::future::pending()) => r,
        joined = &mut sink => return Err(sink_ended(joined)),
    };
    let settlement = match settled {
        Ok(s) => s,
        Err(e) => {
            let _ = stop.send(());
            let _ = sink.await;
            return Err(e.into());
        }
    };
    tokio::select! {
        r = wait_loaded(common, &group) => r?,
        joined = &mut sink => return Err(sink_ended(joined)),
    }
    let _ = stop.send(());
    let sink = sink
        .await
        .map_err(|e| OpsError::Stack(format!("bill sink task: {e}")))??;
    let dead_letters = billing_dlq::run(common, true, std::future::pending()).await?;
    let totals = month_totals(&common.database_url, month).await?;
    Ok(SettleReport {
        settlement,
        sink,
        dead_letters,
        totals,
    })
}
