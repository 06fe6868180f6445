//! Reading one partition from its beginning up to an end offset captured earlier: the
//! building block of bounded stages (settlement's per-partition tasks, reconcile).

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    message::BorrowedMessage,
};

use crate::{
    config::KafkaSettings,
    consumer::{EndOffsets, end_offsets},
};

/// The (low, high) watermarks of every partition of `topics` now: the snapshot a bounded
/// stage reads up to. `group` only names the client.
pub fn capture(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
) -> Result<EndOffsets, KafkaError> {
    let mut config = kafka.consumer_config(group);
    config.set("enable.auto.commit", "false");
    let probe: StreamConsumer = config.create()?;
    end_offsets(&probe, topics)
}

/// A reader of `topic[partition]`, offsets `[0, end)`, outside any group's assignment.
pub struct PartitionReader {
    consumer: StreamConsumer,
    end: i64,
    finished: bool,
}

impl std::fmt::Debug for PartitionReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReader")
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl PartitionReader {
    /// A reader up to `end` (exclusive); `None` when `[low, end)` is empty. `group` only names
    /// the client: the reader never commits.
    pub fn open(
        kafka: &KafkaSettings,
        group: &str,
        topic: &str,
        partition: i32,
        (low, end): (i64, i64),
    ) -> Result<Option<Self>, KafkaError> {
        if end <= low {
            return Ok(None);
        }
        let mut config = kafka.consumer_config(group);
        config
            .set("enable.auto.commit", "false")
            // One partition at a time: a small prefetch keeps memory flat.
            .set("queued.max.messages.kbytes", "16384");
        let consumer: StreamConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        Ok(Some(PartitionReader {
            consumer,
            end,
            finished: false,
        }))
    }

    /// Opens a reader for `(topic, partition)` with its bounds from `ends` (as captured by
    /// [`crate::consumer::end_offsets`]).
    pub fn open_in(
        kafka: &KafkaSettings,
        group: &str,
        ends: &EndOffsets,
        topic: &str,
        partition: i32,
    ) -> Result<Option<Self>, KafkaError> {
        let bounds = ends
            .get(&(topic.to_string(), partition))
            .copied()
            .unwrap_or((0, 0));
        Self::open(kafka, group, topic, partition, bounds)
    }

    /// The next record below the end, or `None` once the end is reached.
    pub async fn next(&mut self) -> Option<Result<BorrowedMessage<'_>, KafkaError>> {
        if self.finished {
            return None;
        }
        let consumer = &self.consumer;
        match consumer.recv().await {
            Err(e) => Some(Err(e)),
            Ok(m) => {
                self.finished = m.offset() >= self.end - 1;
                (m.offset() < self.end).then_some(Ok(m))
            }
        }
    }
}

/// Reads every record of `topic` present now (the snapshot taken at the call), partition by
/// partition, calling `each` on each record. `group` only names the clients.
pub async fn read_topic<E, F>(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    mut each: F,
) -> Result<(), E>
where
    E: From<KafkaError>,
    F: AsyncFnMut(&BorrowedMessage<'_>) -> Result<(), E>,
{
    let ends = capture(kafka, group, &[topic.to_string()])?;
    let mut partitions: Vec<i32> = ends.keys().map(|(_, p)| *p).collect();
    partitions.sort_unstable();
    for p in partitions {
        let Some(mut reader) = PartitionReader::open_in(kafka, group, &ends, topic, p)? else {
            continue;
        };
        while let Some(m) = reader.next().await {
            each(&m?).await?;
        }
    }
    Ok(())
}
