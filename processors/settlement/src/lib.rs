//! Settlement: the month's bills from the member, product and usage changelogs.
//!
//! Consumes `members` and `usage-records` (co-partitioned by member id) and `products` (one
//! partition, read whole by every instance); produces one `Bill` per member to `bills`, keyed
//! by member id, and quarantines bad input to `dead-letters`.
//!
//! How a run works, on the runtime's task mode ([`billing_runtime::tasks`]), like a Kafka
//! Streams task per partition over a bounded input:
//! - At start it captures the end offsets of its inputs: the run settles exactly that
//!   snapshot, and stops when it is consumed.
//! - Instances of one run share the group `settlement.<month>.<run id>`, subscribed to
//!   `members` only to split the partitions; those partitions stay paused there. A task whose
//!   partition is revoked is aborted and redone by the new owner.
//! - For each partition p it owns, a task reads `members[p]` to its end, then
//!   `usage-records[p]` to its end, aggregating the month's usage per member, computes every
//!   member's bill (billing_domain::rules) and produces it. Once every bill of p is
//!   acknowledged, it commits `members[p]` at its end offset: the partition is done.
//! - The run ends when every partition is done, whichever instance did it.
//!
//! Guarantees: bills are a pure function of the snapshot, and their ids come from (member,
//! month), so a second run, a replay or a restart after a crash produces the same bills
//! again; the bill sink's uniqueness makes them land once. Every run uses a fresh group and
//! reads from the beginning (crash recovery is "run again"). Usage of other months is
//! skipped and counted; usage for an unknown member or product, a non-positive or absurd
//! quantity, or a record that does not decode is quarantined with the reason and counted,
//! and the rest of the month still settles.
//!
//! Run: `settlement --month 2026-11` (once), or `settlement` (every month on
//! `--schedule-day`/`--schedule-time` in BILLING_TZ), or `billing settle --month 2026-11`.

pub mod schedule;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use billing_domain::{
    BillingMonth,
    rules::{self, compute_bill, validate_usage},
    validate,
};
use billing_runtime::{
    CommonArgs, Processor, ProduceError, Producer, Quarantine,
    producer::Pending,
    quarantine::Origin,
    snapshot::{self, PartitionReader},
    tasks::{TaskConfig, TaskError, run_tasks},
};
use billing_schema::{
    Bill, CodecError, Decoder, Encoder, Member, Product, UsageRecord,
    catalogue::{BILLS, MEMBERS, PRODUCTS, USAGE_RECORDS},
};
use chrono::NaiveTime;
use rdkafka::{Message, error::KafkaError, message::BorrowedMessage};
use tracing::{info, warn};

/// The processor's name: its stage on dead letters and the root of its group ids.
pub const NAME: &str = "settlement";
/// Bills produced before their acknowledgements are awaited.
const IN_FLIGHT_BILLS: usize = 10_000;

/// Command line of the `settlement` binary.
#[derive(Debug, clap::Parser)]
#[command(
    name = "settlement",
    version,
    about = "Settle monthly bills from the changelog topics"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub settle: SettleArgs,
}

/// Settlement's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SettleArgs {
    /// Settle this month (YYYY-MM) once and exit; without it, run on the schedule.
    #[arg(long, env = "SETTLEMENT_MONTH")]
    pub month: Option<BillingMonth>,
    /// Run id shared by the instances of one run; a new one by default.
    #[arg(long, env = "SETTLEMENT_RUN_ID")]
    pub run_id: Option<String>,
    /// Partitions this instance settles at once.
    #[arg(long, env = "SETTLEMENT_PARALLELISM", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallelism: u16,
    /// Scheduled mode: the day of the month to settle the previous month.
    #[arg(long, env = "SETTLEMENT_DAY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=31))]
    pub schedule_day: u32,
    /// Scheduled mode: the local time (BILLING_TZ) of the run.
    #[arg(long, env = "SETTLEMENT_TIME", default_value = "02:00")]
    pub schedule_time: NaiveTime,
}

/// One run's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleConfig {
    pub month: BillingMonth,
    pub run_id: String,
    pub parallelism: usize,
}

impl SettleConfig {
    /// A single-instance run of `month` with a fresh run id.
    pub fn new(month: BillingMonth) -> Self {
        SettleConfig {
            month,
            run_id: uuid::Uuid::new_v4().simple().to_string(),
            parallelism: 2,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Partitions this instance settled.
    pub partitions: usize,
    pub members: u64,
    pub usage_records: u64,
    /// Usage records of other months, skipped.
    pub other_months: u64,
    /// Exact repeats of a usage record already counted (same member, usage id and content),
    /// skipped: an at-least-once upstream or a mediation replay sends them.
    pub duplicates: u64,
    /// Members who joined after the month, not billed for it.
    pub joined_later: u64,
    pub bills: u64,
    /// Records quarantined to the dead-letter topic.
    pub quarantined: u64,
    /// Sum of the bills' final amounts, won.
    pub final_amount: i64,
    pub elapsed: Duration,
}

impl Summary {
    fn add(&mut self, o: &Summary) {
        self.partitions += o.partitions;
        self.members += o.members;
        self.usage_records += o.usage_records;
        self.other_months += o.other_months;
        self.duplicates += o.duplicates;
        self.joined_later += o.joined_later;
        self.bills += o.bills;
        self.quarantined += o.quarantined;
        self.final_amount += o.final_amount;
    }
}

/// Settlement failed.
#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    #[error(transparent)]
    Connect(#[from] billing_runtime::ConnectError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
    #[error("partition task failed: {0}")]
    Task(String),
    #[error("interrupted before the run completed; run it again (it is idempotent)")]
    Interrupted,
}

/// Everything the partition tasks share.
struct Ctx {
    common: CommonArgs,
    month: BillingMonth,
    /// `month` as usage records spell it, formatted once rather than per record.
    month_text: String,
    group: String,
    members_topic: String,
    usage_topic: String,
    bills_topic: String,
    products: HashMap<String, Product>,
    /// (low, high) watermarks of every input partition at start: the snapshot.
    ends: HashMap<(String, i32), (i64, i64)>,
    member_decoder: Decoder<Member>,
    member_encoder: Encoder<Member>,
    usage_decoder: Decoder<UsageRecord>,
    bill_encoder: Encoder<Bill>,
    producer: Producer,
    quarantine: Quarantine,
    /// Every bill of the month is stamped with the month's end, so reruns are identical.
    settled_at: i64,
}

impl Ctx {
    /// A reader of `topic[partition]` up to the snapshot's end, or `None` if it was empty.
    fn snapshot(&self, topic: &str, partition: i32) -> Result<Option<PartitionReader>, KafkaError> {
        PartitionReader::open_in(
            &self.common.kafka(),
            &format!("{}.reader", self.group),
            &self.ends,
            topic,
            partition,
        )
    }

    async fn quarantine(
        &self,
        origin: Origin,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        reason: &str,
    ) -> Result<(), SettlementError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.quarantine
            .send(&origin, key, payload, reason, vec![], now)
            .await?;
        Ok(())
    }
}

/// The members of one partition as of the snapshot, and those not billed this month.
#[derive(Default)]
struct Members {
    /// Valid members who had joined by the month's end, with where they were read.
    billable: HashMap<i64, (Member, Origin)>,
    /// Valid members who joined after the month: not billed for it.
    joined_later: HashSet<i64>,
}

/// Reads `members[partition]` to the snapshot's end: the changelog's last value per key wins,
/// a tombstone removes, and a record refused at the edge is quarantined (and, being the
/// member's latest value, leaves the member unbilled: its earlier value is no longer true).
async fn read_members(
    ctx: &Ctx,
    partition: i32,
    s: &mut Summary,
) -> Result<Members, SettlementError> {
    let mut out = Members::default();
    let Some(mut reader) = ctx.snapshot(&ctx.members_topic, partition)? else {
        return Ok(out);
    };
    while let Some(m) = reader.next().await {
        let m = m?;
        let origin = Origin {
            topic: ctx.members_topic.clone(),
            partition,
            offset: m.offset(),
        };
        let key_id = validate::key_member_id(m.key());
        let Some(payload) = m.payload() else {
            match key_id {
                Some(id) => {
                    out.billable.remove(&id);
                    out.joined_later.remove(&id);
                }
                None => {
                    ctx.quarantine(origin, m.key(), None, "tombstone without a member id key")
                        .await?;
                    s.quarantined += 1;
                }
            }
            continue;
        };
        let reason = match ctx.member_decoder.decode(Some(payload)).await {
            Err(e) if e.is_retriable() => return Err(e.into()),
            Err(e) => format!("cannot decode: {e}"),
            Ok(member) => match validate::member(&member, m.key()) {
                Ok(()) => {
                    let id = member.member_id;
                    if rules::member_in_month(&member, ctx.month) {
                        out.joined_later.remove(&id);
                        out.billable.insert(id, (member, origin));
                    } else {
                        out.billable.remove(&id);
                        out.joined_later.insert(id);
                    }
                    continue;
                }
                Err(e) => format!("member refused: {e}"),
            },
        };
        if let Some(id) = key_id {
            out.billable.remove(&id);
            out.joined_later.remove(&id);
        }
        ctx.quarantine(origin, m.key(), Some(payload), &reason)
            .await?;
        s.quarantined += 1;
    }
    s.joined_later += out.joined_later.len() as u64;
    Ok(out)
}

/// The month's usage of one partition, summed per member and product.
struct Usage {
    /// Index into the product names (fits in u16: the catalogue is small).
    totals: HashMap<i64, Vec<(u16, i64)>>,
    /// Members whose summed usage does not fit in an i64: refused as an overflow.
    overflowed: HashSet<i64>,
    /// (member, hash of usage id) -> hash of the record's content, for de-duplication.
    seen: HashMap<(i64, u64), u64>,
}

/// Why a usage record of the month is not billed, or `None` if it is summed.
fn take_usage(
    ctx: &Ctx,
    members: &Members,
    usage: &mut Usage,
    product_index: &HashMap<&str, u16>,
    u: &UsageRecord,
    key: Option<&[u8]>,
    s: &mut Summary,
) -> Option<String> {
    if let Err(e) = validate::usage(u, key) {
        return Some(format!("usage {:?} refused: {e}", u.usage_id));
    }
    if u.billing_month != ctx.month_text {
        s.other_months += 1;
        return None;
    }
    if members.joined_later.contains(&u.member_id) {
        return Some(format!(
            "usage {} for member {}, who joined after the month",
            u.usage_id, u.member_id
        ));
    }
    if !members.billable.contains_key(&u.member_id) {
        return Some(format!(
            "usage {} for unknown member {}",
            u.usage_id, u.member_id
        ));
    }
    if let Err(e) = validate_usage(&ctx.products, &u.product_id, u.quantity) {
        return Some(format!("usage {}: {e}", u.usage_id));
    }
    let (identity, content) = rules::usage_identity(u);
    match usage.seen.get(&identity) {
        Some(c) if *c == content => {
            s.duplicates += 1;
            return None;
        }
        Some(_) => {
            return Some(format!(
                "usage {} of member {} was already counted with different content",
                u.usage_id, u.member_id
            ));
        }
        None => {
            usage.seen.insert(identity, content);
        }
    }
    let idx = product_index
        .get(u.product_id.as_str())
        .copied()
        .unwrap_or(u16::MAX);
    let entry = usage.totals.entry(u.member_id).or_default();
    match entry.iter_mut().find(|(i, _)| *i == idx) {
        Some((_, q)) => match q.checked_add(u.quantity) {
            Some(sum) => *q = sum,
            None => {
                usage.overflowed.insert(u.member_id);
            }
        },
        None => entry.push((idx, u.quantity)),
    }
    None
}

/// Reads `usage-records[partition]` to the snapshot's end, validating each record at the
/// edge, counting each (member, usage id) once, and quarantining what cannot be billed.
async fn read_usage(
    ctx: &Ctx,
    partition: i32,
    members: &Members,
    product_index: &HashMap<&str, u16>,
    s: &mut Summary,
) -> Result<Usage, SettlementError> {
    let mut usage = Usage {
        totals: HashMap::with_capacity(members.billable.len()),
        overflowed: HashSet::new(),
        seen: HashMap::new(),
    };
    let Some(mut reader) = ctx.snapshot(&ctx.usage_topic, partition)? else {
        return Ok(usage);
    };
    while let Some(m) = reader.next().await {
        let m = m?;
        s.usage_records += 1;
        let reason = match ctx.usage_decoder.decode(m.payload()).await {
            Err(e) if e.is_retriable() => return Err(e.into()),
            Err(e) => Some(format!("cannot decode: {e}")),
            Ok(u) => take_usage(ctx, members, &mut usage, product_index, &u, m.key(), s),
        };
        if let Some(reason) = reason {
            let origin = Origin {
                topic: ctx.usage_topic.clone(),
                partition,
                offset: m.offset(),
            };
            ctx.quarantine(origin, m.key(), m.payload(), &reason)
                .await?;
            s.quarantined += 1;
        }
    }
    Ok(usage)
}

/// Quarantines a member who cannot be billed. The original bytes are not kept in memory: the
/// member is re-encoded under the subject's registered schema, which decodes to the same value.
async fn refuse_member(
    ctx: &Ctx,
    member: &Member,
    origin: &Origin,
    reason: &str,
    s: &mut Summary,
) -> Result<(), SettlementError> {
    warn!(member = member.member_id, reason, "member cannot be billed");
    let payload = ctx.member_encoder.encode(member).ok();
    let key = member.member_id.to_string();
    ctx.quarantine(
        origin.clone(),
        Some(key.as_bytes()),
        payload.as_deref(),
        reason,
    )
    .await?;
    s.quarantined += 1;
    Ok(())
}

/// Waits for the bills produced so far; a bill the broker refuses for its size is final for
/// that member, who is quarantined instead.
async fn await_bills(
    ctx: &Ctx,
    members: &Members,
    pending: &mut Vec<(i64, i64, Pending)>,
    s: &mut Summary,
) -> Result<(), SettlementError> {
    for (id, amount, p) in pending.drain(..) {
        match p.wait().await {
            Ok(_) => {
                s.bills += 1;
                s.final_amount += amount;
            }
            Err(e) if e.is_too_large() => {
                if let Some((member, origin)) = members.billable.get(&id) {
                    refuse_member(
                        ctx,
                        member,
                        origin,
                        &format!("bill cannot be produced: {e}"),
                        s,
                    )
                    .await?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Settles one partition: members, then usage, then bills; returns its summary.
async fn settle_partition(ctx: Arc<Ctx>, partition: i32) -> Result<Summary, SettlementError> {
    let mut s = Summary {
        partitions: 1,
        ..Summary::default()
    };
    let started = Instant::now();
    let members = read_members(&ctx, partition, &mut s).await?;
    let members_read = started.elapsed();

    let product_index: HashMap<&str, u16> = ctx
        .products
        .keys()
        .enumerate()
        .map(|(i, k)| (k.as_str(), u16::try_from(i).unwrap_or(u16::MAX)))
        .collect();
    let product_names: Vec<&str> = {
        let mut v = vec![""; product_index.len()];
        for (k, i) in &product_index {
            v[usize::from(*i)] = k;
        }
        v
    };
    let mut usage = read_usage(&ctx, partition, &members, &product_index, &mut s).await?;
    let usage_read = started.elapsed();

    // One bill per member, in member id order.
    let mut ids: Vec<i64> = members.billable.keys().copied().collect();
    ids.sort_unstable();
    s.members = ids.len() as u64;
    let mut pending: Vec<(i64, i64, Pending)> = Vec::with_capacity(IN_FLIGHT_BILLS);
    let mut buf = Vec::with_capacity(2048);
    for id in ids {
        let Some((member, origin)) = members.billable.get(&id) else {
            continue;
        };
        let totals: BTreeMap<String, i64> = usage
            .totals
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(i, q)| {
                product_names
                    .get(usize::from(i))
                    .map(|n| ((*n).to_string(), q))
            })
            .collect();
        let bill = if usage.overflowed.contains(&id) {
            Err(rules::BillError::Overflow { member: id })
        } else {
            compute_bill(ctx.month, member, &ctx.products, &totals, ctx.settled_at)
        };
        match bill {
            Ok(bill) => {
                buf.clear();
                ctx.bill_encoder.encode_into(&bill, &mut buf)?;
                let key = id.to_string();
                match ctx
                    .producer
                    .enqueue(&ctx.bills_topic, Some(key.as_bytes()), Some(&buf), None)
                    .await
                {
                    Ok(p) => pending.push((id, bill.final_amount, p)),
                    Err(e) if e.is_too_large() => {
                        refuse_member(
                            &ctx,
                            member,
                            origin,
                            &format!("bill cannot be produced: {e}"),
                            &mut s,
                        )
                        .await?;
                    }
                    Err(e) => return Err(e.into()),
                }
                if pending.len() >= IN_FLIGHT_BILLS {
                    await_bills(&ctx, &members, &mut pending, &mut s).await?;
                }
            }
            Err(e) => refuse_member(&ctx, member, origin, &e.to_string(), &mut s).await?,
        }
    }
    await_bills(&ctx, &members, &mut pending, &mut s).await?;
    info!(
        partition,
        members = s.members,
        bills = s.bills,
        usage = s.usage_records,
        duplicates = s.duplicates,
        quarantined = s.quarantined,
        members_ms = millis(members_read),
        usage_ms = millis(usage_read - members_read),
        bills_ms = millis(started.elapsed() - usage_read),
        elapsed_ms = millis(started.elapsed()),
        "partition settled"
    );
    billing_runtime::metrics::RecordCounters::for_group(NAME).add(
        s.members + s.usage_records,
        s.bills,
        s.quarantined,
    );
    Ok(s)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the whole product catalogue as of now.
async fn load_products(
    common: &CommonArgs,
    group: &str,
    p: &Processor,
) -> Result<HashMap<String, Product>, SettlementError> {
    let topic = p.topic(&PRODUCTS.spec);
    let group = format!("{group}.products");
    let decoder = p.decoder::<Product>(&PRODUCTS.spec);
    let quarantine = &p.quarantine;
    let mut products = HashMap::new();
    snapshot::read_topic(
        &common.kafka(),
        &group,
        &topic,
        async |m: &BorrowedMessage<'_>| {
            let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
            let reason = match (m.payload(), decoder.decode(m.payload()).await) {
                (None, _) if key.is_some() => None,
                (None, _) => Some("tombstone without a product id key".to_string()),
                (_, Err(e)) if e.is_retriable() => return Err(SettlementError::Codec(e)),
                (_, Err(e)) => Some(format!("cannot decode: {e}")),
                (_, Ok(product)) => match validate::product(&product, m.key()) {
                    Ok(()) => {
                        products.insert(product.product_id.clone(), product);
                        return Ok(());
                    }
                    Err(e) => Some(format!("product refused: {e}")),
                },
            };
            // A tombstone, or a refused value: the key's earlier value is no longer true.
            if let Some(k) = key {
                products.remove(k);
            }
            if let Some(reason) = reason {
                let origin = Origin {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                };
                let now = chrono::Utc::now().timestamp_millis();
                quarantine
                    .send(&origin, m.key(), m.payload(), &reason, vec![], now)
                    .await?;
            }
            Ok(())
        },
    )
    .await?;
    Ok(products)
}

/// Settles `config.month` to completion (this instance's share of it) and returns what it
/// did. `shutdown` interrupts the run: nothing is lost, the next run redoes it.
pub async fn run(
    common: &CommonArgs,
    config: SettleConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, SettlementError> {
    let started = Instant::now();
    let p = Processor::connect(common, NAME).await?;
    let (catalogue, producer) = (&p.catalogue, &p.producer);
    let quarantine = p.quarantine.clone();
    let group = p.group(&format!("{NAME}.{}.{}", config.month, config.run_id));
    let products = load_products(common, &group, &p).await?;
    info!(month = %config.month, run_id = %config.run_id, products = products.len(), "settlement started");

    let members_topic = catalogue.name(&MEMBERS.spec);
    let usage_topic = catalogue.name(&USAGE_RECORDS.spec);
    let ends = snapshot::capture(
        &common.kafka(),
        &group,
        &[members_topic.clone(), usage_topic.clone()],
    )?;
    let (_, month_end) = config.month.bounds(common.billing_tz);
    let ctx = Arc::new(Ctx {
        common: common.clone(),
        month: config.month,
        month_text: config.month.to_string(),
        group: group.clone(),
        bills_topic: catalogue.name(&BILLS.spec),
        products,
        member_decoder: p.decoder(&MEMBERS.spec),
        member_encoder: p.encoder(&MEMBERS.spec).await?,
        usage_decoder: p.decoder(&USAGE_RECORDS.spec),
        bill_encoder: p.encoder(&BILLS.spec).await?,
        producer: producer.clone(),
        quarantine,
        settled_at: month_end.timestamp_millis(),
        members_topic: members_topic.clone(),
        usage_topic,
        ends: ends.clone(),
    });
    let tasks = TaskConfig {
        group_id: group,
        topic: members_topic,
        ends,
        parallelism: config.parallelism,
    };
    let settle = |partition| settle_partition(ctx.clone(), partition);
    let outputs = run_tasks(&common.kafka(), tasks, settle, shutdown)
        .await
        .map_err(|e| match e {
            TaskError::Kafka(e) => SettlementError::Kafka(e),
            TaskError::Task { error, .. } => error,
            TaskError::Panicked(e) => SettlementError::Task(e),
            TaskError::Interrupted => SettlementError::Interrupted,
        })?;
    let mut summary = Summary::default();
    for (_, part) in &outputs {
        summary.add(part);
    }
    producer.flush(Duration::from_secs(60)).await?;
    summary.elapsed = started.elapsed();
    info!(
        month = %config.month,
        partitions = summary.partitions,
        members = summary.members,
        usage = summary.usage_records,
        bills = summary.bills,
        quarantined = summary.quarantined,
        final_amount = summary.final_amount,
        elapsed_ms = u64::try_from(summary.elapsed.as_millis()).unwrap_or(0),
        "settlement complete"
    );
    Ok(summary)
}

/// The binary's entry: one month (`--month`), or every month on the schedule.
pub async fn main_loop(
    cli: Cli,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SettlementError> {
    let tz = cli.common.billing_tz;
    let parallelism = usize::from(cli.settle.parallelism);
    tokio::pin!(shutdown);
    if let Some(month) = cli.settle.month {
        let run_id = cli
            .settle
            .run_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        run(
            &cli.common,
            SettleConfig {
                month,
                run_id,
                parallelism,
            },
            &mut shutdown,
        )
        .await?;
        return Ok(());
    }
    loop {
        let now = chrono::Utc::now();
        let at = schedule::next_run(now, cli.settle.schedule_day, cli.settle.schedule_time, tz);
        let month = schedule::month_settled_at(at, tz);
        info!(next_run = %at, month = %month, "settlement scheduled");
        let wait = (at - now).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => return Ok(()),
        }
        // The run id is derived from the schedule, so instances started together share it.
        let run_id = format!("scheduled-{}", at.timestamp());
        match run(
            &cli.common,
            SettleConfig {
                month,
                run_id,
                parallelism,
            },
            &mut shutdown,
        )
        .await
        {
            Ok(_) => {}
            Err(SettlementError::Interrupted) => return Ok(()),
            Err(e) => {
                warn!(month = %month, error = %e, "scheduled settlement failed; the next schedule retries")
            }
        }
    }
}

/// For tests and the CLI: the rules' bill id.
pub fn bill_id(month: BillingMonth, member_id: i64) -> i64 {
    rules::bill_id(month, member_id)
}
