//! A producer that awaits every delivery and backs off when librdkafka's queue is full.
//!
//! Errors are sorted the way vector's Kafka sink sorts them: a full local queue is
//! back-pressure (wait and enqueue again); a delivery error is final for that record once
//! librdkafka's own retries are spent, and the caller decides what that means.

use std::time::Duration;

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::OwnedHeaders,
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _},
    util::Timeout,
};

use crate::config::KafkaSettings;

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot create producer: {0}")]
    Create(#[source] KafkaError),
    #[error("delivery to {topic} failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("delivery to {topic} was cancelled (producer closed)")]
    Cancelled { topic: String },
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("flush failed: {0}")]
    Flush(#[source] KafkaError),
}

impl ProduceError {
    /// Whether the broker (or librdkafka, before sending) refused the record for its size:
    /// final for that record, never worth another attempt.
    pub fn is_too_large(&self) -> bool {
        matches!(
            self,
            ProduceError::Delivery {
                source: KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
                ),
                ..
            }
        )
    }
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// A cheap-to-clone producer handle.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

/// A record enqueued but not yet acknowledged.
#[must_use = "a delivery is only known once awaited"]
pub struct Pending {
    topic: String,
    future: DeliveryFuture,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// Waits for the broker's acknowledgement.
    pub async fn wait(self) -> Result<Delivered, ProduceError> {
        match self.future.await {
            Ok(Ok(d)) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((source, _))) => Err(ProduceError::Delivery {
                topic: self.topic,
                source,
            }),
            Err(_) => Err(ProduceError::Cancelled { topic: self.topic }),
        }
    }
}

impl Producer {
    /// A producer for the given brokers.
    pub fn new(settings: &KafkaSettings) -> Result<Self, ProduceError> {
        let inner = settings
            .producer_config()
            .create()
            .map_err(ProduceError::Create)?;
        Ok(Producer { inner })
    }

    /// Enqueues a record, waiting (with backoff) while the local queue is full. Returns once
    /// the record is queued; await [`Pending::wait`] for the acknowledgement.
    pub async fn enqueue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<Pending, ProduceError> {
        let mut backoff = Duration::from_millis(1);
        let mut headers = headers;
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(h) = headers.take() {
                record = record.headers(h);
            }
            match self.inner.send_result(record) {
                Ok(future) => {
                    return Ok(Pending {
                        topic: topic.to_string(),
                        future,
                    });
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rejected)) => {
                    headers = rejected.headers;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                Err((source, _)) => {
                    return Err(ProduceError::Delivery {
                        topic: topic.to_string(),
                        source,
                    });
                }
            }
        }
    }

    /// Enqueues a record and waits for its acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<Delivered, ProduceError> {
        self.enqueue(topic, key, payload, headers)
            .await?
            .wait()
            .await
    }

    /// Waits until everything enqueued is acknowledged (or `timeout` passes).
    pub async fn flush(&self, timeout: Duration) -> Result<(), ProduceError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.flush(Timeout::After(timeout)))
            .await
            .map_err(|_| ProduceError::Flush(KafkaError::Canceled))?
            .map_err(ProduceError::Flush)
    }

    /// The underlying rdkafka producer, for metadata calls.
    pub fn raw(&self) -> &FutureProducer {
        &self.inner
    }
}
