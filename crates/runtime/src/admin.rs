//! Topic administration from the catalogue.

use std::time::Duration;

use billing_schema::{Catalogue, Cleanup, TopicSpec};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::{KafkaError, RDKafkaErrorCode},
};

use crate::config::KafkaSettings;

/// Admin operations failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("kafka admin: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot create topic {topic}: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("cannot delete topic {topic}: {code}")]
    Delete {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

fn admin(settings: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    let mut c = settings.producer_config();
    c.remove("partitioner");
    c.create()
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

/// Creates every catalogue topic that does not exist yet (idempotent). Returns the names.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    catalogue: &Catalogue,
) -> Result<Vec<String>, AdminError> {
    ensure(settings, catalogue, &billing_schema::catalogue::ALL).await
}

/// Creates the given topics that do not exist yet (idempotent).
pub async fn ensure(
    settings: &KafkaSettings,
    catalogue: &Catalogue,
    specs: &[TopicSpec],
) -> Result<Vec<String>, AdminError> {
    let client = admin(settings)?;
    let names: Vec<String> = specs.iter().map(|s| catalogue.name(s)).collect();
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&names)
        .map(|(s, name)| {
            let t = NewTopic::new(name, catalogue.partitions(s), TopicReplication::Fixed(1));
            match s.cleanup {
                Cleanup::Compact => t.set("cleanup.policy", "compact"),
                Cleanup::Delete => t.set("cleanup.policy", "delete"),
            }
        })
        .collect();
    for result in client.create_topics(&new, &options()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    Ok(names)
}

/// Deletes the named topics; missing ones are not an error.
pub async fn delete_topics(settings: &KafkaSettings, names: &[String]) -> Result<(), AdminError> {
    if names.is_empty() {
        return Ok(());
    }
    let client = admin(settings)?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for result in client.delete_topics(&refs, &options()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(AdminError::Delete { topic, code }),
        }
    }
    Ok(())
}
