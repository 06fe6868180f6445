//! The channels' PostgreSQL side: bills looked up in batches, delivery state written in
//! batches, templates and quiet hours read through a short-lived cache.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use billing_db::PgPool;
use chrono::{DateTime, NaiveTime, Utc};
use chrono_tz::Tz;
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Bool, Int4, Nullable, Text, Time, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::Mutex;

use crate::{batch::Batcher, hours::Window, template::BillView};

/// Everything a channel needs to deliver one bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillContext {
    pub view: BillView,
    pub member_id: i64,
    pub email: String,
    pub phone: String,
    pub dnd: Option<(NaiveTime, NaiveTime)>,
    /// A delivery of this bill already succeeded (on any channel).
    pub delivered: bool,
}

#[derive(QueryableByName)]
struct BillRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    billing_month: String,
    #[diesel(sql_type = BigInt)]
    total_amount: i64,
    #[diesel(sql_type = BigInt)]
    discount_amount: i64,
    #[diesel(sql_type = BigInt)]
    vat_amount: i64,
    #[diesel(sql_type = BigInt)]
    final_amount: i64,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    phone: String,
    #[diesel(sql_type = Nullable<Time>)]
    dnd_start: Option<NaiveTime>,
    #[diesel(sql_type = Nullable<Time>)]
    dnd_end: Option<NaiveTime>,
    #[diesel(sql_type = Bool)]
    delivered: bool,
}

#[derive(QueryableByName)]
struct ItemRow {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    description: String,
    #[diesel(sql_type = BigInt)]
    amount: i64,
}

/// Bills, their members, delivery state and (with `items`) their items, for a batch of bill
/// ids, in three queries.
pub async fn load_bills(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
    items: bool,
) -> Result<HashMap<i64, BillContext>, diesel::result::Error> {
    let rows: Vec<BillRow> = diesel::sql_query(
        "select b.id, b.member_id, b.billing_month, b.total_amount, b.discount_amount,
                b.vat_amount, b.final_amount, m.name, m.email, m.phone, m.dnd_start, m.dnd_end,
                exists (select 1 from delivery d where d.bill_id = b.id and d.status = 'sent') as delivered
         from bill b join member m on m.id = b.member_id
         where b.id = any($1)",
    )
    .bind::<Array<BigInt>, _>(ids)
    .load(conn)
    .await?;
    let mut lines: HashMap<i64, Vec<(String, String, i64)>> = HashMap::new();
    if items {
        let item_rows: Vec<ItemRow> = diesel::sql_query(
            "select bill_id, kind, description, amount from bill_item
             where bill_id = any($1) order by id",
        )
        .bind::<Array<BigInt>, _>(ids)
        .load(conn)
        .await?;
        for i in item_rows {
            lines
                .entry(i.bill_id)
                .or_default()
                .push((i.kind, i.description, i.amount));
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let ctx = BillContext {
                view: BillView {
                    bill_id: r.id,
                    member_name: r.name,
                    billing_month: r.billing_month,
                    total_amount: r.total_amount,
                    discount_amount: r.discount_amount,
                    vat_amount: r.vat_amount,
                    final_amount: r.final_amount,
                    items: lines.remove(&r.id).unwrap_or_default(),
                },
                member_id: r.member_id,
                email: r.email,
                phone: r.phone,
                dnd: r.dnd_start.zip(r.dnd_end),
                delivered: r.delivered,
            };
            (r.id, ctx)
        })
        .collect())
}

/// A batching bill loader: `call(bill_id)` answers `None` for a bill that does not exist.
/// Four workers of at most 500 bills: measured fastest on 2 cores (docs/benchmarks.md); much
/// larger batches made PostgreSQL slower per bill.
pub fn bill_loader(pool: PgPool, items: bool) -> Batcher<i64, Option<Arc<BillContext>>> {
    Batcher::spawn("bill-loader", 4, 500, move |ids: Vec<i64>| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let found = load_bills(&mut conn, &ids, items)
                .await
                .map_err(|e| e.to_string())?;
            // A bill asked for twice in one batch is answered twice.
            Ok(ids
                .iter()
                .map(|id| found.get(id).cloned().map(Arc::new))
                .collect::<Vec<_>>())
        }
    })
}

/// Where a delivery (one bill on one channel) stands. The order is the state machine's:
/// within one attempt a delivery only moves to a later state (see [`DeliveryUpdate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeliveryStatus {
    /// Handed to this channel, not yet attempted.
    Queued,
    /// Claimed by a process that is calling the provider now (or died doing so).
    Sending,
    /// The last attempt failed; a retry or the next channel follows (see the hand-over).
    Failed,
    /// A claim's process died before the provider's answer was recorded, and the provider
    /// has no idempotency keys: held for an operator rather than risk a second message.
    Unknown,
    /// Undeliverable on every channel: a dead letter was written.
    Dead,
    Sent,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sending => "sending",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Unknown => "unknown",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Sent => "sent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DeliveryStatus::Queued,
            DeliveryStatus::Sending,
            DeliveryStatus::Failed,
            DeliveryStatus::Unknown,
            DeliveryStatus::Dead,
            DeliveryStatus::Sent,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What follows a recorded failure: written with the outcome, before it is published, so a
/// redo of the same attempt publishes it again rather than losing or forking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handover {
    /// The next attempt goes to the retry topic.
    Retry,
    /// The channel gave up: the next channel, or the dead-letter queue.
    GiveUp,
}

impl Handover {
    pub fn as_str(self) -> &'static str {
        match self {
            Handover::Retry => "retry",
            Handover::GiveUp => "give-up",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retry" => Some(Handover::Retry),
            "give-up" => Some(Handover::GiveUp),
            _ => None,
        }
    }
}

/// A change of a delivery's state. It is applied only if it moves the delivery forward:
/// to more attempts, or to a later status within the same attempt; never away from `sent`.
/// A late or repeated write therefore cannot undo a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryUpdate {
    pub bill_id: i64,
    pub channel: &'static str,
    pub status: DeliveryStatus,
    /// Attempts started on this channel, this one included.
    pub attempts: i32,
    /// When it was sent, by the processor's clock.
    pub sent_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub template_version: Option<i32>,
    pub handover: Option<Handover>,
    /// The request record whose attempt this outcome is (`topic/partition/offset`).
    pub source: Option<String>,
}

const UPSERT: &str = "
    insert into delivery (bill_id, channel, status, attempts, sent_at, last_error, template_version, handover, handover_source, updated_at)
    select b, c, s, a, t, e, v, h, o, now()
    from unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::text[], $7::int[], $8::text[], $9::text[])
         as u(b, c, s, a, t, e, v, h, o)
    on conflict (bill_id, channel) do update
       set status = excluded.status,
           attempts = excluded.attempts,
           sent_at = coalesce(delivery.sent_at, excluded.sent_at),
           last_error = coalesce(excluded.last_error, delivery.last_error),
           template_version = coalesce(excluded.template_version, delivery.template_version),
           handover = excluded.handover,
           handover_source = excluded.handover_source,
           claim_owner = null,
           claim_until = null,
           updated_at = now()
     where delivery.status <> 'sent'
       and (excluded.attempts, array_position(array['queued', 'sending', 'failed', 'unknown', 'dead', 'sent'], excluded.status))
         > (delivery.attempts, array_position(array['queued', 'sending', 'failed', 'unknown', 'dead', 'sent'], delivery.status))";

async fn upsert(
    conn: &mut AsyncPgConnection,
    rows: &[&DeliveryUpdate],
) -> Result<usize, diesel::result::Error> {
    let b: Vec<i64> = rows.iter().map(|r| r.bill_id).collect();
    let c: Vec<&str> = rows.iter().map(|r| r.channel).collect();
    let s: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let a: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    let t: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.sent_at).collect();
    let e: Vec<Option<&str>> = rows.iter().map(|r| r.last_error.as_deref()).collect();
    let v: Vec<Option<i32>> = rows.iter().map(|r| r.template_version).collect();
    let h: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.handover.map(Handover::as_str))
        .collect();
    let o: Vec<Option<&str>> = rows.iter().map(|r| r.source.as_deref()).collect();
    diesel::sql_query(UPSERT)
        .bind::<Array<BigInt>, _>(b)
        .bind::<Array<Text>, _>(c)
        .bind::<Array<Text>, _>(s)
        .bind::<Array<Int4>, _>(a)
        .bind::<Array<Nullable<Timestamptz>>, _>(t)
        .bind::<Array<Nullable<Text>>, _>(e)
        .bind::<Array<Nullable<Int4>>, _>(v)
        .bind::<Array<Nullable<Text>>, _>(h)
        .bind::<Array<Nullable<Text>>, _>(o)
        .execute(conn)
        .await
}

/// Order of two updates of the same delivery: the state machine's (see [`DeliveryUpdate`]).
fn rank(u: &DeliveryUpdate) -> (i32, DeliveryStatus) {
    (u.attempts, u.status)
}

/// One request to claim a delivery for an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub bill_id: i64,
    pub channel: &'static str,
    /// The attempt the request carries (0 for the first on this channel).
    pub attempt: i32,
}

/// A claim's answer: whether this process now holds the delivery for the attempt, and if not,
/// the delivery's state that stood in the way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaimState {
    pub claimed: bool,
    pub status: Option<DeliveryStatus>,
    pub attempts: i32,
    /// The lease on a `sending` delivery has run out: its holder died.
    pub expired: bool,
    pub handover: Option<Handover>,
    /// The request record that recorded the outcome (see [`DeliveryUpdate::source`]).
    pub handover_source: Option<String>,
    pub last_error: Option<String>,
}

#[derive(QueryableByName)]
struct ClaimRow {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = Bool)]
    claimed: bool,
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = Nullable<Int4>)]
    attempts: Option<i32>,
    #[diesel(sql_type = Bool)]
    expired: bool,
    #[diesel(sql_type = Nullable<Text>)]
    handover: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    handover_source: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
}

/// Claims in one statement. A delivery is claimed for attempt `n` (it becomes `sending`,
/// `n + 1` attempts, with this owner and lease) when it does not exist yet, or stands
/// `queued` or `failed` at exactly `n` attempts (the attempt before this one), or (when
/// `take_over`) is `sending` at `n + 1` attempts with its lease run out. The state shown for
/// an unclaimed request is the one that stood in the way (the statement's snapshot).
const CLAIM: &str = "
    with req as (
      select * from unnest($1::bigint[], $2::text[], $3::int[]) as r(b, c, n)
    ), claimed as (
      insert into delivery (bill_id, channel, status, attempts, claim_owner, claim_until, updated_at)
      select b, c, 'sending', n + 1, $4, now() + make_interval(secs => $5), now() from req
      on conflict (bill_id, channel) do update
         set status = 'sending', attempts = excluded.attempts, handover = null,
             claim_owner = excluded.claim_owner, claim_until = excluded.claim_until, updated_at = now()
       where (delivery.status in ('queued', 'failed') and delivery.attempts = excluded.attempts - 1)
          or ($6 and delivery.status = 'sending' and delivery.attempts = excluded.attempts
              and delivery.claim_until < now())
      returning bill_id, channel
    )
    select r.b as bill_id, (c.bill_id is not null) as claimed, d.status, d.attempts,
           coalesce(d.claim_until < now(), false) as expired, d.handover, d.handover_source, d.last_error
    from req r
    left join claimed c on c.bill_id = r.b and c.channel = r.c
    left join delivery d on d.bill_id = r.b and d.channel = r.c";

/// A batching claimer for one process (`owner`) and one channel (its answers are matched by
/// bill id), with leases of `lease`. `take_over`: the
/// provider de-duplicates by idempotency key, so a delivery whose holder died mid-send may be
/// claimed again and re-sent (at least once); otherwise it is left for [`ClaimState::expired`]
/// handling (at most once).
pub fn claimer(
    pool: PgPool,
    owner: String,
    lease: Duration,
    take_over: bool,
) -> Batcher<ClaimRequest, ClaimState> {
    Batcher::spawn(
        "delivery-claimer",
        2,
        2000,
        move |batch: Vec<ClaimRequest>| {
            let (pool, owner) = (pool.clone(), owner.clone());
            async move {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                // One claim per delivery per statement (an upsert may touch a row once); a second
                // request for the same delivery in the batch is answered "not claimed" and waits.
                let mut seen = std::collections::HashSet::new();
                let first: Vec<&ClaimRequest> = batch
                    .iter()
                    .filter(|r| seen.insert((r.bill_id, r.channel)))
                    .collect();
                let rows: Vec<ClaimRow> = diesel::sql_query(CLAIM)
                    .bind::<Array<BigInt>, _>(first.iter().map(|r| r.bill_id).collect::<Vec<_>>())
                    .bind::<Array<Text>, _>(first.iter().map(|r| r.channel).collect::<Vec<_>>())
                    .bind::<Array<Int4>, _>(first.iter().map(|r| r.attempt).collect::<Vec<_>>())
                    .bind::<Text, _>(&owner)
                    .bind::<diesel::sql_types::Double, _>(lease.as_secs_f64())
                    .bind::<Bool, _>(take_over)
                    .load(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let by_bill: HashMap<i64, ClaimRow> =
                    rows.into_iter().map(|r| (r.bill_id, r)).collect();
                let mut claimed_now = std::collections::HashSet::new();
                Ok(batch
                    .iter()
                    .map(|r| match by_bill.get(&r.bill_id) {
                        Some(row) if row.claimed && claimed_now.insert(r.bill_id) => ClaimState {
                            claimed: true,
                            ..ClaimState::default()
                        },
                        Some(row) => ClaimState {
                            claimed: false,
                            status: row.status.as_deref().and_then(DeliveryStatus::parse),
                            attempts: row.attempts.unwrap_or(0),
                            expired: row.expired,
                            handover: row.handover.as_deref().and_then(Handover::parse),
                            handover_source: row.handover_source.clone(),
                            last_error: row.last_error.clone(),
                        },
                        None => ClaimState::default(),
                    })
                    .collect())
            }
        },
    )
}

/// A batching delivery writer. A batch is one upsert; if it is refused (a bill delivered on
/// two channels would break `delivery_sent_once`), its rows are written one by one so only
/// the offending one fails.
pub fn delivery_writer(pool: PgPool) -> Batcher<DeliveryUpdate, ()> {
    Batcher::spawn(
        "delivery-writer",
        2,
        2000,
        move |batch: Vec<DeliveryUpdate>| {
            let pool = pool.clone();
            async move {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                // One row per (bill, channel), or the upsert would touch a row twice.
                let mut latest: HashMap<(i64, &str), &DeliveryUpdate> = HashMap::new();
                for u in &batch {
                    let slot = latest.entry((u.bill_id, u.channel)).or_insert(u);
                    if rank(u) > rank(slot) {
                        *slot = u;
                    }
                }
                let rows: Vec<&DeliveryUpdate> = latest.into_values().collect();
                if upsert(&mut conn, &rows).await.is_ok() {
                    return Ok(vec![(); batch.len()]);
                }
                for r in &rows {
                    upsert(&mut conn, &[r]).await.map_err(|e| e.to_string())?;
                }
                Ok(vec![(); batch.len()])
            }
        },
    )
}

/// A template version.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct TemplateRow {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Int4)]
    pub version: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub subject: Option<String>,
    #[diesel(sql_type = Text)]
    pub body: String,
    #[diesel(sql_type = Bool)]
    pub active: bool,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub activated_at: Option<DateTime<Utc>>,
}

const TEMPLATE_COLUMNS: &str =
    "id, channel, name, version, subject, body, active, created_at, activated_at";

/// The active template of `channel`, if any.
pub async fn active_template(
    conn: &mut AsyncPgConnection,
    channel: &str,
) -> Result<Option<TemplateRow>, diesel::result::Error> {
    let rows: Vec<TemplateRow> = diesel::sql_query(format!(
        "select {TEMPLATE_COLUMNS} from template where channel = $1 and active"
    ))
    .bind::<Text, _>(channel)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next())
}

/// Every template version, by channel, name and version.
pub async fn list_templates(
    conn: &mut AsyncPgConnection,
) -> Result<Vec<TemplateRow>, diesel::result::Error> {
    diesel::sql_query(format!(
        "select {TEMPLATE_COLUMNS} from template order by channel, name, version"
    ))
    .load(conn)
    .await
}

/// One template version by id.
pub async fn template(
    conn: &mut AsyncPgConnection,
    id: i64,
) -> Result<Option<TemplateRow>, diesel::result::Error> {
    let rows: Vec<TemplateRow> = diesel::sql_query(format!(
        "select {TEMPLATE_COLUMNS} from template where id = $1"
    ))
    .bind::<BigInt, _>(id)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next())
}

/// Stores a new, inactive version of template `name` of `channel` (the next version number).
pub async fn create_template(
    conn: &mut AsyncPgConnection,
    channel: &str,
    name: &str,
    subject: Option<&str>,
    body: &str,
) -> Result<TemplateRow, diesel::result::Error> {
    let rows: Vec<TemplateRow> = diesel::sql_query(format!(
        "insert into template (channel, name, version, subject, body)
         select $1, $2, coalesce(max(version), 0) + 1, $3, $4
         from template where channel = $1 and name = $2
         returning {TEMPLATE_COLUMNS}"
    ))
    .bind::<Text, _>(channel)
    .bind::<Text, _>(name)
    .bind::<Nullable<Text>, _>(subject)
    .bind::<Text, _>(body)
    .load(conn)
    .await?;
    rows.into_iter()
        .next()
        .ok_or(diesel::result::Error::NotFound)
}

/// Makes template `id` its channel's only active one (the caller validated it).
pub async fn activate_template(
    conn: &mut AsyncPgConnection,
    id: i64,
) -> Result<(), diesel::result::Error> {
    // One statement: the partial unique index sees the end state only.
    diesel::sql_query(
        "update template t set active = (t.id = $1),
                activated_at = case when t.id = $1 then now() else t.activated_at end
         where t.channel = (select channel from template where id = $1)
           and (t.active or t.id = $1)",
    )
    .bind::<BigInt, _>(id)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(QueryableByName)]
struct QuietRow {
    #[diesel(sql_type = Time)]
    start_time: NaiveTime,
    #[diesel(sql_type = Time)]
    end_time: NaiveTime,
    #[diesel(sql_type = Text)]
    time_zone: String,
}

/// The system quiet hours.
pub async fn quiet_hours(
    conn: &mut AsyncPgConnection,
) -> Result<Option<Window>, diesel::result::Error> {
    let rows: Vec<QuietRow> =
        diesel::sql_query("select start_time, end_time, time_zone from quiet_hours where id = 1")
            .load(conn)
            .await?;
    Ok(rows.into_iter().next().map(|q| Window {
        start: q.start_time,
        end: q.end_time,
        tz: q.time_zone.parse::<Tz>().unwrap_or(chrono_tz::Asia::Seoul),
    }))
}

/// What operators may change while a processor runs: its channel's active template and the
/// quiet hours.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub template: Option<TemplateRow>,
    pub quiet_hours: Option<Window>,
}

/// [`LiveSettings`] re-read at most every `ttl`: a change is seen within that time.
pub struct Settings {
    pool: PgPool,
    channel: &'static str,
    ttl: Duration,
    cached: Mutex<Option<(Arc<LiveSettings>, Instant)>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub fn new(pool: PgPool, channel: &'static str, ttl: Duration) -> Self {
        Settings {
            pool,
            channel,
            ttl,
            cached: Mutex::new(None),
        }
    }

    /// The current settings (from the cache when fresh).
    pub async fn get(&self) -> Result<Arc<LiveSettings>, String> {
        let mut cached = self.cached.lock().await;
        if let Some((s, at)) = cached.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(s.clone());
        }
        let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
        let fresh = Arc::new(LiveSettings {
            template: active_template(&mut conn, self.channel)
                .await
                .map_err(|e| e.to_string())?,
            quiet_hours: quiet_hours(&mut conn).await.map_err(|e| e.to_string())?,
        });
        *cached = Some((fresh.clone(), Instant::now()));
        Ok(fresh)
    }
}
