//! What every processor starts from: one constructor for its registry client, producer,
//! quarantine (dead letters under its stage) and consumer groups, so the topic prefix and the
//! dead-letter plumbing are applied in one place rather than once per processor.

use std::sync::Arc;

use billing_schema::{
    AvroRecord, Catalogue, CodecError, DeadLetter, Decoder, Encoder, Registry, TopicSpec,
    catalogue::DEAD_LETTERS,
};

use crate::{CommonArgs, ProduceError, Producer, Quarantine};

/// A processor's connections to the platform.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // the registry client and producer have none
pub struct Processor {
    /// Its name: the stage on its dead letters.
    pub name: &'static str,
    pub catalogue: Catalogue,
    pub registry: Registry,
    pub producer: Producer,
    pub quarantine: Quarantine,
    prefix: String,
}

/// A processor could not reach the registry or create its producer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
}

impl Processor {
    /// Connects processor `name`: registers the dead-letter schema and builds its quarantine.
    pub async fn connect(common: &CommonArgs, name: &'static str) -> Result<Self, ConnectError> {
        let catalogue = common.catalogue();
        let registry = Registry::new(&common.schema_registry_url)?;
        let producer = Producer::new(&common.kafka())?;
        let subject = catalogue.value_subject(&DEAD_LETTERS.spec);
        let letters = Encoder::<DeadLetter>::register(&registry, &subject).await?;
        let quarantine = Quarantine::new(
            producer.clone(),
            catalogue.name(&DEAD_LETTERS.spec),
            name,
            Arc::new(letters),
        );
        Ok(Processor {
            name,
            catalogue,
            registry,
            producer,
            quarantine,
            prefix: common.topic_prefix.clone(),
        })
    }

    /// The consumer group `base` of this deployment: the topic prefix applied.
    pub fn group(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// This deployment's name of a catalogue topic.
    pub fn topic(&self, spec: &TopicSpec) -> String {
        self.catalogue.name(spec)
    }

    /// A decoder of `spec`'s values that admits only schemas registered under its subject.
    pub fn decoder<V: AvroRecord>(&self, spec: &TopicSpec) -> Decoder<V> {
        Decoder::for_subjects(
            self.registry.clone(),
            vec![self.catalogue.value_subject(spec)],
        )
    }

    /// An encoder of `spec`'s values, its schema registered under the topic's subject.
    pub async fn encoder<V: AvroRecord>(&self, spec: &TopicSpec) -> Result<Encoder<V>, CodecError> {
        Encoder::register(&self.registry, &self.catalogue.value_subject(spec)).await
    }
}
