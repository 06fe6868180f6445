//! The consumer loop's batch mode, for a sink that keeps its offsets with its rows.
//!
//! The record mode ([`crate::consumer`]) hands one record at a time to a handler and stores
//! offsets in Kafka. A sink into a database does better with batches written in one
//! transaction together with the batch's next offsets: the database then holds the exact
//! position, and Kafka's committed offsets are only a hint. This loop gives such a sink
//! ([`BatchSink`]) the same runtime the other processors have:
//!
//! - **Offsets**: at start the sink's stored offsets are committed to the group before it
//!   joins (a partition the sink holds none for starts at its low watermark, whatever the
//!   group committed: an emptied database is loaded again). After each transaction its offsets
//!   are stored in the group as a hint. A sink must fence its writes (skip the records below
//!   the offsets it holds, under a lock taken in the same transaction): after a rebalance an
//!   instance may read from a hint that lags.
//! - **Lanes**: partition `p` is written by lane `p % writers`, each lane with its own
//!   connection and at most one transaction at a time, so a partition's records are written
//!   in order while several partitions are written at once. A lane's batch closes when it
//!   holds `batch_size` records or `linger` after its first; the loop stops reading while any
//!   lane's buffer is full (memory stays bounded by `writers x batch_size` records, plus the
//!   batches being written).
//! - **Bad input**: a record the sink cannot turn into a row is quarantined (acknowledged)
//!   before the transaction that moves its offset; it stays in the batch without a row.
//! - **Rebalance**: a revoked partition's buffered records are dropped (its next owner reads
//!   them from the stored offset); a write already under way commits or is fenced.
//! - **Bounded mode**: the end offsets are captured at start; records past them are not read,
//!   and the loop ends once the stored offsets reach them (asked of the sink once a second
//!   when idle, so partitions another instance finished count too).
//! - **Health**: the loop beats at least every half second and counts records.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
};
use tracing::{info, warn};

use crate::{
    ProduceError,
    config::KafkaSettings,
    consumer::{EndOffsets, LoopContext, Rebalanced, end_offsets},
    quarantine::{Origin, Quarantine},
};

/// The next offset to read, by (topic, partition).
pub type Positions = HashMap<(String, i32), i64>;

/// Why a record does not become a row.
#[derive(Debug)]
pub enum RowError<E> {
    /// Not now (the registry is unreachable, say): the loop stops, the record is read again.
    Retriable(E),
    /// Never: the record is quarantined with this reason.
    Refused(String),
}

/// One record of a batch.
#[derive(Debug)]
pub struct Staged<R> {
    pub origin: Origin,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// `None` once the record is quarantined: only its offset moves.
    pub row: Option<R>,
}

/// What one transaction did.
#[derive(Debug, Default)]
pub struct Written<M> {
    /// The sink's own counts.
    pub moves: M,
    /// Records the database refused (the sink quarantined them).
    pub refused: u64,
}

/// A finished write: the writer to reuse (none if it broke), and what it did.
pub type WriteResult<W, M, E> = (Option<W>, Result<Written<M>, E>);

/// A sink that writes batches together with their offsets.
pub trait BatchSink: Send + Sync + 'static {
    /// What a record becomes.
    type Row: Send + 'static;
    /// A lane's connection, kept between its transactions.
    type Writer: Send + 'static;
    /// The sink's counts of what it wrote, summed over batches.
    type Moves: Default + std::ops::AddAssign + Send + 'static;
    type Error: std::error::Error
        + From<KafkaError>
        + From<ProduceError>
        + From<tokio::task::JoinError>
        + Send
        + 'static;

    /// Decodes and validates one record.
    fn row(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> impl Future<Output = Result<Self::Row, RowError<Self::Error>>> + Send;

    /// The next offsets this sink's group holds in its store.
    fn stored_offsets(&self) -> impl Future<Output = Result<Positions, Self::Error>> + Send;

    /// Writes `batch` (in consumption order) and the next offset of each of its partitions in
    /// one transaction, skipping records below the offsets the store holds (the fence). A
    /// record the store refuses is quarantined by the sink and counted in
    /// [`Written::refused`]. On error nothing of the batch is committed.
    fn write(
        self: Arc<Self>,
        writer: Option<Self::Writer>,
        batch: Vec<Staged<Self::Row>>,
    ) -> impl Future<Output = WriteResult<Self::Writer, Self::Moves, Self::Error>> + Send;
}

/// How the batch loop runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Records per transaction, at most.
    pub batch_size: usize,
    /// How long a batch waits to fill after its first record.
    pub linger: Duration,
    /// Lanes writing at once, each on its own connection.
    pub writers: usize,
    /// Stop once the end offsets captured at start are written.
    pub bounded: bool,
}

/// What the batch loop did.
#[derive(Debug, Default)]
pub struct BatchSummary<M> {
    pub batches: u64,
    pub read: u64,
    pub quarantined: u64,
    pub moves: M,
    pub elapsed: Duration,
}

/// A lane: the records waiting for its next transaction, and its writer.
struct Lane<W, R> {
    buffer: Vec<Staged<R>>,
    /// Records of `buffer` quarantined before the write.
    refused: u64,
    deadline: Option<tokio::time::Instant>,
    writer: Option<W>,
    busy: bool,
}

impl<W, R> Lane<W, R> {
    fn ready(&self, batch_size: usize, now: tokio::time::Instant) -> bool {
        !self.busy
            && !self.buffer.is_empty()
            && (self.buffer.len() >= batch_size || self.deadline.is_some_and(|d| d <= now))
    }
}

/// A batch under way on a lane.
struct InFlight<S: BatchSink> {
    lane: usize,
    offsets: Positions,
    read: u64,
    refused: u64,
    result: WriteResult<S::Writer, S::Moves, S::Error>,
}

/// The next offset per partition after `batch`.
fn next_offsets<R>(batch: &[Staged<R>]) -> Positions {
    batch
        .iter()
        .map(|s| {
            (
                (s.origin.topic.clone(), s.origin.partition),
                s.origin.offset + 1,
            )
        })
        .collect()
}

/// Whether `positions` reach `ends` on every partition that holds records.
pub fn reached(ends: &EndOffsets, positions: &Positions) -> bool {
    ends.iter()
        .all(|(k, (low, high))| high <= low || positions.get(k).is_some_and(|p| p >= high))
}

type LoopConsumer = StreamConsumer<LoopContext>;

/// Commits the sink's stored offsets to the group (the low watermark where it holds none)
/// before the consumer joins, so reading starts where the store stopped.
fn hand_over_offsets(
    consumer: &LoopConsumer,
    topics: &[String],
    stored: &Positions,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), (low, _)) in end_offsets(consumer, topics)? {
        let from = stored.get(&(t.clone(), p)).copied().unwrap_or(low);
        tpl.add_partition_offset(&t, p, Offset::Offset(from))?;
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
    {
        warn!(error = %e, "cannot hand stored offsets to the group (another member is active?); rows stay exact, records may be read again");
    }
    Ok(())
}

/// The loop's state between turns.
struct State<S: BatchSink> {
    sink: Arc<S>,
    config: BatchConfig,
    context: LoopContext,
    lanes: Vec<Lane<S::Writer, S::Row>>,
    writing: FuturesUnordered<tokio::task::JoinHandle<InFlight<S>>>,
    positions: Positions,
    ends: Option<EndOffsets>,
    summary: BatchSummary<S::Moves>,
    counters: crate::metrics::RecordCounters,
    last_refresh: Instant,
}

impl<S: BatchSink> State<S> {
    fn lane_of(&self, partition: i32) -> usize {
        usize::try_from(partition).unwrap_or(0) % self.lanes.len()
    }

    fn buffers_full(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.buffer.len() >= self.config.batch_size)
    }

    fn idle(&self) -> bool {
        self.writing.is_empty() && self.lanes.iter().all(|l| l.buffer.is_empty())
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.lanes
            .iter()
            .filter(|l| !l.busy && !l.buffer.is_empty())
            .filter_map(|l| l.deadline)
            .min()
    }

    /// Starts a transaction on every lane whose batch is ready.
    fn start_ready(&mut self) {
        let now = tokio::time::Instant::now();
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            if !lane.ready(self.config.batch_size, now) {
                continue;
            }
            let batch = std::mem::take(&mut lane.buffer);
            let refused = std::mem::take(&mut lane.refused);
            lane.deadline = None;
            lane.busy = true;
            let (sink, writer) = (self.sink.clone(), lane.writer.take());
            self.writing.push(tokio::spawn(async move {
                let offsets = next_offsets(&batch);
                let read = batch.len() as u64;
                let result = sink.write(writer, batch).await;
                InFlight {
                    lane: i,
                    offsets,
                    read,
                    refused,
                    result,
                }
            }));
        }
    }

    /// Counts a finished transaction and hands its offsets to the group as a hint.
    fn finish(&mut self, consumer: &LoopConsumer, done: InFlight<S>) -> Result<(), S::Error> {
        let lane = &mut self.lanes[done.lane];
        lane.busy = false;
        let (writer, result) = done.result;
        lane.writer = writer;
        let written = result?;
        let refused = done.refused + written.refused;
        self.summary.batches += 1;
        self.summary.read += done.read;
        self.summary.quarantined += refused;
        self.summary.moves += written.moves;
        self.counters
            .add(done.read, done.read.saturating_sub(refused), refused);
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in done.offsets {
            tpl.add_partition_offset(&t, p, Offset::Offset(o))?;
            let pos = self.positions.entry((t, p)).or_insert(o);
            *pos = (*pos).max(o);
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            warn!(error = %e, "cannot store offsets in the group (partition revoked?)");
        }
        Ok(())
    }

    /// Drops the buffered records of revoked partitions: their next owner reads them again.
    fn apply_rebalances(&mut self) {
        for event in self.context.take() {
            if let Rebalanced::Revoked(parts) = event {
                for lane in &mut self.lanes {
                    lane.buffer
                        .retain(|s| !parts.contains(&(s.origin.topic.clone(), s.origin.partition)));
                    if lane.buffer.is_empty() {
                        lane.deadline = None;
                    }
                }
                info!(group = %self.config.group_id, revoked = ?parts, "partitions revoked");
            }
        }
    }

    /// Whether a bounded run is done: every lane idle and the store's offsets at the ends.
    async fn finished(&mut self) -> Result<bool, S::Error> {
        let Some(ends) = &self.ends else {
            return Ok(false);
        };
        if !self.idle() {
            return Ok(false);
        }
        if reached(ends, &self.positions) {
            return Ok(true);
        }
        // Partitions another instance wrote deliver nothing here: ask the store.
        if self.last_refresh.elapsed() >= Duration::from_secs(1) {
            self.last_refresh = Instant::now();
            for (k, o) in self.sink.stored_offsets().await? {
                let pos = self.positions.entry(k).or_insert(o);
                *pos = (*pos).max(o);
            }
            return Ok(reached(ends, &self.positions));
        }
        Ok(false)
    }

    /// Turns a consumed record into a lane's entry; returns an error only when the loop must
    /// stop (the record is then read again).
    async fn take(&mut self, quarantine: &Quarantine, m: &impl Message) -> Result<(), S::Error> {
        let origin = Origin {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        };
        if let Some(ends) = &self.ends
            && ends
                .get(&(origin.topic.clone(), origin.partition))
                .is_none_or(|(_, high)| origin.offset >= *high)
        {
            return Ok(());
        }
        let (row, refused) = match self.sink.row(&origin.topic, m.key(), m.payload()).await {
            Ok(row) => (Some(row), 0),
            Err(RowError::Retriable(e)) => return Err(e),
            Err(RowError::Refused(reason)) => {
                // Acknowledged before the transaction that moves the offset past it.
                let now = chrono::Utc::now().timestamp_millis();
                quarantine
                    .send(&origin, m.key(), m.payload(), &reason, vec![], now)
                    .await?;
                (None, 1)
            }
        };
        let i = self.lane_of(origin.partition);
        let lane = &mut self.lanes[i];
        lane.deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + self.config.linger);
        lane.refused += refused;
        lane.buffer.push(Staged {
            origin,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            row,
        });
        Ok(())
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs the batch loop until `shutdown` or, when bounded, until the end offsets captured at
/// start are written. On shutdown the batches under way finish; buffered records are left for
/// the next run (their offsets never moved).
pub async fn run_batches<S: BatchSink>(
    config: BatchConfig,
    kafka: KafkaSettings,
    sink: Arc<S>,
    quarantine: Quarantine,
    shutdown: impl Future<Output = ()>,
) -> Result<BatchSummary<S::Moves>, S::Error> {
    let started = Instant::now();
    let context = LoopContext::default();
    let mut kc = kafka.consumer_config(&config.group_id);
    kc.set("fetch.max.bytes", "52428800");
    let consumer: LoopConsumer = kc.create_with_context(context.clone())?;
    let positions = sink.stored_offsets().await?;
    hand_over_offsets(&consumer, &config.topics, &positions)?;
    let topic_refs: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    let ends = if config.bounded {
        Some(end_offsets(&consumer, &config.topics)?)
    } else {
        None
    };
    info!(group = %config.group_id, bounded = config.bounded, writers = config.writers, batch_size = config.batch_size, "batch loop started");
    let lanes = (0..config.writers.max(1))
        .map(|_| Lane {
            buffer: Vec::new(),
            refused: 0,
            deadline: None,
            writer: None,
            busy: false,
        })
        .collect();
    let mut st = State {
        counters: crate::metrics::RecordCounters::for_group(&config.group_id),
        sink,
        config,
        context,
        lanes,
        writing: FuturesUnordered::new(),
        positions,
        ends,
        summary: BatchSummary::default(),
        last_refresh: Instant::now(),
    };
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        crate::metrics::global().beat();
        st.apply_rebalances();
        st.start_ready();
        if st.finished().await? {
            break;
        }
        let can_read = !st.buffers_full();
        let deadline = st.next_deadline();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(done) = st.writing.next() => st.finish(&consumer, done?)?,
            () = sleep_until(deadline) => {}
            msg = consumer.recv(), if can_read => match msg {
                Ok(m) => st.take(&quarantine, &m).await?,
                // The client reconnects by itself (a broker restart, a network blip).
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = tick.tick() => {}
        }
    }
    while let Some(done) = st.writing.next().await {
        st.finish(&consumer, done?)?;
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        warn!(error = %e, "final commit failed; the sink's store keeps the exact offsets");
    }
    st.summary.elapsed = started.elapsed();
    Ok(st.summary)
}
