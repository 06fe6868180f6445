//! The bill sink: `bills` and `members` into PostgreSQL.
//!
//! Consumes `bills` (writes `bill`, then its `bill_item` rows, each item with its JSON
//! snapshot) and `members` (upserts `member`, deletes on a tombstone), in batches of up to
//! `batch_size` records, one database transaction per batch.
//!
//! Guarantees (exactly-once effect in PostgreSQL):
//! - The batch's next offsets are written to `consumer_offset` in the same transaction as
//!   its rows. At start, those offsets are committed to the group, so a restart resumes
//!   exactly where the data stopped; Kafka's own commits, made after each transaction, are
//!   only a hint.
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
    sync::Arc,
    time::{Duration, Instant},
};

use billing_db::schema::{bill_item_stage, bill_stage, consumer_offset, member, member_stage};
use billing_runtime::{
    CommonArgs, ProduceError, Producer, Quarantine, consumer::end_offsets, quarantine::Origin,
};
use billing_schema::{
    Bill, BillItemKind, CodecError, DeadLetter, Decoder, Encoder, Member, Registry,
    catalogue::{BILLS, DEAD_LETTERS, MEMBERS},
};
use chrono::{DateTime, NaiveTime, Utc};
use diesel::{
    Connection, ExecuteCopyFromDsl, ExpressionMethods, Insertable, PgConnection, QueryDsl,
    QueryableByName, RunQueryDsl, connection::SimpleConnection, sql_types::BigInt,
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
};
use tracing::{info, warn};

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
    /// Stop once the end offsets captured at start are loaded.
    pub bounded: bool,
}

impl From<SinkArgs> for SinkConfig {
    fn from(a: SinkArgs) -> Self {
        SinkConfig {
            group_id: a.group_id,
            batch_size: a.batch_size.max(1),
            linger: Duration::from_millis(a.linger_ms),
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
#[diesel(table_name = bill_item_stage, treat_none_as_default_value = false)]
struct NewItem {
    id: i64,
    bill_id: i64,
    kind: &'static str,
    product_id: String,
    description: String,
    quantity: i64,
    amount: i64,
    snapshot: serde_json::Value,
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
            snapshot: serde_json::from_str(&i.snapshot)
                .unwrap_or(serde_json::Value::String(i.snapshot)),
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

/// One decoded batch, ready for its transaction.
#[derive(Default)]
struct Batch {
    bills: Vec<(NewBill, Vec<NewItem>)>,
    /// Last value per member id in the batch (`None`: deleted).
    members: HashMap<i64, Option<MemberRow>>,
    /// Next offset per (topic, partition).
    offsets: HashMap<(String, i32), i64>,
}

#[derive(QueryableByName)]
struct Moved {
    #[diesel(sql_type = BigInt)]
    bills: i64,
    #[diesel(sql_type = BigInt)]
    items: i64,
}

/// Session-local staging tables, emptied at every commit.
const STAGING: &str = "
    create temp table if not exists bill_stage (like bill including defaults) on commit delete rows;
    create temp table if not exists bill_item_stage (like bill_item including defaults) on commit delete rows;
    create temp table if not exists member_stage (like member including defaults) on commit delete rows;";

/// Writes one batch in one transaction; returns (bills, items, members upserted, deleted).
/// Rows are COPYed into staging tables, then moved with `on conflict do nothing`; items move
/// only with a bill that was inserted now.
fn write_batch(
    conn: &mut PgConnection,
    group: &str,
    batch: Batch,
) -> Result<(u64, u64, u64, u64), diesel::result::Error> {
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        conn.batch_execute(STAGING)?;
        let Batch { bills, members, offsets } = batch;
        let (bill_rows, item_rows): (Vec<NewBill>, Vec<Vec<NewItem>>) = bills.into_iter().unzip();
        let items: Vec<NewItem> = item_rows.into_iter().flatten().collect();
        diesel::copy_from(bill_stage::table).from_insertable(&bill_rows).execute(conn)?;
        diesel::copy_from(bill_item_stage::table).from_insertable(&items).execute(conn)?;
        let moved: Moved = diesel::sql_query(
            "with ins as (
               insert into bill (id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at)
               select id, member_id, billing_month, total_amount, discount_amount, vat_amount, final_amount, settled_at
               from bill_stage
               on conflict (member_id, billing_month) do nothing
               returning id),
             moved_items as (
               insert into bill_item (id, bill_id, kind, product_id, description, quantity, amount, snapshot)
               select s.id, s.bill_id, s.kind, s.product_id, s.description, s.quantity, s.amount, s.snapshot
               from bill_item_stage s join ins on ins.id = s.bill_id
               on conflict (id) do nothing
               returning 1)
             select (select count(*) from ins)::bigint as bills, (select count(*) from moved_items)::bigint as items",
        )
        .get_result(conn)?;
        let mut upserts: Vec<MemberRow> = Vec::new();
        let mut deletes: Vec<i64> = Vec::new();
        for (id, row) in members {
            match row {
                Some(r) => upserts.push(r),
                None => deletes.push(id),
            }
        }
        if !upserts.is_empty() {
            diesel::copy_from(member_stage::table).from_insertable(&upserts).execute(conn)?;
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
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok((n(moved.bills), n(moved.items), upserts.len() as u64, deletes.len() as u64))
    })
}

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

/// Runs the sink until `shutdown` or, when bounded, until the end offsets captured at start
/// are loaded.
pub async fn run(
    common: &CommonArgs,
    config: SinkConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<SinkSummary, SinkError> {
    let started = Instant::now();
    let catalogue = common.catalogue();
    let bills_topic = catalogue.name(&BILLS.spec);
    let members_topic = catalogue.name(&MEMBERS.spec);
    let topics = vec![bills_topic.clone(), members_topic.clone()];
    let registry = Registry::new(&common.schema_registry_url)?;
    let bill_decoder = Decoder::<Bill>::new(registry.clone());
    let member_decoder = Decoder::<Member>::new(registry.clone());
    let producer = Producer::new(&common.kafka())?;
    let dlq =
        Encoder::<DeadLetter>::register(&registry, &catalogue.value_subject(&DEAD_LETTERS.spec))
            .await?;
    let quarantine = Quarantine::new(
        producer,
        catalogue.name(&DEAD_LETTERS.spec),
        NAME,
        Arc::new(dlq),
    );

    let mut kc = common.kafka().consumer_config(&config.group_id);
    kc.set("fetch.max.bytes", "52428800");
    let consumer: StreamConsumer = kc.create()?;
    // PostgreSQL's offsets are the truth: hand them to the group before joining it.
    let mut positions = stored_offsets(&common.database_url, &config.group_id).await?;
    positions.retain(|(t, _), _| topics.contains(t));
    if !positions.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &positions {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            warn!(error = %e, "cannot hand stored offsets to the group (another member is active?); rows stay exact, records may be read again");
        }
    }
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let ends = if config.bounded {
        Some(end_offsets(&consumer, &topics)?)
    } else {
        None
    };
    info!(group = %config.group_id, bounded = config.bounded, "bill sink started");

    let mut summary = SinkSummary::default();
    let mut writer: Option<PgConnection> = None;
    tokio::pin!(shutdown);
    let finished = |positions: &HashMap<(String, i32), i64>| {
        ends.as_ref().is_some_and(|ends| {
            ends.iter()
                .all(|(k, (low, high))| high <= low || positions.get(k).is_some_and(|p| p >= high))
        })
    };
    'run: loop {
        if finished(&positions) {
            break;
        }
        // Collect a batch: wait for the first record, then up to `linger` for more.
        let mut batch = Batch::default();
        let mut count = 0usize;
        let mut deadline: Option<tokio::time::Instant> = None;
        while count < config.batch_size {
            let recv = consumer.recv();
            let msg = tokio::select! {
                biased;
                () = &mut shutdown => {
                    if count == 0 { break 'run; }
                    break;
                }
                m = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d, recv).await.ok(),
                        None => tokio::time::timeout(Duration::from_millis(500), recv).await.ok(),
                    }
                } => m,
            };
            let Some(msg) = msg else {
                if count == 0 && !finished(&positions) {
                    continue;
                }
                break;
            };
            let m = msg?;
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + config.linger);
            let topic = m.topic().to_string();
            let (partition, offset) = (m.partition(), m.offset());
            if let Some(ends) = &ends
                && ends
                    .get(&(topic.clone(), partition))
                    .is_none_or(|(_, high)| offset >= *high)
            {
                continue;
            }
            count += 1;
            batch.offsets.insert((topic.clone(), partition), offset + 1);
            let origin = Origin {
                topic: topic.clone(),
                partition,
                offset,
            };
            let failure = if topic == bills_topic {
                summary.bills_seen += 1;
                match bill_decoder.decode(m.payload()).await {
                    Ok(b) => {
                        batch.bills.push(bill_rows(b));
                        None
                    }
                    Err(e) if e.is_retriable() => return Err(e.into()),
                    Err(e) => Some(format!("cannot decode: {e}")),
                }
            } else {
                let key = m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .and_then(|k| k.parse::<i64>().ok());
                match (m.payload(), key) {
                    (None, Some(id)) => {
                        batch.members.insert(id, None);
                        None
                    }
                    (None, None) => Some("tombstone without a member id key".to_string()),
                    (Some(_), _) => match member_decoder.decode(m.payload()).await {
                        Ok(mem) => {
                            batch.members.insert(mem.member_id, Some(member_row(mem)));
                            None
                        }
                        Err(e) if e.is_retriable() => return Err(e.into()),
                        Err(e) => Some(format!("cannot decode: {e}")),
                    },
                }
            };
            if let Some(reason) = failure {
                // Acknowledged before the transaction that moves the offset past it.
                let now = Utc::now().timestamp_millis();
                quarantine
                    .send(&origin, m.key(), m.payload(), &reason, vec![], now)
                    .await?;
                summary.quarantined += 1;
            }
        }
        if count == 0 {
            continue;
        }
        let offsets = batch.offsets.clone();
        // The write runs on a dedicated blocking connection (COPY needs diesel's libpq one);
        // a failed connection is dropped and the next batch opens a new one.
        let (url, group, conn) = (
            common.database_url.clone(),
            config.group_id.clone(),
            writer.take(),
        );
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match PgConnection::establish(&url) {
                    Ok(c) => c,
                    Err(e) => return (None, Err(SinkError::Db(billing_db::DbError::Connect(e)))),
                },
            };
            match write_batch(&mut conn, &group, batch) {
                Ok(r) => (Some(conn), Ok(r)),
                Err(e) => (None, Err(SinkError::Query(e))),
            }
        })
        .await
        .map_err(|e| SinkError::Pool(e.to_string()))?;
        writer = conn;
        let (bills, items, upserted, deleted) = result?;
        summary.batches += 1;
        summary.bills_inserted += bills;
        summary.items_inserted += items;
        summary.members_upserted += upserted;
        summary.members_deleted += deleted;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &offsets {
            positions.insert((t.clone(), *p), *o);
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        // A hint for the group; PostgreSQL holds the truth.
        if let Err(e) = consumer.store_offsets(&tpl) {
            warn!(error = %e, "cannot store offsets in the group (partition revoked?)");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(error = %e, "final commit failed; PostgreSQL keeps the exact offsets");
    }
    summary.elapsed = started.elapsed();
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
