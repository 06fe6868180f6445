//! The runtime every processor stands on: the Kafka Streams-style core, kept small.
//!
//! # Layout
//! - [`config`]: the shared configuration (`DATABASE_URL`, `KAFKA_BROKERS`,
//!   `SCHEMA_REGISTRY_URL`, `BILLING_TZ`, ...) as a clap struct with env vars, and the
//!   librdkafka client settings derived from it.
//! - [`producer`]: a producer that awaits every delivery and backs off on a full queue.
//! - [`consumer`]: the consumer loop: decode, hand to a handler under an in-flight cap, store
//!   an offset only once every record before it is done, quarantine what cannot be
//!   processed, optionally stop at the end offsets captured at start (bounded mode), drain on
//!   shutdown.
//! - [`batch`]: the loop's batch mode, for a sink that writes batches in transactions with
//!   their offsets (the bill sink), several partitions' lanes at once.
//! - [`tasks`]: the loop's task mode, for a bounded join over co-partitioned snapshots: one
//!   task per assigned partition, done when committed at its snapshot end (settlement).
//! - [`metrics`]: Prometheus metrics and the health endpoint.
//! - [`quarantine`]: where records go that cannot be processed: the dead-letter topic.
//! - [`admin`]: topic creation from the catalogue.
//! - [`clock`]: the system clock or a simulated one that separate processes agree on.
//! - [`snapshot`]: one partition read from its beginning to an end offset captured earlier.
//! - [`shutdown`]: SIGTERM / ctrl-c as a future.
//! - [`telemetry`]: tracing set-up (text for people, JSON for containers).

pub mod admin;
pub mod batch;
pub mod clock;
pub mod config;
pub mod consumer;
pub mod metrics;
pub mod processor;
pub mod producer;
pub mod quarantine;
pub mod shutdown;
pub mod snapshot;
pub mod tasks;
pub mod telemetry;

pub use clock::Clock;
pub use config::{Backoff, CommonArgs, KafkaSettings};
pub use consumer::{
    HandleError, Handler, Incoming, LoopConfig, LoopDeps, LoopSummary, NOT_BEFORE, StopReason,
    run_consumer,
};
/// The allocator every binary declares (`#[global_allocator] static A: billing_runtime::MiMalloc
/// = billing_runtime::MiMalloc;`): the stages allocate and free millions of small values
/// (decoded records, rows), where glibc's malloc spent a third of the bill sink's CPU.
pub use mimalloc::MiMalloc;
pub use processor::{ConnectError, Processor};
pub use producer::{ProduceError, Producer};
pub use quarantine::Quarantine;
