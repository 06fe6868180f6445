//! Dispatch: settled bills into email requests (issue #4, in progress: the pass, its
//! selection and the outbox; the schedule and reservations are still to come).
//!
//! A pass at instant `now` (the injected clock), in BILLING_TZ:
//! 1. Inside the system quiet hours (`quiet_hours`, a window that may cross midnight)
//!    nothing is selected: every due bill is held for a later pass.
//! 2. Due bills: settled bills of month M whose member's delivery day in month M+1 (a day past
//!    that month's end meaning its last day) is today or has passed without a dispatch
//!    (catch-up after an outage), read with the member's current preferences from `member`.
//! 3. Members inside their own do-not-disturb window are held, not dropped: the next pass
//!    after the window closes takes them.
//! 4. Outbox: each selected bill gets a `dispatch` row (primary key: the bill), in one
//!    statement; then every row not yet published (this pass's and any left by a
//!    crash) is published as an `EmailRequest` keyed by member id, and marked published once
//!    the broker acknowledged it. A crash between the database and Kafka leaves unpublished
//!    rows that the next pass publishes with the same delivery id; a crash after the broker's
//!    acknowledgement but before the mark can repeat an event with the same delivery id, which
//!    the email processor treats as the same delivery.

use billing_runtime::{CommonArgs, ProduceError, Producer};
use billing_schema::{CodecError, EmailRequest, Encoder, Registry, catalogue::EMAIL_REQUESTS};
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// The processor's name.
pub const NAME: &str = "dispatch";
/// Outbox rows published per round trip.
const BATCH: i64 = 50_000;

/// A pass failed; nothing it did is lost (the outbox keeps unpublished rows).
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// True when the pass fell inside the system quiet hours.
    pub quiet_hours: bool,
    /// Bills newly put in the outbox.
    pub selected: u64,
    /// Due bills held back by the member's do-not-disturb window (or quiet hours).
    pub held: u64,
    /// Email requests published (new ones and any left unpublished by an earlier pass).
    pub published: u64,
}

#[derive(Debug, QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(Debug, QueryableByName)]
struct Outbox {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    delivery_id: String,
    #[diesel(sql_type = Text)]
    billing_month: String,
    #[diesel(sql_type = Timestamptz)]
    requested_at: DateTime<Utc>,
}

/// The due bills not yet dispatched at `$1` (now) in time zone `$2`, with whether the
/// member's do-not-disturb window holds them (`held`).
const DUE: &str = "
    with clock as (select ($1::timestamptz at time zone $2) as local),
    due as (
      select b.id as bill_id, b.member_id, b.billing_month,
             (c.local::time) as now_time, m.dnd_start, m.dnd_end,
             (date_trunc('month', to_date(b.billing_month || '-01', 'YYYY-MM-DD') + interval '1 month')::date
               + (least(m.delivery_day::int,
                        extract(day from date_trunc('month', to_date(b.billing_month || '-01', 'YYYY-MM-DD') + interval '2 month')
                                         - interval '1 day')::int) - 1)) as due_date,
             c.local::date as today
      from bill b
      join member m on m.id = b.member_id
      cross join clock c
      where not exists (select 1 from dispatch d where d.bill_id = b.id))
    select bill_id, member_id, billing_month,
           (dnd_start is not null and case when dnd_start <= dnd_end
               then now_time >= dnd_start and now_time < dnd_end
               else now_time >= dnd_start or now_time < dnd_end end) as held
    from due where due_date <= today";

#[derive(Debug, QueryableByName)]
struct QuietNow {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    quiet: bool,
}

/// Whether `now` is inside the system quiet hours.
async fn in_quiet_hours(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
) -> Result<bool, DispatchError> {
    let rows: Vec<QuietNow> = diesel::sql_query(
        "select coalesce((select case when start_time <= end_time
                   then t >= start_time and t < end_time
                   else t >= start_time or t < end_time end
                 from quiet_hours, lateral (select ($1::timestamptz at time zone time_zone)::time as t) x
                 where id = 1), false) as quiet",
    )
    .bind::<Timestamptz, _>(now)
    .load(conn)
    .await?;
    Ok(rows.as_slice().first().is_some_and(|q| q.quiet))
}

/// Runs a statement over the due set (binds `$1` = now, `$2` = time zone) that returns one
/// `count(*) as n`.
async fn count(
    conn: &mut AsyncPgConnection,
    sql: String,
    now: DateTime<Utc>,
    tz: &str,
) -> Result<u64, DispatchError> {
    let rows: Vec<Count> = diesel::sql_query(sql)
        .bind::<Timestamptz, _>(now)
        .bind::<Text, _>(tz)
        .load(conn)
        .await?;
    Ok(rows
        .as_slice()
        .first()
        .map_or(0, |c| u64::try_from(c.n).unwrap_or(0)))
}

/// One dispatch pass at `now`.
pub async fn run_pass(
    common: &CommonArgs,
    now: DateTime<Utc>,
) -> Result<PassSummary, DispatchError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let tz = common.billing_tz.name();
    let mut summary = PassSummary::default();
    if in_quiet_hours(&mut conn, now).await? {
        summary.quiet_hours = true;
        summary.held = count(
            &mut conn,
            format!("select count(*)::bigint as n from ({DUE}) s"),
            now,
            tz,
        )
        .await?;
    } else {
        // Every due, not-held bill into the outbox in one statement: re-evaluating the due set
        // batch by batch would scan every bill once per batch.
        let insert = format!(
            "with picked as (select bill_id, member_id from ({DUE}) s where not held),
                  ins as (insert into dispatch (bill_id, delivery_id, member_id, requested_at)
                          select bill_id, 'email-' || bill_id, member_id, $1 from picked
                          on conflict (bill_id) do nothing returning 1)
             select count(*)::bigint as n from ins"
        );
        summary.selected = count(&mut conn, insert, now, tz).await?;
        summary.held = count(
            &mut conn,
            format!("select count(*)::bigint as n from ({DUE}) s where held"),
            now,
            tz,
        )
        .await?;
    }
    summary.published = publish_outbox(common, &mut conn).await?;
    tracing::info!(%now, quiet_hours = summary.quiet_hours, selected = summary.selected, held = summary.held, published = summary.published, "dispatch pass");
    Ok(summary)
}

/// Publishes every outbox row not yet published; returns how many.
pub async fn publish_outbox(
    common: &CommonArgs,
    conn: &mut AsyncPgConnection,
) -> Result<u64, DispatchError> {
    let catalogue = common.catalogue();
    let registry = Registry::new(&common.schema_registry_url)?;
    let encoder = Encoder::<EmailRequest>::register(
        &registry,
        &catalogue.value_subject(&EMAIL_REQUESTS.spec),
    )
    .await?;
    let topic = catalogue.name(&EMAIL_REQUESTS.spec);
    let producer = Producer::new(&common.kafka())?;
    // One read of everything unpublished (this pass's rows and any a crash left), then
    // publish and mark it chunk by chunk: a chunk is marked only once the broker acknowledged it.
    let rows: Vec<Outbox> = diesel::sql_query(
        "select d.bill_id, d.member_id, d.delivery_id, b.billing_month, d.requested_at
         from dispatch d join bill b on b.id = d.bill_id
         where d.published_at is null order by d.bill_id",
    )
    .load(conn)
    .await?;
    let mut published = 0u64;
    for chunk in rows.chunks(usize::try_from(BATCH).unwrap_or(50_000)) {
        let mut pending = Vec::with_capacity(chunk.len());
        for r in chunk {
            let request = EmailRequest {
                delivery_id: r.delivery_id.clone(),
                bill_id: r.bill_id,
                member_id: r.member_id,
                billing_month: r.billing_month.clone(),
                attempt: 0,
                requested_at: r.requested_at.timestamp_millis(),
                not_before: None,
                last_error: None,
            };
            let key = r.member_id.to_string();
            pending.push(
                producer
                    .enqueue(
                        &topic,
                        Some(key.as_bytes()),
                        Some(&encoder.encode(&request)?),
                        None,
                    )
                    .await?,
            );
        }
        for p in pending {
            p.wait().await?;
        }
        let ids: Vec<i64> = chunk.iter().map(|r| r.bill_id).collect();
        diesel::sql_query("update dispatch set published_at = now() where bill_id = any($1)")
            .bind::<diesel::sql_types::Array<BigInt>, _>(&ids)
            .execute(conn)
            .await?;
        published += chunk.len() as u64;
    }
    Ok(published)
}
