//! `billing replay --group G --topic T (--to-earliest | --to-offset N | --to-time T) [--dry-run]`:
//! moves a consumer group's position on a topic, in the manner of Kafka Streams' application
//! reset tool, so the stage re-processes from there. Every sink is idempotent (bills by
//! (member, month), deliveries by bill, dead letters by source), so a replay re-does work
//! without duplicating rows or sends.
//!
//! Both places a position lives are moved: the group's committed offsets in Kafka, and the
//! `consumer_offset` rows of sinks that keep theirs in PostgreSQL with their data (bill-sink).
//! The group must have no running members (Kafka refuses commits from outside an active group,
//! and a running member would overwrite them): stop its processors first.

use std::time::Duration;

use billing_db::schema::consumer_offset;
use billing_runtime::CommonArgs;
use chrono::{DateTime, Utc};
use diesel::ExpressionMethods;
use diesel_async::RunQueryDsl;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
};

use crate::OpsError;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where to move the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Each partition's first retained record.
    Earliest,
    /// The same offset on every partition (clamped to what the partition holds).
    Offset(i64),
    /// The first record at or after this instant on each partition.
    Time(DateTime<Utc>),
}

/// One partition's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub partition: i32,
    /// The committed offset before (none if the group never committed).
    pub from: Option<i64>,
    pub to: i64,
}

/// What a replay did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub group: String,
    pub topic: String,
    pub moves: Vec<Move>,
    /// `consumer_offset` rows moved too.
    pub database_rows: usize,
    pub dry_run: bool,
}

/// Moves `group` on `topic` to `target` (only reports it when `dry_run`).
pub async fn replay(
    common: &CommonArgs,
    group: &str,
    topic: &str,
    target: Target,
    dry_run: bool,
) -> Result<Replay, OpsError> {
    let consumer: BaseConsumer = common.kafka().consumer_config(group).create()?;
    let groups = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    if let Some(g) = groups.groups().iter().find(|g| g.name() == group)
        && !g.members().is_empty()
    {
        return Err(OpsError::Invalid(format!(
            "group {group} has {} running members: stop its processors before a replay",
            g.members().len()
        )));
    }
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(OpsError::NotFound(format!("no topic {topic}")));
    }
    let mut asked = TopicPartitionList::new();
    for p in &partitions {
        asked.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(asked, TIMEOUT)?;
    let by_time = match target {
        Target::Time(t) => {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(topic, *p, Offset::Offset(t.timestamp_millis()))?;
            }
            Some(consumer.offsets_for_times(tpl, TIMEOUT)?)
        }
        _ => None,
    };
    let mut moves = Vec::new();
    let mut commit = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        let to = match target {
            Target::Earliest => low,
            Target::Offset(o) => o.clamp(low, high),
            Target::Time(_) => match by_time
                .as_ref()
                .and_then(|t| t.find_partition(topic, p))
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => high,
            },
        };
        let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        commit.add_partition_offset(topic, p, Offset::Offset(to))?;
        moves.push(Move {
            partition: p,
            from,
            to,
        });
    }
    let mut database_rows = 0;
    if !dry_run {
        consumer.commit(&commit, CommitMode::Sync)?;
        let mut conn = billing_db::connect(&common.database_url).await?;
        for m in &moves {
            database_rows += diesel::update(consumer_offset::table)
                .filter(consumer_offset::group_id.eq(group))
                .filter(consumer_offset::topic.eq(topic))
                .filter(consumer_offset::partition.eq(m.partition))
                .set((
                    consumer_offset::next_offset.eq(m.to),
                    consumer_offset::updated_at.eq(Utc::now()),
                ))
                .execute(&mut conn)
                .await?;
        }
    }
    Ok(Replay {
        group: group.to_string(),
        topic: topic.to_string(),
        moves,
        database_rows,
        dry_run,
    })
}
