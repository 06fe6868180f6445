//! The consumer loop every processor runs.
//!
//! Guarantees (at least once, made effectively once by idempotent handlers):
//! - An offset is stored only when the record and every record before it on its partition
//!   are done: handled, or quarantined with the dead letter acknowledged. librdkafka commits
//!   stored offsets (`enable.auto.offset.store=false`), so a crash replays from the first
//!   record that was not finished, never skips one.
//! - At most `max_in_flight` records are being worked on at once; the loop stops pulling
//!   from the broker while the cap is reached, and completions are polled first (a `biased`
//!   select), so memory stays bounded.
//! - A record that does not decode, or that its handler rejects as final, is quarantined to
//!   the dead-letter topic with the reason, and the loop keeps going. A retriable failure is
//!   retried with exponential backoff, up to `max_retries`, then quarantined.
//! - On shutdown the loop stops pulling, lets in-flight work finish (retry waits are cut
//!   short, and those records are left unstored to be redone), stores and commits offsets.
//! - Delayed records: a record carrying the header [`NOT_BEFORE`] (unix milliseconds) is not
//!   handed over before that instant. The loop holds it in memory and pauses its partition (no
//!   busy waiting, other partitions go on), then seeks the partition back to just after it and
//!   resumes. Retry topics rely on it: one delay per topic keeps each partition in due order.
//! - A handler may answer [`HandleError::Defer`] (e.g. inside quiet hours): the record waits
//!   that long in its in-flight slot and is handled again; its offset does not move meanwhile.
//! - In bounded mode the end offsets of every partition are captured at start; records at or
//!   past them are not processed, and the loop ends once every assigned partition is done.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use billing_schema::{AvroRecord, Decoder};
use futures::{StreamExt, stream::FuturesUnordered};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::OwnedMessage,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Backoff, KafkaSettings},
    quarantine::{Origin, Quarantine},
};

/// One decoded record handed to a handler.
#[derive(Debug, Clone)]
pub struct Incoming<V> {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: V,
    pub timestamp_ms: Option<i64>,
}

/// How a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The record may succeed later (a database or broker hiccup): retried with backoff.
    #[error("retriable: {0}")]
    Retriable(String),
    /// The record can never succeed: quarantined with this reason.
    #[error("{0}")]
    Final(String),
    /// Not now: handle the record again after this (real) time.
    #[error("deferred for {0:?}")]
    Defer(Duration),
}

/// The header holding the instant (unix milliseconds, real time) before which a record must
/// not be handled.
pub const NOT_BEFORE: &str = "billing.not-before";

/// The [`NOT_BEFORE`] instant of a message, if it has a well-formed one.
fn not_before(msg: &impl Message) -> Option<i64> {
    use rdkafka::message::Headers;
    let headers = msg.headers()?;
    headers
        .iter()
        .find(|h| h.key == NOT_BEFORE)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

/// The work done for each record. It must be idempotent: a record may be handled again
/// after a crash or rebalance, and must then have no second effect.
pub trait Handler<V>: Send + Sync + 'static {
    /// Handles one record; returns once its effect is durable.
    fn handle(&self, record: &Incoming<V>) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// Default cap on the bytes of records in flight: 64 MiB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// The consumer group: the processor's name.
    pub group_id: String,
    /// Full topic names to subscribe to.
    pub topics: Vec<String>,
    /// Cap on records being worked on at once.
    pub max_in_flight: usize,
    /// Cap on the bytes (keys and values) of the records being worked on at once.
    pub max_in_flight_bytes: usize,
    /// Stop at the end offsets captured at start.
    pub bounded: bool,
    /// Spacing of retries of retriable failures.
    pub backoff: Backoff,
    /// Retries of a retriable failure before the record is quarantined.
    pub max_retries: u32,
    /// Topics whose records may carry [`NOT_BEFORE`], each with the longest hold honoured:
    /// the header is ignored on every other topic (a forged one on a request topic cannot
    /// stall it), and a later instant is clamped to that hold.
    pub delayed: HashMap<String, Duration>,
}

impl LoopConfig {
    /// Defaults for `group_id` reading `topics`.
    pub fn new(group_id: impl Into<String>, topics: Vec<String>) -> Self {
        LoopConfig {
            group_id: group_id.into(),
            topics,
            max_in_flight: 1000,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            bounded: false,
            backoff: Backoff::default(),
            max_retries: 8,
            delayed: HashMap::new(),
        }
    }
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    /// The shutdown future completed.
    #[default]
    Shutdown,
    /// Bounded mode: every assigned partition reached its captured end offset.
    EndOfInput,
}

/// What the loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopSummary {
    /// Records handled successfully.
    pub processed: u64,
    /// Records sent to the dead-letter topic.
    pub quarantined: u64,
    /// Retries of retriable failures.
    pub retries: u64,
    /// Records left unfinished at shutdown (their offsets were not stored).
    pub abandoned: u64,
    pub stopped_by: StopReason,
}

/// The loop could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// What the loop needs from outside.
#[derive(Debug)]
pub struct LoopDeps<V, H> {
    pub kafka: KafkaSettings,
    pub decoder: Arc<Decoder<V>>,
    pub handler: Arc<H>,
    pub quarantine: Quarantine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Processed,
    Quarantined,
    Abandoned,
}

#[derive(Debug)]
struct Done {
    topic: String,
    partition: i32,
    offset: i64,
    outcome: Outcome,
    retries: u32,
    elapsed: Duration,
    /// The record's size as counted against [`LoopConfig::max_in_flight_bytes`].
    bytes: usize,
}

/// A record's size as the loop's byte budget counts it: its key and value.
fn record_bytes(msg: &impl Message) -> usize {
    msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len)
}

/// Per-partition bookkeeping of records in flight, so the stored offset only ever moves past
/// records that are finished.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), Track>,
}

#[derive(Debug, Default)]
struct Track {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset begun.
    next_begun: i64,
    /// The offset last stored (the next record to read after a restart).
    stored: Option<i64>,
}

impl OffsetTracker {
    /// Notes that work on `offset` began.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: i64) {
        let t = self
            .partitions
            .entry((topic.to_string(), partition))
            .or_default();
        t.in_flight.insert(offset);
        t.next_begun = t.next_begun.max(offset + 1);
    }

    /// Notes that `offset` is finished; returns the new offset to store if it moved.
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let t = self.partitions.get_mut(&(topic.to_string(), partition))?;
        t.in_flight.remove(&offset);
        let watermark = t.in_flight.first().copied().unwrap_or(t.next_begun);
        if t.stored.is_none_or(|s| watermark > s) {
            t.stored = Some(watermark);
            Some(watermark)
        } else {
            None
        }
    }

    /// Forgets a revoked partition: records of it still in flight store nothing when they
    /// finish, and if it comes back, tracking starts again from its committed offset.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_string(), partition));
    }

    /// The offset stored for a partition, if any.
    pub fn stored(&self, topic: &str, partition: i32) -> Option<i64> {
        self.partitions
            .get(&(topic.to_string(), partition))
            .and_then(|t| t.stored)
    }
}

/// A change of this member's assignment, as the loop learns of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rebalanced {
    Revoked(Vec<(String, i32)>),
    Assigned(Vec<(String, i32)>),
}

/// The consumer's context: it hears rebalances on the polling thread (inside `recv`) and
/// queues them for the loop, which applies them before it looks at the next record.
///
/// On assignment it resumes every assigned partition at once: librdkafka keeps a partition's
/// paused flag across a revoke and a re-assign, so a partition paused for a held record (or
/// past its bounded end) and handed back to the same member would otherwise never be read
/// again.
///
/// It also keeps librdkafka's latest statistics of each partition's lag (the high watermark
/// of its last fetch minus the offset the loop stored), so the loop reports lag without a
/// round trip to the broker.
#[derive(Debug, Default, Clone)]
pub struct LoopContext {
    events: Arc<std::sync::Mutex<Vec<Rebalanced>>>,
    lags: Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>,
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// How often librdkafka reports its statistics, lag among them.
const STATISTICS_INTERVAL: &str = "5000";

impl rdkafka::ClientContext for LoopContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let lags = statistics.topics.iter().flat_map(|(topic, t)| {
            t.partitions
                .iter()
                // Partition -1 is librdkafka's internal one; a negative lag is unknown.
                .filter(|(p, s)| **p >= 0 && s.consumer_lag_stored >= 0)
                .map(|(p, s)| ((topic.clone(), *p), s.consumer_lag_stored))
        });
        if let Ok(mut known) = self.lags.lock() {
            known.clear();
            known.extend(lags);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LoopContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            self.push(Rebalanced::Revoked(partitions_of(tpl)));
        }
    }

    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = consumer.resume(tpl) {
                warn!(error = %e, "cannot resume assigned partitions");
            }
            self.push(Rebalanced::Assigned(partitions_of(tpl)));
        }
    }
}

impl LoopContext {
    fn push(&self, event: Rebalanced) {
        if let Ok(mut q) = self.events.lock() {
            q.push(event);
        }
    }

    pub(crate) fn take(&self) -> Vec<Rebalanced> {
        self.events
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
}

/// The loop's consumer.
type LoopConsumer = StreamConsumer<LoopContext>;

/// The end offsets captured at start, and which partitions have reached them.
#[derive(Debug)]
struct Bounds {
    ends: HashMap<(String, i32), i64>,
    done: HashSet<(String, i32)>,
    paused: HashSet<(String, i32)>,
    last_committed_check: Option<Instant>,
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// (low, high) watermarks by (topic, partition).
pub type EndOffsets = HashMap<(String, i32), (i64, i64)>;

/// The low and high watermarks of every partition of `topics`.
pub fn end_offsets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &[String],
) -> Result<EndOffsets, KafkaError> {
    let mut ends = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        for t in metadata.topics() {
            if let Some(e) = t.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)?;
                ends.insert((topic.clone(), p.id()), (low, high));
            }
        }
    }
    Ok(ends)
}

impl Bounds {
    fn capture(consumer: &LoopConsumer, topics: &[String]) -> Result<Self, KafkaError> {
        let marks = end_offsets(consumer, topics)?;
        let done = marks
            .iter()
            .filter(|(_, (low, high))| high <= low)
            .map(|(k, _)| k.clone())
            .collect();
        let ends = marks.into_iter().map(|(k, (_, high))| (k, high)).collect();
        Ok(Bounds {
            ends,
            done,
            paused: HashSet::new(),
            last_committed_check: None,
        })
    }

    fn beyond_end(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.ends
            .get(&(topic.to_string(), partition))
            .is_none_or(|end| offset >= *end)
    }

    fn pause(&mut self, consumer: &LoopConsumer, topic: &str, partition: i32) {
        if self.paused.insert((topic.to_string(), partition)) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            if let Err(e) = consumer.pause(&tpl) {
                debug!(topic, partition, error = %e, "cannot pause partition past its end");
            }
        }
    }

    /// Whether every partition assigned to this member has reached its end.
    fn finished(&mut self, consumer: &LoopConsumer, tracker: &OffsetTracker) -> bool {
        let Ok(assignment) = consumer.assignment() else {
            return false;
        };
        if assignment.count() == 0 {
            return false;
        }
        let mut pending = Vec::new();
        for el in assignment.elements() {
            let key = (el.topic().to_string(), el.partition());
            if self.done.contains(&key) {
                continue;
            }
            let end = self.ends.get(&key).copied().unwrap_or(0);
            if tracker.stored(&key.0, key.1).is_some_and(|s| s >= end) {
                self.done.insert(key);
            } else {
                pending.push(key);
            }
        }
        if pending.is_empty() {
            return true;
        }
        // Partitions that another member (or an earlier run) already finished deliver no
        // records here: learn that from the group's committed offsets, at most once a second.
        if self
            .last_committed_check
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_committed_check = Some(Instant::now());
            if let Ok(committed) = consumer.committed(METADATA_TIMEOUT) {
                for el in committed.elements() {
                    let key = (el.topic().to_string(), el.partition());
                    if let (Offset::Offset(o), Some(end)) = (el.offset(), self.ends.get(&key))
                        && o >= *end
                    {
                        self.done.insert(key);
                    }
                }
            }
        }
        pending.iter().all(|k| self.done.contains(k))
    }
}

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn wait_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Decodes and handles one record, quarantining what cannot succeed.
async fn process<V: AvroRecord, H: Handler<V>>(
    msg: OwnedMessage,
    decoder: Arc<Decoder<V>>,
    handler: Arc<H>,
    quarantine: Quarantine,
    config: Arc<LoopConfig>,
    cancel: CancellationToken,
) -> Done {
    let origin = Origin {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
    };
    let mut attempts: Vec<String> = Vec::new();
    let mut retries = 0u32;
    let started = Instant::now();
    let bytes = record_bytes(&msg);
    let done = |outcome, retries| Done {
        topic: origin.topic.clone(),
        partition: origin.partition,
        offset: origin.offset,
        outcome,
        retries,
        elapsed: started.elapsed(),
        bytes,
    };

    let failure: String = 'work: {
        let value = loop {
            match decoder.decode(msg.payload()).await {
                Ok(v) => break v,
                Err(e) if e.is_retriable() && retries < config.max_retries => {
                    attempts.push(e.to_string());
                    if !wait_or_cancel(config.backoff.delay(retries), &cancel).await {
                        return done(Outcome::Abandoned, retries);
                    }
                    retries += 1;
                }
                Err(e) => break 'work format!("cannot decode: {e}"),
            }
        };
        let incoming = Incoming {
            topic: origin.topic.clone(),
            partition: origin.partition,
            offset: origin.offset,
            key: msg.key().map(<[u8]>::to_vec),
            value,
            timestamp_ms: msg.timestamp().to_millis(),
        };
        loop {
            match handler.handle(&incoming).await {
                Ok(()) => return done(Outcome::Processed, retries),
                Err(HandleError::Retriable(e)) if retries < config.max_retries => {
                    warn!(topic = %origin.topic, partition = origin.partition, offset = origin.offset, retry = retries + 1, error = %e, "retry scheduled");
                    attempts.push(e);
                    if !wait_or_cancel(config.backoff.delay(retries), &cancel).await {
                        return done(Outcome::Abandoned, retries);
                    }
                    retries += 1;
                }
                Err(HandleError::Retriable(e)) => {
                    break 'work format!("gave up after {} attempts: {e}", retries + 1);
                }
                Err(HandleError::Final(reason)) => break 'work reason,
                Err(HandleError::Defer(wait)) => {
                    debug!(topic = %origin.topic, partition = origin.partition, offset = origin.offset, ?wait, "record deferred");
                    if !wait_or_cancel(wait, &cancel).await {
                        return done(Outcome::Abandoned, retries);
                    }
                }
            }
        }
    };

    // Quarantine; the offset may only move once the dead letter is acknowledged.
    let mut q_attempt = 0u32;
    loop {
        let now_ms = chrono::Utc::now().timestamp_millis();
        match quarantine
            .send(
                &origin,
                msg.key(),
                msg.payload(),
                &failure,
                attempts.clone(),
                now_ms,
            )
            .await
        {
            Ok(()) => return done(Outcome::Quarantined, retries),
            Err(e) => {
                warn!(topic = %origin.topic, offset = origin.offset, error = %e, "cannot write dead letter, retrying");
                if !wait_or_cancel(config.backoff.delay(q_attempt), &cancel).await {
                    return done(Outcome::Abandoned, retries);
                }
                q_attempt = q_attempt.saturating_add(1);
            }
        }
    }
}

fn store(consumer: &LoopConsumer, topic: &str, partition: i32, next: i64) {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(next))
        .is_ok()
        && let Err(e) = consumer.store_offsets(&tpl)
    {
        // The partition was revoked meanwhile: its new owner redoes the record.
        debug!(topic, partition, next, error = %e, "offset not stored");
    }
}

/// The loop's metrics, labelled by group.
struct LoopMetrics {
    records: crate::metrics::RecordCounters,
    retries: crate::metrics::Counter,
    in_flight: crate::metrics::Gauge,
    in_flight_bytes: crate::metrics::Gauge,
    held: crate::metrics::Gauge,
    latency: crate::metrics::Histogram,
}

impl LoopMetrics {
    fn new(group: &str) -> Self {
        let m = crate::metrics::global();
        let l = [("group", group)];
        LoopMetrics {
            records: crate::metrics::RecordCounters::for_group(group),
            retries: m.counter(
                "billing_retries_total",
                "Retries of retriable handler failures.",
                &l,
            ),
            in_flight: m.gauge("billing_in_flight", "Records being worked on.", &l),
            in_flight_bytes: m.gauge(
                "billing_in_flight_bytes",
                "Bytes (keys and values) of the records being worked on.",
                &l,
            ),
            held: m.gauge(
                "billing_held_partitions",
                "Partitions paused until a delayed record is due.",
                &l,
            ),
            latency: m.histogram(
                "billing_handle_seconds",
                "Time from receipt to done, per record.",
                &l,
            ),
        }
    }
}

/// Consumer lag per tracked partition, from librdkafka's last statistics (see
/// [`LoopContext`]). It used to ask the broker for each partition's high watermark with a
/// 100 ms time-out, from the loop's task: a broker busy for longer held the loop (and every
/// record in flight) for up to 100 ms per partition, and each timed-out request made
/// librdkafka drop its connection to the broker (`socket.max.fails` = 1), fetches in flight
/// with it.
fn report_lag(context: &LoopContext, group: &str, tracker: &OffsetTracker) {
    let m = crate::metrics::global();
    let Ok(lags) = context.lags.lock() else {
        return;
    };
    for (topic, partition) in tracker.partitions.keys() {
        if let Some(lag) = lags.get(&(topic.clone(), *partition)) {
            let p = partition.to_string();
            m.gauge(
                "billing_consumer_lag",
                "Records behind the high watermark.",
                &[("group", group), ("topic", topic), ("partition", &p)],
            )
            .set(*lag);
        }
    }
}

fn record(
    summary: &mut LoopSummary,
    tracker: &mut OffsetTracker,
    consumer: &LoopConsumer,
    metrics: &LoopMetrics,
    d: Done,
) {
    summary.retries += u64::from(d.retries);
    metrics.retries.inc_by(u64::from(d.retries));
    metrics.in_flight.dec();
    metrics
        .in_flight_bytes
        .dec_by(i64::try_from(d.bytes).unwrap_or(i64::MAX));
    metrics.latency.observe(d.elapsed.as_secs_f64());
    match d.outcome {
        Outcome::Processed => {
            summary.processed += 1;
            metrics.records.processed.inc();
        }
        Outcome::Quarantined => {
            summary.quarantined += 1;
            metrics.records.quarantined.inc();
        }
        Outcome::Abandoned => {
            summary.abandoned += 1;
            return;
        }
    }
    if let Some(next) = tracker.complete(&d.topic, d.partition, d.offset) {
        store(consumer, &d.topic, d.partition, next);
    }
}

/// Records held until their [`NOT_BEFORE`] instant, one per paused partition.
#[derive(Default)]
struct Held {
    records: HashMap<(String, i32), (OwnedMessage, tokio::time::Instant)>,
}

impl Held {
    fn contains(&self, topic: &str, partition: i32) -> bool {
        self.records.contains_key(&(topic.to_string(), partition))
    }

    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.records.values().map(|(_, due)| *due).min()
    }

    /// Whether a record is still held `grace` after it fell due (its partition cannot be
    /// sought back, say): the loop beats but its partition does not move.
    fn overdue(&self, grace: Duration) -> bool {
        self.next_due()
            .is_some_and(|due| due + grace < tokio::time::Instant::now())
    }

    /// Holds `msg` until `due` and pauses its partition.
    fn hold(&mut self, consumer: &LoopConsumer, msg: OwnedMessage, due: tokio::time::Instant) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(msg.topic(), msg.partition());
        if let Err(e) = consumer.pause(&tpl) {
            debug!(topic = msg.topic(), partition = msg.partition(), error = %e, "cannot pause");
        }
        self.records
            .insert((msg.topic().to_string(), msg.partition()), (msg, due));
    }

    /// The records now due, each with its partition moved back to just after it and resumed.
    /// Records of partitions no longer assigned are dropped: their new owner redoes them.
    fn release(&mut self, consumer: &LoopConsumer) -> Vec<OwnedMessage> {
        let now = tokio::time::Instant::now();
        let due: Vec<_> = self
            .records
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in due {
            let Some((msg, _)) = self.records.remove(&key) else {
                continue;
            };
            let (topic, partition) = (&key.0, key.1);
            // Records fetched behind the held one were skipped: fetch them again.
            match consumer.seek(
                topic,
                partition,
                Offset::Offset(msg.offset() + 1),
                METADATA_TIMEOUT,
            ) {
                Ok(()) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(topic, partition);
                    if let Err(e) = consumer.resume(&tpl) {
                        warn!(topic = %topic, partition, error = %e, "cannot resume partition");
                    }
                    out.push(msg);
                }
                Err(e) => {
                    let assigned = consumer.assignment().is_ok_and(|a| {
                        a.elements()
                            .iter()
                            .any(|el| el.topic() == topic && el.partition() == partition)
                    });
                    if assigned {
                        warn!(topic = %topic, partition, error = %e, "cannot seek; retrying");
                        self.records
                            .insert(key, (msg, now + Duration::from_secs(1)));
                    } else {
                        debug!(topic = %topic, partition, "held record's partition was revoked");
                    }
                }
            }
        }
        out
    }
}

/// How long a record must wait before it is handled: only on the topics in
/// [`LoopConfig::delayed`], and never longer than the hold configured for that topic.
fn hold_for(config: &LoopConfig, msg: &impl Message) -> Option<Duration> {
    let max = config.delayed.get(msg.topic())?;
    let wait = not_before(msg)?.saturating_sub(chrono::Utc::now().timestamp_millis());
    (wait > 0).then(|| Duration::from_millis(wait.unsigned_abs()).min(*max))
}

/// Applies the rebalances the context heard: a revoked partition's held record and offset
/// tracking are forgotten (its next owner reads it again from the committed offset, which
/// never passed an unfinished record), and its bounded-mode pause is no longer ours to keep.
fn apply_rebalances(
    context: &LoopContext,
    held: &mut Held,
    tracker: &mut OffsetTracker,
    mut bounds: Option<&mut Bounds>,
    group: &str,
) {
    for event in context.take() {
        match event {
            Rebalanced::Revoked(parts) => {
                for (topic, partition) in &parts {
                    held.records.remove(&(topic.clone(), *partition));
                    tracker.forget(topic, *partition);
                    if let Some(b) = bounds.as_deref_mut() {
                        b.paused.remove(&(topic.clone(), *partition));
                    }
                    crate::metrics::global().remove_lag(group, topic, *partition);
                }
                info!(group, revoked = ?parts, "partitions revoked");
            }
            Rebalanced::Assigned(parts) => info!(group, assigned = ?parts, "partitions assigned"),
        }
    }
}

/// Counts a record going into flight; returns its size for the byte budget.
fn admit(metrics: &LoopMetrics, msg: &impl Message) -> usize {
    let bytes = record_bytes(msg);
    metrics.in_flight.inc();
    metrics
        .in_flight_bytes
        .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    bytes
}

/// The loop's consumer settings: the group's, with librdkafka's statistics (the lag gauge's
/// source) every [`STATISTICS_INTERVAL`] unless `KAFKA_PROPERTIES` names another interval
/// (0 turns them, and the gauge, off).
fn client_config(kafka: &KafkaSettings, group: &str) -> rdkafka::ClientConfig {
    let mut c = kafka.consumer_config(group);
    if c.get("statistics.interval.ms").is_none() {
        c.set("statistics.interval.ms", STATISTICS_INTERVAL);
    }
    c
}

/// Runs the loop until `shutdown` completes or, in bounded mode, the input is consumed.
pub async fn run_consumer<V: AvroRecord, H: Handler<V>>(
    config: LoopConfig,
    deps: LoopDeps<V, H>,
    shutdown: impl Future<Output = ()>,
) -> Result<LoopSummary, LoopError> {
    let context = LoopContext::default();
    let consumer: LoopConsumer =
        client_config(&deps.kafka, &config.group_id).create_with_context(context.clone())?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let mut bounds = if config.bounded {
        Some(Bounds::capture(&consumer, &config.topics)?)
    } else {
        None
    };
    info!(group = %config.group_id, topics = ?config.topics, bounded = config.bounded, max_in_flight = config.max_in_flight, "consumer loop started");

    let config = Arc::new(config);
    let cancel = CancellationToken::new();
    let mut tracker = OffsetTracker::default();
    let mut in_flight = FuturesUnordered::new();
    // Bytes of the records in `in_flight`, against `config.max_in_flight_bytes`.
    let mut in_flight_bytes = 0usize;
    let mut summary = LoopSummary::default();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut held = Held::default();
    let metrics = LoopMetrics::new(&config.group_id);
    let mut last_lag = Instant::now();
    tokio::pin!(shutdown);

    summary.stopped_by = loop {
        crate::metrics::global().beat();
        crate::metrics::global().set_stuck(
            held.overdue(Duration::from_secs(30))
                .then_some("a held record is past its due time"),
        );
        apply_rebalances(
            &context,
            &mut held,
            &mut tracker,
            bounds.as_mut(),
            &config.group_id,
        );
        metrics
            .held
            .set(i64::try_from(held.records.len()).unwrap_or(0));
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            report_lag(&context, &config.group_id, &tracker);
        }
        if let Some(b) = bounds.as_mut()
            && in_flight.is_empty()
            && b.finished(&consumer, &tracker)
        {
            break StopReason::EndOfInput;
        }
        tokio::select! {
            biased;
            Some(d) = in_flight.next() => {
                let d: Done = d;
                in_flight_bytes = in_flight_bytes.saturating_sub(d.bytes);
                record(&mut summary, &mut tracker, &consumer, &metrics, d);
            }
            () = &mut shutdown => break StopReason::Shutdown,
            () = sleep_until_due(held.next_due()) => {
                for m in held.release(&consumer) {
                    in_flight_bytes += admit(&metrics, &m);
                    in_flight.push(process(
                        m,
                        deps.decoder.clone(),
                        deps.handler.clone(),
                        deps.quarantine.clone(),
                        config.clone(),
                        cancel.clone(),
                    ));
                }
            }
            msg = consumer.recv(), if in_flight.len() < config.max_in_flight
                && (in_flight_bytes < config.max_in_flight_bytes || in_flight.is_empty()) => match msg {
                Ok(m) => {
                    // A rebalance heard inside this recv applies before its first record.
                    apply_rebalances(&context, &mut held, &mut tracker, bounds.as_mut(), &config.group_id);
                    metrics.records.consumed.inc();
                    let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
                    if let Some(b) = bounds.as_mut()
                        && b.beyond_end(&topic, partition, offset) {
                            b.pause(&consumer, &topic, partition);
                            continue;
                        }
                    // Fetched before its partition was paused: read again after the seek.
                    if held.contains(&topic, partition) {
                        continue;
                    }
                    if let Some(wait) = hold_for(&config, &m) {
                        tracker.begin(&topic, partition, offset);
                        held.hold(&consumer, m.detach(), tokio::time::Instant::now() + wait);
                        continue;
                    }
                    tracker.begin(&topic, partition, offset);
                    in_flight_bytes += admit(&metrics, &m);
                    in_flight.push(process(
                        m.detach(),
                        deps.decoder.clone(),
                        deps.handler.clone(),
                        deps.quarantine.clone(),
                        config.clone(),
                        cancel.clone(),
                    ));
                }
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = tick.tick() => {}
        }
    };

    // Drain: finish what is in flight (retry waits end at once), store, commit. Held records
    // are left unstored: the next run reads them again.
    summary.abandoned += held.records.len() as u64;
    cancel.cancel();
    while let Some(d) = in_flight.next().await {
        record(&mut summary, &mut tracker, &consumer, &metrics, d);
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            warn!(error = %e, "final commit failed; the next run redoes the uncommitted records")
        }
    }
    info!(
        group = %config.group_id,
        processed = summary.processed,
        quarantined = summary.quarantined,
        retries = summary.retries,
        abandoned = summary.abandoned,
        stopped_by = ?summary.stopped_by,
        "consumer loop stopped"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_come_every_five_seconds_unless_the_properties_say_otherwise() {
        let mut kafka = KafkaSettings::new("127.0.0.1:9092");
        let interval = |k: &KafkaSettings| {
            client_config(k, "g")
                .get("statistics.interval.ms")
                .map(str::to_string)
        };
        assert_eq!(interval(&kafka).as_deref(), Some("5000"));
        kafka
            .properties
            .push(("statistics.interval.ms".into(), "0".into()));
        assert_eq!(interval(&kafka).as_deref(), Some("0"));
    }

    #[test]
    fn stored_offset_waits_for_the_oldest_record_in_flight() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.begin("a", 0, o);
        }
        assert_eq!(t.complete("a", 0, 12), Some(10));
        assert_eq!(t.complete("a", 0, 11), None);
        assert_eq!(t.complete("a", 0, 10), Some(13));
        assert_eq!(t.complete("a", 0, 13), Some(14));
        assert_eq!(t.stored("a", 0), Some(14));
        assert_eq!(t.stored("a", 1), None);
    }

    #[test]
    fn partitions_are_tracked_separately() {
        let mut t = OffsetTracker::default();
        t.begin("a", 0, 5);
        t.begin("a", 1, 7);
        assert_eq!(t.complete("a", 1, 7), Some(8));
        assert_eq!(t.stored("a", 0), None);
        assert_eq!(t.complete("a", 0, 5), Some(6));
    }
}
