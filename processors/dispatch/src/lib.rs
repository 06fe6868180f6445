//! Dispatch: settled bills into email requests, on the member's day, outside forbidden hours,
//! once.
//!
//! Consumes: PostgreSQL (`bill`, `member`, `quiet_hours`, `dispatch_reservation`).
//! Produces: `email-requests` (an [`EmailRequest`] per bill, attempt 0, keyed by member id).
//! Guarantee: one `dispatch` row per bill (its primary key), published at least once with the
//! deterministic delivery id `email-<bill id>`; the email processor de-duplicates on it.
//! Run: `dispatch` (a pass every hour and at each reservation's time), or one pass with
//! `billing dispatch [--now RFC3339]`.
//!
//! A pass at instant `now` (the injected clock), in BILLING_TZ:
//! 1. Passes are serialised by a PostgreSQL advisory lock, so the scheduler, the operator's
//!    button and a reservation never publish the same rows at once.
//! 2. Any pass left open by a crash is published first (see 5).
//! 3. Inside the system quiet hours (`quiet_hours`, a window that may cross midnight) nothing
//!    is selected: every due bill is held for a later pass.
//! 4. Due bills: settled bills of month M whose member's delivery day in month M+1 (a day past
//!    that month's end meaning its last day) is today or has passed without a dispatch
//!    (catch-up after an outage), plus the bills in the scope of a reservation whose time has
//!    come; read with the member's current preferences from `member`. Members inside their own
//!    do-not-disturb window are held, not dropped: the first pass after the window takes them.
//! 5. Outbox: one transaction records the pass (`dispatch_pass`), a `dispatch` row per
//!    selected bill and the reservations it fired. The pass's rows are then published in
//!    bill-id order, chunk by chunk, and after the broker acknowledged a chunk the pass's
//!    cursor `published_through` moves to its last bill. A crash between the database and
//!    Kafka leaves an open pass that the next pass publishes from its cursor; a crash after an
//!    acknowledgement but before the cursor moved repeats at most one chunk, with the same
//!    delivery ids.

pub mod reservation;
pub mod schedule;

use billing_runtime::{CommonArgs, ProduceError, Producer};
use billing_schema::{CodecError, EmailRequest, Encoder, Registry, catalogue::EMAIL_REQUESTS};
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Bool, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

pub use reservation::{Reservation, Scope};

/// The processor's name.
pub const NAME: &str = "dispatch";
/// Outbox rows published between two moves of the pass's cursor.
const CHUNK: usize = 100_000;
/// The advisory lock key that serialises passes (`dispatch` in ASCII).
const PASS_LOCK: i64 = 0x6469_7370_6174_6368;

/// The delivery id of a bill's email request: deterministic, so a repeat is recognisable.
pub fn delivery_id(bill_id: i64) -> String {
    format!("email-{bill_id}")
}

/// A pass failed; nothing it did is lost (an open pass is published by the next one).
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
    #[error("{0}")]
    Invalid(String),
}

/// What started a pass (recorded on `dispatch_pass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The processor's own schedule.
    Schedule,
    /// An operator's command (`billing dispatch`, the console's button).
    Operator,
    /// A reservation's time came.
    Reservation,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Operator => "operator",
            Trigger::Reservation => "reservation",
        }
    }
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
    /// Reservations this pass fired.
    pub reservations_fired: u64,
}

/// The preview's counts.
#[derive(Debug, QueryableByName)]
struct Selected {
    #[diesel(sql_type = BigInt)]
    selected: i64,
    #[diesel(sql_type = BigInt)]
    held: i64,
}

/// A due bill, as the selection returns it: its outbox row, or held.
#[derive(Debug, QueryableByName)]
struct Due {
    #[diesel(embed)]
    outbox: Outbox,
    #[diesel(sql_type = Bool)]
    held: bool,
}

/// An outbox row to publish.
#[derive(Debug, QueryableByName)]
struct Outbox {
    #[diesel(sql_type = BigInt)]
    bill_id: i64,
    #[diesel(sql_type = BigInt)]
    member_id: i64,
    #[diesel(sql_type = Text)]
    billing_month: String,
    #[diesel(sql_type = Timestamptz)]
    requested_at: DateTime<Utc>,
}

#[derive(Debug, QueryableByName)]
struct OpenPass {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    published_through: Option<i64>,
}

#[derive(Debug, QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The due bills not yet dispatched at `$1` (now) in time zone `$2`, with whether the
/// member's do-not-disturb window holds them (`held`). A bill is due on its member's delivery
/// day of the following month (clamped to that month's last day) or any day after it, or once
/// a reservation covering it has come (a reservation covers the bills settled by its time, of
/// its month if it names one, of its members if it lists them).
const DUE: &str = "
    with clock as (select ($1::timestamptz at time zone $2) as local),
    -- per month, not per bill: the first day of the delivery month and its length
    months as materialized (
      select billing_month,
             (to_date(billing_month || '-01', 'YYYY-MM-DD') + interval '1 month')::date as next_start,
             extract(day from to_date(billing_month || '-01', 'YYYY-MM-DD') + interval '2 month'
                              - interval '1 day')::int as next_days
      from (select distinct billing_month from bill) x),
    reserved as materialized (
      select fire_at, billing_month, member_ids from dispatch_reservation where fire_at <= $1),
    due as (
      select b.id as bill_id, b.member_id, b.billing_month, (c.local::time) as now_time,
             m.dnd_start, m.dnd_end,
             least(m.delivery_day::int, mo.next_days) <= (c.local::date - mo.next_start) + 1
             or exists (select 1 from reserved r
                        where b.settled_at <= r.fire_at
                          and (r.billing_month is null or r.billing_month = b.billing_month)
                          and (r.member_ids is null or b.member_id = any(r.member_ids))) as is_due
      from bill b
      join months mo on mo.billing_month = b.billing_month
      join member m on m.id = b.member_id
      cross join clock c
      where not exists (select 1 from dispatch d where d.bill_id = b.id))
    select bill_id, member_id, billing_month,
           (dnd_start is not null and case when dnd_start <= dnd_end
               then now_time >= dnd_start and now_time < dnd_end
               else now_time >= dnd_start or now_time < dnd_end end) as held
    from due where is_due";

/// Planner settings for the transactions that evaluate the due set (a pass's selection, a
/// preview). The selection inserts into `dispatch` while its anti-join reads `dispatch`: a
/// nested loop over a scan of `dispatch` (chosen when the table's statistics say it is empty,
/// as after an `analyze` of an empty table) rescans the pages the statement itself is filling
/// for every bill, which is quadratic (a million bills did not finish in 12 minutes); a
/// preview with statistics that lag behind a large pass would scan the whole outbox per bill.
/// Hash and merge joins read `dispatch` once.
const SELECTION_SETTINGS: &str = "set local enable_nestloop = off";

/// The selection: inserts the due bills that are not held (none in quiet hours, `$4`) into the
/// outbox for pass `$3`, and returns every due bill with whether it was held, in one
/// evaluation of the due set (each evaluation scans every undispatched bill); the pass
/// publishes the rows it inserted from this answer, not from a second read of the outbox. No
/// `on conflict`: the advisory lock keeps passes apart and the due set excludes dispatched
/// bills, so a conflict would be a bug, and it fails the transaction. (A data-modifying `with`
/// runs to completion whether or not the outer query reads it.)
fn selection() -> String {
    format!(
        "with d as materialized ({DUE}),
              ins as (insert into dispatch (bill_id, member_id, requested_at, pass_id)
                      select bill_id, member_id, $1, $3 from d where not held and not $4)
         select bill_id, member_id, billing_month, $1 as requested_at, held or $4 as held
         from d"
    )
}

/// What a preview counts: the due set at `$1` in time zone `$2`, and how much of it is held.
fn preview_statement() -> String {
    format!(
        "select count(*)::bigint as selected, count(*) filter (where held)::bigint as held from ({DUE}) d"
    )
}

/// The plans of a pass's selection and of a preview at `now`, under the pass's settings,
/// without running them. For tests: no plan may depend on how stale `dispatch`'s statistics
/// are.
#[doc(hidden)]
pub async fn explain_selection(
    common: &CommonArgs,
    now: DateTime<Utc>,
) -> Result<String, DispatchError> {
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let mut conn = billing_db::connect(&common.database_url).await?;
    let tz = common.billing_tz.name().to_string();
    let lines = conn
        .transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
            conn.batch_execute(SELECTION_SETTINGS).await?;
            let mut lines = diesel::sql_query(format!("explain {}", selection()))
                .bind::<Timestamptz, _>(now)
                .bind::<Text, _>(&tz)
                .bind::<BigInt, _>(0_i64)
                .bind::<Bool, _>(false)
                .load::<Line>(conn)
                .await?;
            lines.extend(
                diesel::sql_query(format!("explain {}", preview_statement()))
                    .bind::<Timestamptz, _>(now)
                    .bind::<Text, _>(&tz)
                    .load::<Line>(conn)
                    .await?,
            );
            Ok(lines)
        })
        .await?;
    Ok(lines
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n"))
}

#[derive(Debug, QueryableByName)]
struct QuietNow {
    #[diesel(sql_type = Bool)]
    quiet: bool,
}

/// Whether `now` is inside the system quiet hours (the `quiet_hours` row, read in its own
/// time zone; a window may cross midnight).
pub async fn in_quiet_hours(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
) -> Result<bool, diesel::result::Error> {
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

/// What a pass at an instant would do, without doing it (the console's preview).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Preview {
    /// The system quiet hours hold every due bill.
    pub quiet_hours: bool,
    /// Due bills not dispatched yet.
    pub due: u64,
    /// Of those, held by their member's do-not-disturb window.
    pub held_by_window: u64,
}

impl Preview {
    /// Bills a pass would dispatch now.
    pub fn would_dispatch(&self) -> u64 {
        if self.quiet_hours {
            0
        } else {
            self.due - self.held_by_window
        }
    }
}

/// Counts what a pass at `now` would select and hold (same due set as the pass; one scan).
pub async fn preview(common: &CommonArgs, now: DateTime<Utc>) -> Result<Preview, DispatchError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let quiet = in_quiet_hours(&mut conn, now).await?;
    let tz = common.billing_tz.name();
    // Read-only, but the same anti-join: with stale statistics a nested loop would scan the
    // whole outbox once per undispatched bill.
    let counts: Vec<Selected> = conn
        .transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
            conn.batch_execute(SELECTION_SETTINGS).await?;
            diesel::sql_query(preview_statement())
                .bind::<Timestamptz, _>(now)
                .bind::<Text, _>(tz)
                .load(conn)
                .await
        })
        .await?;
    let (due, held) = counts
        .as_slice()
        .first()
        .map_or((0, 0), |c| (c.selected, c.held));
    Ok(Preview {
        quiet_hours: quiet,
        due: u64::try_from(due).unwrap_or(0),
        held_by_window: u64::try_from(held).unwrap_or(0),
    })
}

/// One dispatch pass at `now`.
pub async fn run_pass(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
) -> Result<PassSummary, DispatchError> {
    pass(common, now, trigger, false).await
}

/// A pass that stops right after its transaction committed, before anything is published:
/// what a crash between PostgreSQL and Kafka leaves behind. For tests and drills.
#[doc(hidden)]
pub async fn run_pass_interrupted(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
) -> Result<PassSummary, DispatchError> {
    pass(common, now, trigger, true).await
}

async fn pass(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
    interrupt: bool,
) -> Result<PassSummary, DispatchError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    // Session-level: released when this connection closes, even if the pass fails.
    diesel::sql_query("select pg_advisory_lock($1)")
        .bind::<BigInt, _>(PASS_LOCK)
        .execute(&mut conn)
        .await?;
    // The due set and the outbox read join a million bills with a million members or
    // dispatch rows: in the default 4 MB their hash joins spill to disk.
    diesel::sql_query("set work_mem = '64MB'")
        .execute(&mut conn)
        .await?;
    let publisher = Publisher::new(common).await?;
    let mut summary = PassSummary {
        published: publisher.publish_open(&mut conn).await?,
        ..PassSummary::default()
    };

    let tz = common.billing_tz.name().to_string();
    let quiet = in_quiet_hours(&mut conn, now).await?;
    summary.quiet_hours = quiet;
    let started = std::time::Instant::now();
    let selection = select(&mut conn, now, trigger, &tz, quiet).await?;
    summary.selected = selection.rows.len() as u64;
    summary.held = selection.held;
    summary.reservations_fired = selection.fired;
    if interrupt {
        return Ok(summary);
    }
    let select_ms = started.elapsed().as_millis();
    if !selection.rows.is_empty() {
        summary.published += publisher
            .publish_rows(&mut conn, selection.pass_id, &selection.rows)
            .await?;
    }
    tracing::info!(%now, trigger = trigger.as_str(), quiet_hours = summary.quiet_hours, select_ms,
        publish_ms = started.elapsed().as_millis() - select_ms,
        selected = summary.selected, held = summary.held, published = summary.published,
        reservations_fired = summary.reservations_fired, "dispatch pass");
    Ok(summary)
}

/// What a pass's transaction did.
struct Selection {
    pass_id: i64,
    /// The bills put in the outbox, in bill-id order.
    rows: Vec<Outbox>,
    held: u64,
    fired: u64,
}

/// The pass's transaction: records the pass, puts its due bills in the outbox and marks the
/// reservations it fired (see the module's step 5). A pass that selected nothing is complete.
async fn select(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    trigger: Trigger,
    tz: &str,
    quiet: bool,
) -> Result<Selection, diesel::result::Error> {
    conn.transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
        conn.batch_execute(SELECTION_SETTINGS).await?;
        let pass: Vec<Id> = diesel::sql_query(
            "insert into dispatch_pass (run_at, trigger) values ($1, $2) returning id",
        )
        .bind::<Timestamptz, _>(now)
        .bind::<Text, _>(trigger.as_str())
        .load(conn)
        .await?;
        let pass_id = pass.as_slice().first().map_or(0, |p| p.id);
        let due: Vec<Due> = diesel::sql_query(selection())
            .bind::<Timestamptz, _>(now)
            .bind::<Text, _>(tz)
            .bind::<BigInt, _>(pass_id)
            .bind::<Bool, _>(quiet)
            .load(conn)
            .await?;
        let held = due.iter().filter(|d| d.held).count();
        let mut rows: Vec<Outbox> = due
            .into_iter()
            .filter_map(|d| (!d.held).then_some(d.outbox))
            .collect();
        rows.sort_unstable_by_key(|r| r.bill_id);
        diesel::sql_query(
            "update dispatch_pass set selected = $2, held = $3,
                    completed_at = case when $2 = 0 then now() end where id = $1",
        )
        .bind::<BigInt, _>(pass_id)
        .bind::<BigInt, _>(i64::try_from(rows.len()).unwrap_or(i64::MAX))
        .bind::<BigInt, _>(i64::try_from(held).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
        let fired = diesel::sql_query(
            "update dispatch_reservation set fired_at = $1, pass_id = $2
             where fired_at is null and fire_at <= $1",
        )
        .bind::<Timestamptz, _>(now)
        .bind::<BigInt, _>(pass_id)
        .execute(conn)
        .await?;
        Ok(Selection {
            pass_id,
            rows,
            held: held as u64,
            fired: fired as u64,
        })
    })
    .await
}

/// Publishes outbox rows and moves each pass's cursor.
struct Publisher {
    producer: Producer,
    encoder: Encoder<EmailRequest>,
    topic: String,
}

impl Publisher {
    async fn new(common: &CommonArgs) -> Result<Self, DispatchError> {
        let catalogue = common.catalogue();
        let registry = Registry::new(&common.schema_registry_url)?;
        let encoder = Encoder::<EmailRequest>::register(
            &registry,
            &catalogue.value_subject(&EMAIL_REQUESTS.spec),
        )
        .await?;
        Ok(Publisher {
            producer: Producer::new(&common.kafka())?,
            encoder,
            topic: catalogue.name(&EMAIL_REQUESTS.spec),
        })
    }

    /// Publishes every open pass from its cursor, oldest first; returns how many requests.
    async fn publish_open(&self, conn: &mut AsyncPgConnection) -> Result<u64, DispatchError> {
        let open: Vec<OpenPass> = diesel::sql_query(
            "select id, published_through from dispatch_pass where completed_at is null order by id",
        )
        .load(conn)
        .await?;
        let mut published = 0;
        for pass in open {
            published += self.publish_pass(conn, &pass).await?;
        }
        Ok(published)
    }

    async fn publish_pass(
        &self,
        conn: &mut AsyncPgConnection,
        pass: &OpenPass,
    ) -> Result<u64, DispatchError> {
        let rows: Vec<Outbox> = diesel::sql_query(
            "select d.bill_id, d.member_id, b.billing_month, d.requested_at
             from dispatch d join bill b on b.id = d.bill_id
             where d.pass_id = $1 and d.bill_id > $2 order by d.bill_id",
        )
        .bind::<BigInt, _>(pass.id)
        .bind::<BigInt, _>(pass.published_through.unwrap_or(i64::MIN))
        .load(conn)
        .await?;
        self.publish_rows(conn, pass.id, &rows).await
    }

    /// Publishes pass `pass_id`'s outbox `rows` (in bill-id order, none at or before its
    /// cursor), moving the cursor after each acknowledged chunk, then completes the pass.
    async fn publish_rows(
        &self,
        conn: &mut AsyncPgConnection,
        pass_id: i64,
        rows: &[Outbox],
    ) -> Result<u64, DispatchError> {
        let mut published = 0u64;
        for chunk in rows.chunks(CHUNK) {
            let mut pending = Vec::with_capacity(chunk.len());
            for r in chunk {
                let request = EmailRequest {
                    delivery_id: delivery_id(r.bill_id),
                    bill_id: r.bill_id,
                    member_id: r.member_id,
                    billing_month: r.billing_month.clone(),
                    attempt: 0,
                    requested_at: r.requested_at.timestamp_millis(),
                    not_before: None,
                    last_error: None,
                };
                let key = r.member_id.to_string();
                let payload = self.encoder.encode(&request)?;
                pending.push(
                    self.producer
                        .enqueue(&self.topic, Some(key.as_bytes()), Some(&payload), None)
                        .await?,
                );
            }
            for p in pending {
                p.wait().await?;
            }
            let last = chunk.last().map_or(i64::MIN, |r| r.bill_id);
            diesel::sql_query("update dispatch_pass set published_through = $2 where id = $1")
                .bind::<BigInt, _>(pass_id)
                .bind::<BigInt, _>(last)
                .execute(conn)
                .await?;
            published += chunk.len() as u64;
        }
        diesel::sql_query("update dispatch_pass set completed_at = now() where id = $1")
            .bind::<BigInt, _>(pass_id)
            .execute(conn)
            .await?;
        Ok(published)
    }
}
