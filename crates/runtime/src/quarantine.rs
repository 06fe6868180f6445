//! Quarantine: a record that cannot be processed goes to the dead-letter topic with the
//! reason, its origin and its original bytes, and the loop moves on. Nothing is dropped
//! silently: the offset of a quarantined record is stored only after the dead letter is
//! acknowledged.

use std::sync::Arc;

use billing_schema::{DeadLetter, Encoder};
use rdkafka::message::{Header, OwnedHeaders};

use crate::producer::{ProduceError, Producer};

/// Header names on dead-letter records (Kafka Connect's convention, under our own prefix).
pub mod headers {
    pub const REASON: &str = "billing.dlq.reason";
    pub const STAGE: &str = "billing.dlq.stage";
    pub const SOURCE_TOPIC: &str = "billing.dlq.source.topic";
    pub const SOURCE_PARTITION: &str = "billing.dlq.source.partition";
    pub const SOURCE_OFFSET: &str = "billing.dlq.source.offset";
}

/// Where a failed record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Sends dead letters for one processing stage.
#[derive(Debug, Clone)]
pub struct Quarantine {
    producer: Producer,
    topic: String,
    stage: String,
    encoder: Arc<Encoder<DeadLetter>>,
}

impl Quarantine {
    /// Dead letters of `stage` go to `topic`, framed by `encoder`.
    pub fn new(
        producer: Producer,
        topic: String,
        stage: impl Into<String>,
        encoder: Arc<Encoder<DeadLetter>>,
    ) -> Self {
        Quarantine {
            producer,
            topic,
            stage: stage.into(),
            encoder,
        }
    }

    /// The stage name recorded on every dead letter.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// Writes one dead letter and waits for the broker to acknowledge it. A letter too large
    /// for the topic (a payload near the broker's limit) is written again without the payload,
    /// its reason saying so: the letter still names the source record, which stays on its
    /// topic, so nothing is lost and nothing is retried forever.
    pub async fn send(
        &self,
        origin: &Origin,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        reason: &str,
        attempts: Vec<String>,
        now_ms: i64,
    ) -> Result<(), ProduceError> {
        match self
            .write(origin, key, payload, reason, attempts.clone(), now_ms)
            .await
        {
            Err(e) if e.is_too_large() => {
                let len = payload.map_or(0, <[u8]>::len);
                let reason = format!(
                    "{reason} (payload of {len} bytes left out: too large for the dead-letter topic; read it at the source offset)"
                );
                self.write(origin, None, None, &reason, attempts, now_ms)
                    .await
            }
            other => other,
        }
    }

    async fn write(
        &self,
        origin: &Origin,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        reason: &str,
        attempts: Vec<String>,
        now_ms: i64,
    ) -> Result<(), ProduceError> {
        // Reasons quote record text (decoder messages, keys): short, and storable as text.
        let cleaned = reason.replace('\0', "\u{fffd}");
        let reason = clip(&cleaned, 2000);
        let letter = DeadLetter {
            source_topic: origin.topic.clone(),
            source_partition: origin.partition,
            source_offset: origin.offset,
            stage: self.stage.clone(),
            reason: reason.to_string(),
            key: key.map(<[u8]>::to_vec),
            payload: payload.map(<[u8]>::to_vec),
            attempts,
            occurred_at: now_ms,
        };
        let value = self
            .encoder
            .encode(&letter)
            .map_err(|e| ProduceError::Encode(e.to_string()))?;
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let hdrs = OwnedHeaders::new()
            .insert(Header {
                key: headers::REASON,
                value: Some(reason),
            })
            .insert(Header {
                key: headers::STAGE,
                value: Some(self.stage.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(origin.topic.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(offset.as_str()),
            });
        self.producer
            .send(
                &self.topic,
                Some(origin.topic.as_bytes()),
                Some(&value),
                Some(hdrs),
            )
            .await?;
        tracing::warn!(stage = %self.stage, topic = %origin.topic, partition = origin.partition, offset = origin.offset, reason, "record quarantined");
        Ok(())
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
