//! The dead-letter recorder: `dead-letters` into the `dead_letter` table.
//!
//! Consumes `dead-letters` (group `dlq`) through the runtime's consumer loop and inserts each
//! letter with its source, stage, reason, attempt history, key and original payload. The
//! table's uniqueness on (source topic, partition, offset, stage) makes a replayed or
//! duplicated letter land once; the offset is stored only after the row is committed.
//! A letter that itself does not decode is quarantined back to `dead-letters` by the loop
//! under stage `dlq`, and recorded from there as a letter of its own.
//!
//! Run: `dlq`, or bounded inside `billing settle`.

use std::{future::Future, sync::Arc};

use billing_db::{PgPool, schema::dead_letter};
use billing_runtime::{
    CommonArgs, HandleError, Handler, Incoming, LoopConfig, LoopSummary, Processor,
    consumer::{LoopDeps, LoopError, run_consumer},
};
use billing_schema::{CodecError, DeadLetter, catalogue::DEAD_LETTERS};
use diesel::ExpressionMethods;
use diesel_async::RunQueryDsl;

/// The processor's name and group id.
pub const NAME: &str = "dlq";

/// The recorder failed to start.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Connect(#[from] billing_runtime::ConnectError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] billing_runtime::ProduceError),
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error(transparent)]
    Loop(#[from] LoopError),
}

/// Inserts letters into `dead_letter`.
pub struct Recorder {
    pool: PgPool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Handler<DeadLetter> for Recorder {
    async fn handle(&self, r: &Incoming<DeadLetter>) -> Result<(), HandleError> {
        let l = &r.value;
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| HandleError::Retriable(e.to_string()))?;
        diesel::insert_into(dead_letter::table)
            .values((
                dead_letter::source_topic.eq(&l.source_topic),
                dead_letter::source_partition.eq(l.source_partition),
                dead_letter::source_offset.eq(l.source_offset),
                dead_letter::stage.eq(&l.stage),
                dead_letter::reason.eq(&l.reason),
                dead_letter::key.eq(&l.key),
                dead_letter::payload.eq(&l.payload),
                dead_letter::attempts.eq(serde_json::json!(l.attempts)),
                dead_letter::created_at
                    .eq(chrono::DateTime::from_timestamp_millis(l.occurred_at).unwrap_or_default()),
            ))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await
            .map_err(|e| HandleError::Retriable(e.to_string()))?;
        Ok(())
    }
}

/// Records letters until `shutdown`, or, when `bounded`, until the letters present at start
/// are recorded.
pub async fn run(
    common: &CommonArgs,
    bounded: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<LoopSummary, DlqError> {
    let p = Processor::connect(common, NAME).await?;
    let topic = p.topic(&DEAD_LETTERS.spec);
    let deps = LoopDeps {
        kafka: common.kafka(),
        decoder: Arc::new(p.decoder(&DEAD_LETTERS.spec)),
        handler: Arc::new(Recorder {
            pool: billing_db::pool(&common.database_url, 8)?,
        }),
        quarantine: p.quarantine.clone(),
    };
    let mut config = LoopConfig::new(p.group(NAME), vec![topic]);
    config.bounded = bounded;
    config.max_in_flight = 64;
    Ok(run_consumer(config, deps, shutdown).await?)
}
