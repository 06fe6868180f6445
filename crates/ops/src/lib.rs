//! Operator actions: every command of the `billing` CLI is a function here, so the CLI and,
//! later, a web console call the same code.
//!
//! # Layout
//! - [`stack`]: the local stack (PostgreSQL, the nisshi Kafka-API broker, the schema
//!   registry): up (idempotent), down (with purge), status.
//! - [`seed`]: the generator onto the changelog topics.
//! - [`settle`]: settlement, the bill sink and the dead-letter recorder for a month, bounded.
//! - [`demo`]: a whole month end to end on the local stack, with a report.
//! - [`dispatch`]: one dispatch pass at a given instant (the operator's button), and
//!   reservations.
//! - [`reconcile`]: every bill checked against its items, its rules and the usage topic.
//! - [`templates`]: versioned email and SMS templates, validated at activation, previewed
//!   with a real bill.
//! - [`dlq`]: dead letters listed and replayed.
//! - [`replay`]: a consumer group moved back (or forward) on a topic, to re-process.
//! - [`overview`]: where each month stands, and one member's bills and deliveries.
//! - [`audit`]: every operator action recorded (who, what, when, result).
//! - [`topics`]: catalogue topics and their schemas, created and registered together.

pub mod audit;
pub mod delivery;
pub mod demo;
pub mod dispatch;
pub mod dlq;
pub mod operators;
pub mod overview;
pub mod quiet_hours;
pub mod reconcile;
pub mod replay;
pub mod seed;
pub mod settle;
pub mod stack;
pub mod templates;
pub mod topics;

/// An operator action failed; the message is the one line an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0}")]
    Stack(String),
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error(transparent)]
    Codec(#[from] billing_schema::CodecError),
    #[error(transparent)]
    Admin(#[from] billing_runtime::admin::AdminError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Seed(String),
    #[error(transparent)]
    Settlement(#[from] billing_settlement::SettlementError),
    #[error(transparent)]
    Sink(#[from] billing_bill_sink::SinkError),
    #[error(transparent)]
    Dlq(#[from] billing_dlq::DlqError),
    #[error(transparent)]
    Dispatch(#[from] billing_dispatch::DispatchError),
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Produce(#[from] billing_runtime::ProduceError),
}
