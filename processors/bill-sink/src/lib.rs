//! The bill sink: `bills` and `members` into PostgreSQL.
//!
//! Consumes `bills` (writes `bill`, then its `bill_item` rows, each item with its JSON
//! snapshot) and `members` (upserts `member`, deletes on a tombstone), in batches of up to
//! `batch_size` records, one database transaction per batch, `writers` transactions at once
//! (the runtime's batch loop, [`billing_runtime::batch`], one lane per partition group).
//!
//! Guarantees (exactly-once effect in PostgreSQL):
//! - The batch's next offsets are written to `consumer_offset` in the same transaction as
//!   its rows. At start, those offsets are committed to the group (a partition's beginning
//!   where the database holds none), so a restart resumes exactly where the data stopped
//!   and an emptied database is loaded again; Kafka's own commits, made after each
//!   transaction, are only a hint.
//! - Each transaction first locks its partitions' offset rows and skips the records below
//!   them ([`lock_offsets`]): an instance that reads from a lagging hint after a rebalance,
//!   or two writers, can never move a row or an offset back.
//! - A batch is COPYed into session-local staging tables, then moved in one statement: a bill
//!   with `on conflict (member_id, billing_month) do nothing`, and its items only if the bill
//!   itself was inserted: replays, re-runs and concurrent sinks can never duplicate a bill or
//!   add items to an existing one.
//! - A record that does not decode is quarantined to `dead-letters` (acknowledged) before
//!   the transaction that moves the offset past it commits.
//!
//! Run: `bill-sink` (continuous), or bounded inside `billing settle`.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use billing_db::schema::{bill_item, bill_stage, consumer_offset, member, member_stage};
use billing_domain::validate;
use billing_runtime::{
    CommonArgs, Processor, ProduceError, Quarantine,
    batch::{
        BatchConfig, BatchSink, Positions, RowError, Staged, WriteResult, Written, run_batches,
    },
};
use billing_schema::{
    Bill, BillItemKind, CodecError, Decoder, Member,
    catalogue::{BILLS, MEMBERS},
};
use chrono::{DateTime, NaiveTime, Utc};
use diesel::{
    Connection, ExecuteCopyFromDsl, ExpressionMethods, Insertable, PgConnection, QueryDsl,
    QueryableByName, RunQueryDsl, connection::SimpleConnection, sql_types::BigInt,
};
use rdkafka::error::KafkaError;
use tracing::info;

/// The processor's name and default group id.
pub const NAME: &str = "bill-sink";

/// Command line of the `bill-sink` binary.
#[derive(Debug, clap::Parser)]
#[command(name = "bill-sink", version, about = "Load bills into PostgreSQL")]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub sink: SinkArgs,
}

/// The sink's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Consumer group.
    #[arg(long, env = "BILL_SINK_GROUP", default_value = NAME)]
    pub group_id: String,
    /// Records per database transaction, at most.
    #[arg(long, env = "BILL_SINK_BATCH", default_value_t = 5_000)]
    pub batch_size: usize,
    /// How long a batch waits to fill, milliseconds.
    #[arg(long, env = "BILL_SINK_LINGER_MS", default_value_t = 200)]
    pub linger_ms: u64,
    /// Transactions written at once, each on its own connection (partition p goes to
    /// writer p mod N, so each partition stays in order).
    #[arg(long, env = "BILL_SINK_WRITERS", default_value_t = 2)]
    pub writers: usize,
    /// Stop once the records present at start are loaded (batch mode, benchmarks).
    #[arg(long)]
    pub bounded: bool,
}

/// One sink run's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub group_id: String,
    pub batch_size: usize,
    pub linger: Duration,
    /// Transactions written at once.
    pub writers: usize,
    /// Stop once the end offsets captured at start are loaded.
    pub bounded: bool,
}

impl From<SinkArgs> for SinkConfig {
    fn from(a: SinkArgs) -> Self {
        SinkConfig {
            group_id: a.group_id,
            batch_size: a.batch_size.max(1),
            linger: Duration::from_millis(a.linger_ms),
            writers: a.writers.max(1),
            bounded: a.bounded,
        }
    }
}

impl SinkConfig {
    /// The default group, bounded.
    pub fn bounded() -> Self {
        SinkConfig {
            group_id: NAME.to_string(),
            batch_size: 5_000,
            linger: Duration::from_millis(100),
            writers: 2,
            bounded: true,
        }
    }
}

/// What the sink did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkSummary {
    pub batches: u64,
    pub bills_seen: u64,
    pub bills_inserted: u64,
    pub items_inserted: u64,
    pub members_upserted: u64,
    pub members_deleted: u64,
    pub quarantined: u64,
    pub elapsed: Duration,
}

/// The sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Connect(#[from] billing_runtime::ConnectError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("no database connection: {0}")]
    Pool(String),
    #[error("a write task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

#[derive(Debug, Insertable)]
#[diesel(table_name = bill_stage, treat_none_as_default_value = false)]
struct NewBill {
    id: i64,
    member_id: i64,
    billing_month: String,
    total_amount: i64,
    discount_amount: i64,
    vat_amount: i64,
    final_amount: i64,
    settled_at: DateTime<Utc>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = bill_item, treat_none_as_default_value = false)]
struct NewItem {
    id: i64,
    bill_id: i64,
    kind: &'static str,
    product_id: String,
    description: String,
    quantity: i64,
    amount: i64,
    snapshot: RawJson,
}

/// An item's snapshot, sent to `jsonb` as the JSON text the bill carries (validated here
/// without building it: a settled bill's snapshot is JSON; anything else is stored as a JSON
/// string, as before). Parsing it into a `serde_json::Value` and writing it out again cost an
/// eighth of the sink's CPU.
#[derive(Debug, diesel::expression::AsExpression)]
#[diesel(sql_type = diesel::sql_types::Jsonb)]
struct RawJson(String);

impl RawJson {
    fn new(text: String) -> Self {
        if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() {
            RawJson(text)
        } else {
            RawJson(serde_json::Value::String(text).to_string())
        }
    }
}

impl diesel::serialize::ToSql<diesel::sql_types::Jsonb, diesel::pg::Pg> for RawJson {
    fn to_sql<'b>(
        &'b self,
        out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
    ) -> diesel::serialize::Result {
        use std::io::Write;
        // jsonb's binary format: version 1, then the JSON text.
        out.write_all(&[1])?;
        out.write_all(self.0.as_bytes())?;
        Ok(diesel::serialize::IsNull::No)
    }
}

#[derive(Debug, Insertable)]
#[diesel(table_name = member_stage, treat_none_as_default_value = false)]
struct MemberRow {
    id: i64,
    name: String,
    email: String,
    phone: String,
    delivery_day: i16,
    dnd_start: Option<NaiveTime>,
    dnd_end: Option<NaiveTime>,
    plan_id: String,
    updated_at: DateTime<Utc>,
}

fn minute(m: Option<i32>) -> Option<NaiveTime> {
    let m = u32::try_from(m?).ok()?;
    NaiveTime::from_hms_opt(m / 60 % 24, m % 60, 0)
}

fn member_row(m: Member) -> MemberRow {
    // Validated at the edge (billing_domain::validate::member): the window is whole and in range.
    MemberRow {
        id: m.member_id,
        name: m.name,
        email: m.email,
        phone: m.phone,
        delivery_day: i16::try_from(m.delivery_day.clamp(1, 31)).unwrap_or(1),
        dnd_start: minute(m.dnd_start_minute).filter(|_| m.dnd_end_minute.is_some()),
        dnd_end: minute(m.dnd_end_minute).filter(|_| m.dnd_start_minute.is_some()),
        plan_id: m.plan_id,
        updated_at: DateTime::from_timestamp_millis(m.updated_at).unwrap_or_default(),
    }
}

fn bill_rows(b: Bill) -> (NewBill, Vec<NewItem>) {
    let items = b
        .items
        .into_iter()
        .map(|i| NewItem {
            id: i.item_id,
            bill_id: b.bill_id,
            kind: match i.kind {
                BillItemKind::Charge => "charge",
                BillItemKind::Discount => "discount",
            },
            product_id: i.product_id,
            description: i.description,
            quantity: i.quantity,
            amount: i.amount,
            snapshot: RawJson::new(i.snapshot),
        })
        .collect();
    let row = NewBill {
        id: b.bill_id,
        member_id: b.member_id,
        billing_month: b.billing_month,
        total_amount: b.total_amount,
        discount_amount: b.discount_amount,
        vat_amount: b.vat_amount,
        final_amount: b.final_amount,
        settled_at: DateTime::from_timestamp_millis(b.settled_at).unwrap_or_default(),
    };
    (row, items)
}

/// What one record of a batch becomes in PostgreSQL.
#[derive(Debug)]
enum Row {
    Bill(NewBill, Vec<NewItem>),
    /// A member upserted (`Some`) or deleted (`None`).
    Member(i64, Option<Box<MemberRow>>),
}

/// One record of a batch, with what is needed to quarantine it if its row is refused (no
/// row: already quarantined, only its offset moves).
type Entry = Staged<Row>;

/// The next offset per (topic, partition) after `entries` (in consumption order).
fn next_offsets<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> HashMap<(String, i32), i64> {
    let mut out = HashMap::new();
    for e in entries {
        out.insert(
            (e.origin.topic.clone(), e.origin.partition),
            e.origin.offset + 1,
        );
    }
    out
}

/// Rows moved by one transaction (or several, summed).
#[derive(Debug, Default, Clone, Copy)]
struct Moves {
    bills: u64,
    items: u64,
    upserted: u64,
    deleted: u64,
}

impl std::ops::AddAssign for Moves {
    fn add_assign(&mut self, o: Moves) {
        self.add(o);
    }
}

impl Moves {
    fn add(&mut self, o: Moves) {
        self.bills += o.bills;
        self.items += o.items;
        self.upserted += o.upserted;
        self.deleted += o.deleted;
    }
}

/// Session-local staging tables, emptied at every commit.
const STAGING: &str = "
    create temp table if not exists bill_stage (like bill including defaults) on commit delete rows;
    create temp table if not exists member_stage (like member including defaults) on commit delete rows;";

/// Locks this group's offset rows for `partitions` (created at 0 where missing), in one order
/// so that two writers never deadlock, and returns the next offset each holds.
///
/// This is the sink's fence. Kafka's committed offsets are only a hint that can lag
/// PostgreSQL: after a rebalance a second instance may read records another instance has
/// already written. Holding these row locks to the end of the transaction, a writer sees
/// every write that committed before it, and skips the records below the stored offset, so no
/// row (a member's older value, say) and no offset ever goes back.
fn lock_offsets(
    conn: &mut PgConnection,
    group: &str,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, diesel::result::Error> {
    use diesel::sql_types::{Array, Integer, Text};
    let mut sorted = partitions.to_vec();
    sorted.sort();
    let (topics, parts): (Vec<String>, Vec<i32>) = sorted.into_iter().unzip();
    diesel::sql_query(
        "insert into consumer_offset (group_id, topic, partition, next_offset, updated_at)
         select $1, t, p, 0, now() from unnest($2::text[], $3::int[]) as u(t, p) order by t, p
         on conflict do nothing",
    )
    .bind::<Text, _>(group)
    .bind::<Array<Text>, _>(&topics)
    .bind::<Array<Integer>, _>(&parts)
    .execute(conn)?;
    let rows: Vec<StoredOffset> = diesel::sql_query(
        "select topic, partition, next_offset from consumer_offset
         where group_id = $1 and (topic, partition) in (select * from unnest($2::text[], $3::int[]))
         order by topic, partition for update",
    )
    .bind::<Text, _>(group)
    .bind::<Array<Text>, _>(&topics)
    .bind::<Array<Integer>, _>(&parts)
    .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.topic, r.partition), r.next_offset))
        .collect())
}

#[derive(QueryableByName)]
struct StoredOffset {
    #[diesel(sql_type = diesel::sql_types::Text)]
    topic: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    partition: i32,
    #[diesel(sql_type = BigInt)]
    next_offset: i64,
}

/// Bills and items a transaction inserted.
struct Moved {
    bills: u64,
    items: u64,
}

/// Inserts the bills not yet in `bill` (by `unique (member_id, billing_month)`: a replay, a
/// rerun or another sink inserted the rest), then the items of exactly those bills, COPYed
/// straight into `bill_item` (binary, several rows per heap write). So a bill's items are
/// written once, in the transaction that inserted the bill, and never added to a bill that
/// existed. An item id already taken (ids derive from the bill id) fails the batch, which is
/// then split to quarantine the record.
fn move_bills(
    conn: &mut PgConnection,
    bills: &[&NewBill],
    items: &[&NewItem],
) -> Result<Moved, diesel::result::Error> {
    if bills.is_empty() {
        return Ok(Moved { bills: 0, items: 0 });
    }
    diesel::copy_from(bill_stage::table)
        .from_insertable(bills.to_vec())
        .execute(conn)?;
    let inserted: Vec<InsertedBill> = diesel::sql_query(
        "insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
         select id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at
         from bill_stage
         on conflict (member_id, billing_month) do nothing
         returning id",
    )
    .load(conn)?;
    let new: std::collections::HashSet<i64> = inserted.into_iter().map(|b| b.id).collect();
    let new_items: Vec<&NewItem> = items
        .iter()
        .copied()
        .filter(|i| new.contains(&i.bill_id))
        .collect();
    let count = new_items.len() as u64;
    if !new_items.is_empty() {
        diesel::copy_from(bill_item::table)
            .from_insertable(new_items)
            .execute(conn)?;
    }
    Ok(Moved {
        bills: new.len() as u64,
        items: count,
    })
}

#[derive(QueryableByName)]
struct InsertedBill {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Writes `entries` and their offsets in one transaction. The partitions' offset rows are
/// locked first ([`lock_offsets`]) and records below them skipped. Rows are COPYed into staging
/// tables, then moved with `on conflict do nothing`; items move only with a bill that was
/// inserted now; a member's last value in the batch wins.
fn write_batch(
    conn: &mut PgConnection,
    group: &str,
    entries: &[Entry],
) -> Result<Moves, diesel::result::Error> {
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        conn.batch_execute(STAGING)?;
        let partitions: Vec<(String, i32)> = next_offsets(entries).into_keys().collect();
        let stored = lock_offsets(conn, group, &partitions)?;
        let fresh: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                let key = (e.origin.topic.clone(), e.origin.partition);
                stored.get(&key).is_none_or(|next| e.origin.offset >= *next)
            })
            .collect();
        let mut bill_rows: Vec<&NewBill> = Vec::new();
        let mut items: Vec<&NewItem> = Vec::new();
        let mut members: HashMap<i64, Option<&MemberRow>> = HashMap::new();
        // A second copy of a bill in the batch (a rerun, a redone settlement task) is skipped:
        // the first one is written, as a copy in a later batch finds the bill already there.
        let mut bill_ids = std::collections::HashSet::new();
        for e in &fresh {
            match &e.row {
                Some(Row::Bill(b, its)) if bill_ids.insert(b.id) => {
                    bill_rows.push(b);
                    items.extend(its);
                }
                Some(Row::Member(id, m)) => {
                    members.insert(*id, m.as_deref());
                }
                Some(Row::Bill(..)) | None => {}
            }
        }
        let offsets = next_offsets(fresh.iter().copied());
        let moved = move_bills(conn, &bill_rows, &items)?;
        let mut upserts: Vec<&MemberRow> = Vec::new();
        let mut deletes: Vec<i64> = Vec::new();
        for (id, row) in members {
            match row {
                Some(r) => upserts.push(r),
                None => deletes.push(id),
            }
        }
        let upserted = upserts.len() as u64;
        if !upserts.is_empty() {
            diesel::copy_from(member_stage::table).from_insertable(upserts).execute(conn)?;
            diesel::sql_query(
                "insert into member (id, name, email, phone, delivery_day, dnd_start, dnd_end, plan_id, updated_at)
                 select id, name, email, phone, delivery_day, dnd_start, dnd_end, plan_id, updated_at from member_stage
                 on conflict (id) do update set name = excluded.name, email = excluded.email, phone = excluded.phone,
                   delivery_day = excluded.delivery_day, dnd_start = excluded.dnd_start, dnd_end = excluded.dnd_end,
                   plan_id = excluded.plan_id, updated_at = excluded.updated_at",
            )
            .execute(conn)?;
        }
        if !deletes.is_empty() {
            diesel::delete(member::table.filter(member::id.eq_any(&deletes))).execute(conn)?;
        }
        for ((topic, partition), next) in offsets {
            diesel::insert_into(consumer_offset::table)
                .values((
                    consumer_offset::group_id.eq(group),
                    consumer_offset::topic.eq(&topic),
                    consumer_offset::partition.eq(partition),
                    consumer_offset::next_offset.eq(next),
                    consumer_offset::updated_at.eq(Utc::now()),
                ))
                .on_conflict((consumer_offset::group_id, consumer_offset::topic, consumer_offset::partition))
                .do_update()
                .set((consumer_offset::next_offset.eq(next), consumer_offset::updated_at.eq(Utc::now())))
                .execute(conn)?;
        }
        Ok(Moves {
            bills: moved.bills,
            items: moved.items,
            upserted,
            deleted: deletes.len() as u64,
        })
    })
}

/// Whether a failed write was the database refusing the data (a constraint, an encoding, a
/// value out of range), which splitting the batch can pin on one record, rather than the
/// server or the connection failing, which must stop the sink with its offsets unmoved.
fn refused_data(conn: &mut PgConnection, e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error};
    let Error::DatabaseError(kind, info) = e else {
        return false;
    };
    let transient = matches!(
        kind,
        K::ClosedConnection
            | K::UnableToSendCommand
            | K::SerializationFailure
            | K::ReadOnlyTransaction
    ) || info.message().contains("deadlock");
    !transient && conn.batch_execute("select 1").is_ok()
}

/// Writes `entries` in order, in as few transactions as it can: the whole batch, or, when the
/// database refuses its data, each half in turn, down to the one record it refuses. Returns
/// what was moved and, if a record was refused, its index and the database's reason; every
/// entry before it is written (with its offsets), none after it.
fn write_until_refused(
    conn: &mut PgConnection,
    group: &str,
    entries: &[Entry],
) -> Result<(Moves, Option<(usize, String)>), diesel::result::Error> {
    let e = match write_batch(conn, group, entries) {
        Ok(m) => return Ok((m, None)),
        Err(e) if refused_data(conn, &e) => e,
        Err(e) => return Err(e),
    };
    if entries.len() == 1 {
        // Once more on its own, so a passing conflict is never taken for bad data.
        return match write_batch(conn, group, entries) {
            Ok(m) => Ok((m, None)),
            Err(again) if refused_data(conn, &again) => {
                Ok((Moves::default(), Some((0, e.to_string()))))
            }
            Err(again) => Err(again),
        };
    }
    let mid = entries.len() / 2;
    let (mut moves, refused) = write_until_refused(conn, group, &entries[..mid])?;
    if refused.is_some() {
        return Ok((moves, refused));
    }
    let (more, refused) = write_until_refused(conn, group, &entries[mid..])?;
    moves.add(more);
    Ok((moves, refused.map(|(i, r)| (i + mid, r))))
}

/// Whether `positions` (next offsets to read) reach `ends` on every partition that holds
/// records: the records present when `ends` were captured are all loaded.
pub use billing_runtime::batch::reached;

/// The offsets this group stored in PostgreSQL.
pub async fn stored_offsets(
    database_url: &str,
    group: &str,
) -> Result<HashMap<(String, i32), i64>, SinkError> {
    let (url, group) = (database_url.to_string(), group.to_string());
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url)
            .map_err(|e| SinkError::Db(billing_db::DbError::Connect(e)))?;
        let rows: Vec<(String, i32, i64)> = consumer_offset::table
            .filter(consumer_offset::group_id.eq(&group))
            .select((
                consumer_offset::topic,
                consumer_offset::partition,
                consumer_offset::next_offset,
            ))
            .load(&mut conn)?;
        Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
    })
    .await
    .map_err(|e| SinkError::Pool(e.to_string()))?
}

async fn bill_row(
    decoder: &Decoder<Bill>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<Row, RowError<SinkError>> {
    match decoder.decode(payload).await {
        Err(e) if e.is_retriable() => Err(RowError::Retriable(e.into())),
        Err(e) => Err(RowError::Refused(format!("cannot decode: {e}"))),
        Ok(b) => match validate::bill(&b, key) {
            Ok(()) => {
                let (bill, items) = bill_rows(b);
                Ok(Row::Bill(bill, items))
            }
            Err(e) => Err(RowError::Refused(format!("bill refused: {e}"))),
        },
    }
}

async fn member_entry(
    decoder: &Decoder<Member>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<Row, RowError<SinkError>> {
    let Some(payload) = payload else {
        return match validate::key_member_id(key) {
            Some(id) => Ok(Row::Member(id, None)),
            None => Err(RowError::Refused(
                "tombstone without a member id key".to_string(),
            )),
        };
    };
    match decoder.decode(Some(payload)).await {
        Err(e) if e.is_retriable() => Err(RowError::Retriable(e.into())),
        Err(e) => Err(RowError::Refused(format!("cannot decode: {e}"))),
        Ok(m) => match validate::member(&m, key) {
            Ok(()) => Ok(Row::Member(m.member_id, Some(Box::new(member_row(m))))),
            Err(e) => Err(RowError::Refused(format!("member refused: {e}"))),
        },
    }
}

/// A writer's connection. It asks PostgreSQL to skip the per-row foreign-key trigger of
/// `bill_item.bill_id` (`session_replication_role = replica`, as a restore does): the sink
/// inserts items only joined to the bills the same statement inserted, so each item's bill
/// exists by construction, and the check doubled the cost of loading items. Only the sink's
/// own connections skip it; the constraint stays declared and enforced for every other
/// writer, and `billing reconcile` counts items without a bill. Where the role may not set it
/// (PostgreSQL before 15, or no `grant set on parameter`), the check stays on.
fn open_writer(url: &str) -> Result<PgConnection, diesel::ConnectionError> {
    let mut conn = PgConnection::establish(url)?;
    if let Err(e) = conn.batch_execute("set session_replication_role = replica") {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| info!(error = %e, "per-row foreign-key checks kept on bill_item"));
    }
    Ok(conn)
}

/// Writes a batch on the sink's dedicated connection (COPY needs diesel's blocking libpq
/// one; a failed connection is dropped and the next write opens a new one). A record the
/// database refuses is quarantined, acknowledged, and then only its offset moves, with the
/// rest of the batch: one bad row never blocks a partition.
async fn write_entries(
    url: String,
    group: String,
    writer: &mut Option<PgConnection>,
    quarantine: &Quarantine,
    mut entries: Vec<Entry>,
) -> Result<(Moves, u64), SinkError> {
    let mut total = Moves::default();
    let mut refused_rows = 0;
    loop {
        let (url, group, conn) = (url.clone(), group.clone(), writer.take());
        let (conn, entries_back, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match open_writer(&url) {
                    Ok(c) => c,
                    Err(e) => {
                        return (
                            None,
                            entries,
                            Err(SinkError::Db(billing_db::DbError::Connect(e))),
                        );
                    }
                },
            };
            match write_until_refused(&mut conn, &group, &entries) {
                Ok(r) => (Some(conn), entries, Ok(r)),
                Err(e) => (None, entries, Err(SinkError::Query(e))),
            }
        })
        .await
        .map_err(|e| SinkError::Pool(e.to_string()))?;
        *writer = conn;
        entries = entries_back;
        let (moves, refused) = result?;
        total.add(moves);
        let Some((i, reason)) = refused else {
            return Ok((total, refused_rows));
        };
        let mut rest = entries.split_off(i);
        let bad = &mut rest[0];
        let reason = format!("database refused the row: {reason}");
        let now = Utc::now().timestamp_millis();
        quarantine
            .send(
                &bad.origin,
                bad.key.as_deref(),
                bad.payload.as_deref(),
                &reason,
                vec![],
                now,
            )
            .await?;
        refused_rows += 1;
        bad.row = None;
        entries = rest;
    }
}

/// The sink as the runtime's batch loop sees it.
struct Sink {
    url: String,
    group: String,
    quarantine: Quarantine,
    bills_topic: String,
    bill_decoder: Decoder<Bill>,
    member_decoder: Decoder<Member>,
    bills_seen: AtomicU64,
}

impl BatchSink for Sink {
    type Row = Row;
    type Writer = PgConnection;
    type Moves = Moves;
    type Error = SinkError;

    async fn row(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Result<Row, RowError<SinkError>> {
        if topic == self.bills_topic {
            self.bills_seen.fetch_add(1, Ordering::Relaxed);
            bill_row(&self.bill_decoder, key, payload).await
        } else {
            member_entry(&self.member_decoder, key, payload).await
        }
    }

    async fn stored_offsets(&self) -> Result<Positions, SinkError> {
        stored_offsets(&self.url, &self.group).await
    }

    async fn write(
        self: Arc<Self>,
        mut writer: Option<PgConnection>,
        batch: Vec<Entry>,
    ) -> WriteResult<PgConnection, Moves, SinkError> {
        let (url, group) = (self.url.clone(), self.group.clone());
        let r = write_entries(url, group, &mut writer, &self.quarantine, batch).await;
        let written = r.map(|(moves, refused)| Written { moves, refused });
        (writer, written)
    }
}

/// Runs the sink on the runtime's batch loop until `shutdown` or, when bounded, until the end
/// offsets captured at start are loaded.
pub async fn run(
    common: &CommonArgs,
    config: SinkConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<SinkSummary, SinkError> {
    let p = Processor::connect(common, NAME).await?;
    let sink = Arc::new(Sink {
        url: common.database_url.clone(),
        group: config.group_id.clone(),
        quarantine: p.quarantine.clone(),
        bills_topic: p.topic(&BILLS.spec),
        bill_decoder: p.decoder::<Bill>(&BILLS.spec),
        member_decoder: p.decoder::<Member>(&MEMBERS.spec),
        bills_seen: AtomicU64::new(0),
    });
    let batch = BatchConfig {
        group_id: config.group_id.clone(),
        topics: vec![p.topic(&BILLS.spec), p.topic(&MEMBERS.spec)],
        batch_size: config.batch_size,
        linger: config.linger,
        writers: config.writers,
        bounded: config.bounded,
    };
    let done = run_batches(
        batch,
        common.kafka(),
        sink.clone(),
        p.quarantine.clone(),
        shutdown,
    )
    .await?;
    let summary = SinkSummary {
        batches: done.batches,
        bills_seen: sink.bills_seen.load(Ordering::Relaxed),
        bills_inserted: done.moves.bills,
        items_inserted: done.moves.items,
        members_upserted: done.moves.upserted,
        members_deleted: done.moves.deleted,
        quarantined: done.quarantined,
        elapsed: done.elapsed,
    };
    info!(
        batches = summary.batches,
        bills_inserted = summary.bills_inserted,
        items_inserted = summary.items_inserted,
        members = summary.members_upserted,
        quarantined = summary.quarantined,
        elapsed_ms = u64::try_from(summary.elapsed.as_millis()).unwrap_or(0),
        "bill sink stopped"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use billing_runtime::quarantine::Origin;

    fn member_entry_at(topic: &str, offset: i64, name: &str) -> Entry {
        let row = MemberRow {
            id: 7,
            name: name.to_string(),
            email: "m7@example.com".to_string(),
            phone: "010-0000-0007".to_string(),
            delivery_day: 5,
            dnd_start: None,
            dnd_end: None,
            plan_id: "P1".to_string(),
            updated_at: Utc::now(),
        };
        entry_at(topic, offset, Row::Member(7, Some(Box::new(row))))
    }

    fn entry_at(topic: &str, offset: i64, row: Row) -> Entry {
        Entry {
            origin: Origin {
                topic: topic.to_string(),
                partition: 0,
                offset,
            },
            key: None,
            payload: None,
            row: Some(row),
        }
    }

    fn stored(conn: &mut PgConnection) -> (String, i64) {
        let name: String = member::table
            .filter(member::id.eq(7))
            .select(member::name)
            .first(conn)
            .unwrap();
        let next: i64 = consumer_offset::table
            .select(consumer_offset::next_offset)
            .first(conn)
            .unwrap();
        (name, next)
    }

    fn bill_entry_at(topic: &str, offset: i64) -> Entry {
        let bill = NewBill {
            id: 2026110000000007,
            member_id: 7,
            billing_month: "2026-11".to_string(),
            total_amount: 1000,
            discount_amount: 0,
            vat_amount: 100,
            final_amount: 1100,
            settled_at: Utc::now(),
        };
        let item = |seq: i64| NewItem {
            id: bill.id * 100 + seq,
            bill_id: bill.id,
            kind: "charge",
            product_id: format!("p{seq}"),
            description: "d".to_string(),
            quantity: 1,
            amount: 500,
            snapshot: RawJson::new("{}".to_string()),
        };
        let items = vec![item(0), item(1)];
        entry_at(topic, offset, Row::Bill(bill, items))
    }

    /// A settlement task redone after a rebalance (or a rerun) puts the same bill on the topic
    /// twice, and both copies can fall in one batch: the batch must write the bill and its
    /// items once, in one transaction, not fail and be split.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bill_twice_in_one_batch_is_written_once() {
        let env = billing_testkit::TestEnv::new().await;
        let url = env.database().await;
        let topic = env.topic(&BILLS.spec);
        let mut conn = PgConnection::establish(&url).unwrap();
        let twice = [bill_entry_at(&topic, 0), bill_entry_at(&topic, 1)];
        let moves = write_batch(&mut conn, "g", &twice).unwrap();
        assert_eq!((moves.bills, moves.items), (1, 2));
    }

    /// Two instances of the sink: one writes a partition up to offset 2; a rebalance hands the
    /// partition to the other, which starts from the group's Kafka offset (a hint that may lag
    /// PostgreSQL) and writes what it read again. The rows and the offset must not go back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_read_from_a_lagging_offset_moves_nothing_back() {
        let env = billing_testkit::TestEnv::new().await;
        let url = env.database().await;
        let topic = env.topic(&MEMBERS.spec);
        let mut conn = PgConnection::establish(&url).unwrap();
        let newer = [
            member_entry_at(&topic, 0, "first"),
            member_entry_at(&topic, 1, "second"),
        ];
        write_until_refused(&mut conn, "g", &newer).unwrap();
        assert_eq!(stored(&mut conn), ("second".to_string(), 2));

        let stale = [member_entry_at(&topic, 0, "first")];
        write_until_refused(&mut conn, "g", &stale).unwrap();
        assert_eq!(
            stored(&mut conn),
            ("second".to_string(), 2),
            "a record below the stored offset was written again"
        );
    }
}
