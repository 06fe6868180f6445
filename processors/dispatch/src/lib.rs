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
//! 5. Outbox: the pass is recorded (`dispatch_pass`), then its due set is selected chunk by
//!    chunk in bill-id order (one month's bills of a range of members each; the bill id names
//!    both, `bill_id_names_month_and_member`), each chunk in a transaction of its own that
//!    puts a `dispatch` row per selected bill, on [`SELECTORS`] connections ahead of
//!    publishing. Each committed chunk is published in bill-id order, and after the broker
//!    acknowledged it the pass's cursor `published_through` moves to its last bill. The pass
//!    is completed, with its counts and the reservations it fired, after the last chunk. A
//!    crash leaves an open pass whose committed rows the next pass publishes from its cursor
//!    (chunks commit in order of publishing, so every row past the cursor is still to be
//!    published; a crash after an acknowledgement but before the cursor moved repeats at
//!    most one chunk, with the same delivery ids), and bills of chunks not yet committed due.

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
/// Members per chunk of a pass: a chunk is selected in one transaction and published between
/// two moves of the pass's cursor.
const CHUNK_MEMBERS: i64 = 100_000;
/// Chunks per month at most: member ids spread thinly (a billion ids for a million members)
/// make wider chunks instead of thousands of nearly empty transactions.
const MAX_CHUNKS_PER_MONTH: i64 = 64;
/// Chunks selected at once, each on a connection of its own, while the pass publishes the
/// chunk before them: the due set's joins and the outbox's inserts are PostgreSQL's work, the
/// encoding and the broker's acknowledgements the pass's, so the two overlap on two cores.
pub const SELECTORS: usize = 2;
/// Outbox rows published between two moves of the cursor when an open pass is read back.
const PIECE: usize = 100_000;
/// Bill ids of one month span this many ids (`billing_domain::rules::bill_id`).
const MONTH_SPAN: i64 = 10_000_000_000;
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

/// The due bills not yet dispatched at `$1` (now) in time zone `$2`, among the bills with ids
/// `$5..=$6` and members `$7..=$8` (a [`Chunk`]), with whether the member's do-not-disturb
/// window holds them (`held`). A bill is due on its member's delivery
/// day of the following month (clamped to that month's last day) or any day after it, or once
/// a reservation covering it has come (a reservation covers the bills settled by its time, of
/// its month if it names one, of its members if it lists them).
const DUE: &str = "
    with clock as (select ($1::timestamptz at time zone $2) as local),
    -- per month, not per bill: the first day of the delivery month and its length; the months
    -- are read off the month index one by one (a probe per month, not a scan of the bills)
    months as materialized (
      select billing_month,
             (to_date(billing_month || '-01', 'YYYY-MM-DD') + interval '1 month')::date as next_start,
             extract(day from to_date(billing_month || '-01', 'YYYY-MM-DD') + interval '2 month'
                              - interval '1 day')::int as next_days
      from (with recursive ms(billing_month) as (
              select min(billing_month) from bill
              union all
              select (select min(billing_month) from bill where billing_month > ms.billing_month)
              from ms where ms.billing_month is not null)
            select billing_month from ms where billing_month is not null) x),
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
      where b.id between $5 and $6 and m.id between $7 and $8
        and not exists (select 1 from dispatch d where d.bill_id = b.id and d.bill_id between $5 and $6))
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

/// A chunk's selection: inserts its due bills that are not held (none in quiet hours, `$4`)
/// into the outbox for pass `$3`, and returns every due bill of the chunk with whether it was
/// held, in one evaluation of the due set; the pass publishes the rows it inserted from this
/// answer, not from a second read of the outbox. No
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

/// What a preview counts: the due set at `$1` in time zone `$2` (within the chunk `$5..=$8`,
/// [`Chunk::ALL`] for a preview; `$3` and `$4` are unused), and how much of it is held.
fn preview_statement() -> String {
    format!(
        "select count(*)::bigint as selected, count(*) filter (where held)::bigint as held from ({DUE}) d"
    )
}

/// Binds the due set's parameters to `query`: now, the time zone, the pass, quiet hours and
/// the chunk (`$1..=$8`, see [`DUE`]).
macro_rules! bind_due {
    ($query:expr, $now:expr, $tz:expr, $pass:expr, $quiet:expr, $chunk:expr) => {
        $query
            .bind::<Timestamptz, _>($now)
            .bind::<Text, _>($tz)
            .bind::<BigInt, _>($pass)
            .bind::<Bool, _>($quiet)
            .bind::<BigInt, _>($chunk.bills.0)
            .bind::<BigInt, _>($chunk.bills.1)
            .bind::<BigInt, _>($chunk.members.0)
            .bind::<BigInt, _>($chunk.members.1)
    };
}

/// The plans of a pass's first chunk's selection and of a preview at `now`, under the pass's
/// settings, without running them. For tests: no plan may depend on how stale `dispatch`'s
/// statistics are.
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
    let chunks = plan_chunks(&mut conn, CHUNK_MEMBERS).await?;
    let chunk = chunks.as_slice().first().copied().unwrap_or(Chunk::ALL);
    let lines = conn
        .transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
            conn.batch_execute(SELECTION_SETTINGS).await?;
            let explain = |statement: String| diesel::sql_query(format!("explain {statement}"));
            let mut lines = bind_due!(explain(selection()), now, &tz, 0_i64, false, chunk)
                .load::<Line>(conn)
                .await?;
            let preview = explain(preview_statement());
            lines.extend(
                bind_due!(preview, now, &tz, 0_i64, false, Chunk::ALL)
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
            let query = diesel::sql_query(preview_statement());
            bind_due!(query, now, tz, 0_i64, false, Chunk::ALL)
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
    pass(common, now, trigger, Drill::NONE).await
}

/// A pass that stops right after its first chunk committed, before anything is published:
/// what a crash between PostgreSQL and Kafka leaves behind. For tests and drills.
#[doc(hidden)]
pub async fn run_pass_interrupted(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
) -> Result<PassSummary, DispatchError> {
    let drill = Drill {
        crash_after_chunks: Some(0),
        ..Drill::NONE
    };
    pass(common, now, trigger, drill).await
}

/// How a drill shapes a pass (tests).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drill {
    /// Members per chunk.
    pub chunk_members: i64,
    /// Stop as a crash would, once this many chunks are published and the next one is
    /// committed: the pass stays open, and chunks selected ahead may be committed too.
    pub crash_after_chunks: Option<usize>,
}

impl Drill {
    /// A pass as it runs in production.
    pub const NONE: Drill = Drill {
        chunk_members: CHUNK_MEMBERS,
        crash_after_chunks: None,
    };
}

/// A pass shaped by a drill (tests).
#[doc(hidden)]
pub async fn run_pass_drill(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
    drill: Drill,
) -> Result<PassSummary, DispatchError> {
    pass(common, now, trigger, drill).await
}

async fn pass(
    common: &CommonArgs,
    now: DateTime<Utc>,
    trigger: Trigger,
    drill: Drill,
) -> Result<PassSummary, DispatchError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    // Session-level: released when this connection closes, even if the pass fails.
    diesel::sql_query("select pg_advisory_lock($1)")
        .bind::<BigInt, _>(PASS_LOCK)
        .execute(&mut conn)
        .await?;
    // An open pass's read joins its outbox rows with their bills: in the default 4 MB a
    // million-row hash join spills to disk.
    diesel::sql_query("set work_mem = '64MB'")
        .execute(&mut conn)
        .await?;
    let publisher = Publisher::new(common).await?;
    let mut summary = PassSummary {
        published: publisher.publish_open(&mut conn).await?,
        ..PassSummary::default()
    };

    let started = std::time::Instant::now();
    let quiet = in_quiet_hours(&mut conn, now).await?;
    summary.quiet_hours = quiet;
    let pass_id = open_pass(&mut conn, now, trigger).await?;
    let args = PassArgs {
        now,
        tz: common.billing_tz.name().to_string(),
        pass_id,
        quiet,
    };
    let chunks = plan_chunks(&mut conn, drill.chunk_members).await?;
    let (mut selected, selecting) = select_ahead(common.database_url.clone(), chunks, args);
    let published = publish_chunks(&publisher, &mut conn, pass_id, &mut selected, drill).await;
    // The selections end before the pass does (and before its lock is released): a chunk in
    // flight commits or rolls back now, not under the next pass.
    drop(selected);
    let _ = selecting.await;
    let (counts, waited) = published?;
    summary.selected = counts.selected;
    summary.held = counts.held;
    summary.published += counts.published;
    if drill.crash_after_chunks.is_some() {
        return Ok(summary);
    }
    summary.reservations_fired = close_pass(&mut conn, pass_id, now, &summary).await?;
    tracing::info!(%now, trigger = trigger.as_str(), quiet_hours = summary.quiet_hours,
        pass_ms = started.elapsed().as_millis(), waited_for_selection_ms = waited.as_millis(),
        selected = summary.selected, held = summary.held, published = summary.published,
        reservations_fired = summary.reservations_fired, "dispatch pass");
    Ok(summary)
}

/// Publishes each chunk as its selection arrives, in order; returns the pass's counts and
/// how long it waited for selections.
async fn publish_chunks(
    publisher: &Publisher,
    conn: &mut AsyncPgConnection,
    pass_id: i64,
    selected: &mut tokio::sync::mpsc::Receiver<Result<ChunkSelection, DispatchError>>,
    drill: Drill,
) -> Result<(PassSummary, std::time::Duration), DispatchError> {
    let mut counts = PassSummary::default();
    let mut waited = std::time::Duration::ZERO;
    let mut chunks = 0;
    loop {
        let waiting = std::time::Instant::now();
        let Some(chunk) = selected.recv().await else {
            return Ok((counts, waited));
        };
        waited += waiting.elapsed();
        let chunk = chunk?;
        counts.selected += chunk.rows.len() as u64;
        counts.held += chunk.held;
        if drill.crash_after_chunks == Some(chunks) {
            return Ok((counts, waited));
        }
        if !chunk.rows.is_empty() {
            counts.published += publisher.publish_rows(conn, pass_id, &chunk.rows).await?;
        }
        chunks += 1;
    }
}

/// A share of a pass's due set: the bills of one month whose members' ids are in `members`,
/// which are the bills with ids in `bills` (the id names the month and the member:
/// `bill_id_names_month_and_member`). Both ranges are inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    bills: (i64, i64),
    members: (i64, i64),
}

impl Chunk {
    /// Every bill: a preview's scope.
    const ALL: Chunk = Chunk {
        bills: (i64::MIN, i64::MAX),
        members: (i64::MIN, i64::MAX),
    };
}

#[derive(Debug, QueryableByName)]
struct MonthBills {
    #[diesel(sql_type = BigInt)]
    first: i64,
    #[diesel(sql_type = BigInt)]
    last: i64,
}

/// A pass's chunks in bill-id order: for each month that has bills (read off the bill index,
/// not scanned), its range of bill ids cut every `width` members.
async fn plan_chunks(
    conn: &mut AsyncPgConnection,
    width: i64,
) -> Result<Vec<Chunk>, diesel::result::Error> {
    let months: Vec<MonthBills> = diesel::sql_query(
        "with recursive months(bm) as (
           select min(billing_month) from bill
           union all
           select (select min(billing_month) from bill where billing_month > bm) from months
           where bm is not null)
         select b.first, b.last
         from months, lateral (select replace(bm, '-', '')::bigint * $1 as base) m,
              lateral (select min(id) as first, max(id) as last from bill
                       where id between m.base and m.base + $1 - 1) b
         where bm is not null and b.first is not null
         order by b.first",
    )
    .bind::<BigInt, _>(MONTH_SPAN)
    .load(conn)
    .await?;
    Ok(months
        .iter()
        .flat_map(|m| chunks_of_month(m.first, m.last, width))
        .collect())
}

/// One month's bill ids `first..=last` (all of one month) as chunks of `width` members, or
/// as [`MAX_CHUNKS_PER_MONTH`] wider ones if the ids are spread too thinly for that.
fn chunks_of_month(first: i64, last: i64, width: i64) -> impl Iterator<Item = Chunk> {
    let base = first - first.rem_euclid(MONTH_SPAN);
    let span = last.saturating_sub(first).saturating_add(1);
    let width = width
        .max(1)
        .max((span + MAX_CHUNKS_PER_MONTH - 1) / MAX_CHUNKS_PER_MONTH);
    let mut lo = first;
    std::iter::from_fn(move || {
        (lo <= last).then(|| {
            let hi = lo.saturating_add(width - 1).min(last);
            let chunk = Chunk {
                bills: (lo, hi),
                members: (lo - base, hi - base),
            };
            lo = hi.saturating_add(1);
            chunk
        })
    })
}

/// What every chunk's selection of one pass shares.
#[derive(Debug, Clone)]
struct PassArgs {
    now: DateTime<Utc>,
    tz: String,
    pass_id: i64,
    /// Inside the system quiet hours: every due bill is held.
    quiet: bool,
}

/// What a chunk's transaction did.
struct ChunkSelection {
    /// The bills put in the outbox, in bill-id order.
    rows: Vec<Outbox>,
    held: u64,
}

/// Records a pass (committed on its own: a pass that dies before its first chunk is an open
/// pass without rows, which the next pass completes).
async fn open_pass(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    trigger: Trigger,
) -> Result<i64, diesel::result::Error> {
    let pass: Vec<Id> = diesel::sql_query(
        "insert into dispatch_pass (run_at, trigger) values ($1, $2) returning id",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<Text, _>(trigger.as_str())
    .load(conn)
    .await?;
    Ok(pass.as_slice().first().map_or(0, |p| p.id))
}

/// Selects `chunks` in order, [`SELECTORS`] at a time on connections of their own, at most a
/// chunk ahead of the caller, which publishes each as it arrives. A chunk reaches the caller
/// only after its transaction committed. The selections stop at the first error (it is the
/// last thing sent) or when the caller stops listening: no further chunk starts, the ones in
/// flight finish (committed, they stay in the open pass for the next pass to publish), and
/// the task ends; the rest of the due set stays due.
fn select_ahead(
    url: String,
    chunks: Vec<Chunk>,
    args: PassArgs,
) -> (
    tokio::sync::mpsc::Receiver<Result<ChunkSelection, DispatchError>>,
    tokio::task::JoinHandle<()>,
) {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(async move {
        let pool = match billing_db::pool(&url, SELECTORS) {
            Ok(pool) => pool,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let args = std::sync::Arc::new(args);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let todo = chunks.into_iter().take_while({
            let stop = stop.clone();
            move |_| !AtomicBool::load(&stop, Relaxed)
        });
        let mut selections = futures::stream::iter(todo)
            .map(|chunk| {
                let (pool, args) = (pool.clone(), args.clone());
                async move {
                    let mut conn = pool
                        .get()
                        .await
                        .map_err(|e| billing_db::DbError::Pool(e.to_string()))?;
                    Ok(select_chunk(&mut conn, chunk, &args).await?)
                }
            })
            .buffered(SELECTORS);
        while let Some(selection) = selections.next().await {
            if AtomicBool::load(&stop, Relaxed) {
                continue; // draining the chunks in flight
            }
            let failed = selection.is_err();
            if tx.send(selection).await.is_err() || failed {
                stop.store(true, Relaxed);
            }
        }
    });
    (rx, task)
}

/// One chunk's transaction: its due bills that are not held go into the outbox.
async fn select_chunk(
    conn: &mut AsyncPgConnection,
    chunk: Chunk,
    args: &PassArgs,
) -> Result<ChunkSelection, diesel::result::Error> {
    conn.transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
        conn.batch_execute(SELECTION_SETTINGS).await?;
        // The chunk's hash joins in memory (4 MB, the default, spills a member range to disk).
        conn.batch_execute("set local work_mem = '64MB'").await?;
        let query = diesel::sql_query(selection());
        let due: Vec<Due> = bind_due!(query, args.now, &args.tz, args.pass_id, args.quiet, chunk)
            .load(conn)
            .await?;
        let held = due.iter().filter(|d| d.held).count() as u64;
        let mut rows: Vec<Outbox> = due
            .into_iter()
            .filter_map(|d| (!d.held).then_some(d.outbox))
            .collect();
        rows.sort_unstable_by_key(|r| r.bill_id);
        Ok(ChunkSelection { rows, held })
    })
    .await
}

/// Records what the pass selected and the reservations it fired, and completes it (every row
/// is published); returns the reservations fired.
/// A reservation is marked only here, after the whole due set: if the pass dies first, the
/// reservation is still unfired and its pass runs again (its bills stay due either way).
async fn close_pass(
    conn: &mut AsyncPgConnection,
    pass_id: i64,
    now: DateTime<Utc>,
    summary: &PassSummary,
) -> Result<u64, diesel::result::Error> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    conn.transaction::<_, diesel::result::Error, _>(async move |conn: &mut AsyncPgConnection| {
        diesel::sql_query(
            "update dispatch_pass set selected = $2, held = $3, completed_at = now() where id = $1",
        )
        .bind::<BigInt, _>(pass_id)
        .bind::<BigInt, _>(count(summary.selected))
        .bind::<BigInt, _>(count(summary.held))
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
        Ok(fired as u64)
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
        let published = self.publish_rows(conn, pass.id, &rows).await?;
        diesel::sql_query("update dispatch_pass set completed_at = now() where id = $1")
            .bind::<BigInt, _>(pass.id)
            .execute(conn)
            .await?;
        Ok(published)
    }

    /// Publishes pass `pass_id`'s outbox `rows` (in bill-id order, none at or before its
    /// cursor), moving the cursor after each acknowledged [`PIECE`].
    async fn publish_rows(
        &self,
        conn: &mut AsyncPgConnection,
        pass_id: i64,
        rows: &[Outbox],
    ) -> Result<u64, DispatchError> {
        let mut published = 0u64;
        for chunk in rows.chunks(PIECE) {
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
        Ok(published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_is_cut_into_member_ranges_that_cover_it_once_in_bill_id_order() {
        // Given November's bills of members 3..=25 (ids 2026110000000003..=2026110000000025)
        let (first, last) = (2_026_110_000_000_003, 2_026_110_000_000_025);

        // When cut every 10 members
        let chunks: Vec<Chunk> = chunks_of_month(first, last, 10).collect();

        // Then three chunks cover every bill once, each naming its members
        let bills: Vec<(i64, i64)> = chunks.iter().map(|c| c.bills).collect();
        let members: Vec<(i64, i64)> = chunks.iter().map(|c| c.members).collect();
        assert_eq!(
            bills,
            [
                (2_026_110_000_000_003, 2_026_110_000_000_012),
                (2_026_110_000_000_013, 2_026_110_000_000_022),
                (2_026_110_000_000_023, 2_026_110_000_000_025)
            ]
        );
        assert_eq!(members, [(3, 12), (13, 22), (23, 25)]);
        // And a month of one bill is one chunk, whatever the width
        let one: Vec<Chunk> = chunks_of_month(first, first, 0).collect();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].members, (3, 3));
        // And members spread over every possible id make 64 chunks, not 100,000, that still
        // cover the month once, in order
        let base = 2_026_110_000_000_000;
        let (first, last) = (base + 1, base + 9_999_999_999);
        let sparse: Vec<Chunk> = chunks_of_month(first, last, 100_000).collect();
        assert_eq!(sparse.len(), 64);
        assert_eq!(sparse[0].bills.0, first);
        assert_eq!(sparse[63].bills.1, last);
        assert!(sparse.windows(2).all(|w| w[1].bills.0 == w[0].bills.1 + 1));
        assert!(
            sparse
                .iter()
                .all(|c| c.members == (c.bills.0 - base, c.bills.1 - base))
        );
    }
}
