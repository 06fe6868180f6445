//! The consumer loop's task mode, for a bounded stage that joins co-partitioned snapshots
//! (settlement): one task per partition, like a Kafka Streams task over a bounded input.
//!
//! The record and batch modes ([`crate::consumer`], [`crate::batch`]) consume records as they
//! come. A join over snapshots cannot: partition `p`'s bills need all of `members[p]` and then
//! all of `usage-records[p]`. So the group here only splits the work: instances of one run
//! share a group subscribed to the partitioning topic, whose partitions stay paused; each
//! partition this instance is assigned becomes a task that reads its snapshots itself
//! ([`crate::snapshot::PartitionReader`]).
//!
//! - **Done** is durable: when a task has finished (its outputs acknowledged), the partition
//!   is committed at its snapshot end in the group. The run ends when every partition is
//!   committed there, or was empty, whichever instance did it.
//! - **Rebalance**: a task whose partition is revoked is aborted (its new owner redoes it,
//!   and a task's effects must be idempotent: settlement's bills have ids derived from the
//!   member and month). A partition assigned again later is started again unless the group
//!   already holds it done, so a partition handed back after its owner died is never left
//!   unsettled. A finished task whose commit fails is committed again while the partition
//!   is still assigned, and forgotten once it is not.
//! - **Bounded concurrency**: at most `parallelism` tasks run at once.
//! - **Health**: the loop beats every 200 ms; a task that never ends shows as a run that
//!   does not end, not as a silent loop.
//! - **Shutdown** aborts the tasks: nothing is committed for them, the next run redoes them.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::KafkaError,
};
use tokio::{
    sync::Semaphore,
    task::{AbortHandle, JoinSet},
};
use tracing::{info, warn};

use crate::{config::KafkaSettings, consumer::EndOffsets};

const TICK: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(10);

/// How the task loop runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    /// The run's group: shared by the instances of one run, fresh for every run.
    pub group_id: String,
    /// The topic whose partitions are the tasks (the others are co-partitioned with it).
    pub topic: String,
    /// (low, high) watermarks of `topic`'s partitions at the run's start: a partition is done
    /// when committed at its high watermark, or empty.
    pub ends: EndOffsets,
    /// Tasks running at once, at least 1.
    pub parallelism: usize,
}

/// The task loop failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError<E> {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A task failed: the run stops (the next run redoes every partition not committed).
    #[error("partition {partition}: {error}")]
    Task { partition: i32, error: E },
    #[error("partition task panicked: {0}")]
    Panicked(String),
    #[error("interrupted before the run completed; run it again (it is idempotent)")]
    Interrupted,
}

/// The loop's state for one instance.
struct Tasks<O, E> {
    set: JoinSet<(i32, Result<O, E>)>,
    running: HashMap<i32, AbortHandle>,
    /// Finished here, commit (at the partition's snapshot end) not yet accepted.
    uncommitted: HashSet<i32>,
    /// Committed at the end by this instance.
    done: HashSet<i32>,
}

/// Runs `task(p)` for every partition `p` of `config.topic` this instance is assigned in
/// `config.group_id`, until every partition is done (here or elsewhere); returns this
/// instance's outputs by partition. See the module doc for rebalances and durability.
pub async fn run_tasks<O, E, F, Fut>(
    kafka: &KafkaSettings,
    config: TaskConfig,
    task: F,
    shutdown: impl Future<Output = ()>,
) -> Result<Vec<(i32, O)>, TaskError<E>>
where
    O: Send + 'static,
    E: Send + 'static,
    F: Fn(i32) -> Fut,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    let mut cc = kafka.consumer_config(&config.group_id);
    cc.set("enable.auto.commit", "false");
    let coordinator: StreamConsumer = cc.create()?;
    coordinator.subscribe(&[config.topic.as_str()])?;
    let permits = Arc::new(Semaphore::new(config.parallelism.max(1)));
    let mut t: Tasks<O, E> = Tasks {
        set: JoinSet::new(),
        running: HashMap::new(),
        uncommitted: HashSet::new(),
        done: HashSet::new(),
    };
    // One output per partition: a partition finished here, revoked before its commit and
    // handed back is run again, and only its last run counts.
    let mut outputs: HashMap<i32, O> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            Some(joined) = t.set.join_next_with_id() => {
                let (id, (p, result)) = match joined {
                    Ok(done) => done,
                    // Aborted on revoke: already forgotten.
                    Err(e) if e.is_cancelled() => continue,
                    Err(e) => return Err(TaskError::Panicked(e.to_string())),
                };
                // A run that finished as its partition was revoked (and perhaps handed back
                // and started again) is forgotten like an aborted one: only the partition's
                // current run counts, and its handle stays tracked.
                if t.running.get(&p).is_none_or(|current| current.id() != id) {
                    continue;
                }
                t.running.remove(&p);
                let output = result.map_err(|error| TaskError::Task { partition: p, error })?;
                outputs.insert(p, output);
                t.uncommitted.insert(p);
                commit_finished(&coordinator, &config, &mut t);
            }
            () = &mut shutdown => {
                t.set.abort_all();
                return Err(TaskError::Interrupted);
            }
            // Polling drives the group protocol; the partitions themselves stay paused.
            m = coordinator.recv() => if let Err(e) = m { warn!(error = %e, "coordinator error") },
            _ = tick.tick() => {
                crate::metrics::global().beat();
                follow_assignment(&coordinator, &config, &mut t, &permits, &task)?;
                commit_finished(&coordinator, &config, &mut t);
                if t.running.is_empty() && t.uncommitted.is_empty() && all_done(&coordinator, &config) {
                    return Ok(outputs.into_iter().collect());
                }
            }
        }
    }
}

/// The high watermark of `p` in the run's snapshot.
fn high(config: &TaskConfig, p: i32) -> i64 {
    config
        .ends
        .get(&(config.topic.clone(), p))
        .map_or(0, |e| e.1)
}

/// Starts a task for every newly assigned partition not done, and aborts the tasks (and
/// forgets the pending commits) of partitions no longer assigned.
fn follow_assignment<O, E, F, Fut>(
    coordinator: &StreamConsumer,
    config: &TaskConfig,
    t: &mut Tasks<O, E>,
    permits: &Arc<Semaphore>,
    task: &F,
) -> Result<(), KafkaError>
where
    O: Send + 'static,
    E: Send + 'static,
    F: Fn(i32) -> Fut,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    let assigned: HashSet<i32> = coordinator
        .assignment()?
        .elements()
        .iter()
        .map(|e| e.partition())
        .collect();
    t.running.retain(|p, handle| {
        let keep = assigned.contains(p);
        if !keep {
            info!(
                partition = p,
                "partition revoked: its task is aborted, its new owner redoes it"
            );
            handle.abort();
        }
        keep
    });
    t.uncommitted.retain(|p| assigned.contains(p));
    let mut newly = TopicPartitionList::new();
    for &p in &assigned {
        if t.running.contains_key(&p) || t.uncommitted.contains(&p) || t.done.contains(&p) {
            continue;
        }
        newly.add_partition(&config.topic, p);
        if committed_at_end(coordinator, config, p) {
            t.done.insert(p);
            continue;
        }
        let permits = permits.clone();
        let work = task(p);
        let handle = t.set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (p, work.await)
        });
        t.running.insert(p, handle);
    }
    if newly.count() > 0 {
        coordinator.pause(&newly)?;
    }
    Ok(())
}

/// Commits the finished partitions at their ends; a refused commit is tried again next tick.
fn commit_finished<O, E>(coordinator: &StreamConsumer, config: &TaskConfig, t: &mut Tasks<O, E>) {
    let finished: Vec<i32> = t.uncommitted.iter().copied().collect();
    for p in finished {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&config.topic, p, Offset::Offset(high(config, p)))
            .is_err()
        {
            continue;
        }
        match coordinator.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                t.uncommitted.remove(&p);
                t.done.insert(p);
            }
            Err(e) => warn!(partition = p, error = %e, "cannot mark partition done yet"),
        }
    }
}

/// Whether the group holds `p` committed at its end (or `p` was empty).
fn committed_at_end(coordinator: &StreamConsumer, config: &TaskConfig, p: i32) -> bool {
    all_done_of(coordinator, config, &[p])
}

/// Whether every partition of the run is done: empty in the snapshot, or committed at its end.
fn all_done(coordinator: &StreamConsumer, config: &TaskConfig) -> bool {
    let partitions: Vec<i32> = config
        .ends
        .keys()
        .filter(|(t, _)| *t == config.topic)
        .map(|(_, p)| *p)
        .collect();
    all_done_of(coordinator, config, &partitions)
}

fn all_done_of(coordinator: &StreamConsumer, config: &TaskConfig, partitions: &[i32]) -> bool {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(&config.topic, *p);
    }
    let Ok(committed) = coordinator.committed_offsets(tpl, TIMEOUT) else {
        return false;
    };
    partitions.iter().all(|&p| {
        let (low, end) = config
            .ends
            .get(&(config.topic.clone(), p))
            .copied()
            .unwrap_or((0, 0));
        end <= low
            || committed
                .find_partition(&config.topic, p)
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o >= end))
    })
}
