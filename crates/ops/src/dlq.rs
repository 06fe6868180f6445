//! `billing dlq list|replay`: what could not be processed or delivered, and sending it again.
//! A replay produces the letter's original key and payload to its source topic (a quarantined
//! record to where it came from; an undeliverable bill to the SMS channel with its attempts
//! reset) and marks the letter `replayed_at`. The processors are idempotent, so replaying a
//! letter twice, or one whose bill was delivered meanwhile, sends nothing twice.

use billing_db::schema::dead_letter;
use billing_runtime::{CommonArgs, Producer};
use billing_schema::{Decoder, Registry, SmsRequest, catalogue::DEAD_LETTERS};

/// The stage of a dead letter for a bill undeliverable on every channel (the SMS channel's).
pub const UNDELIVERABLE: &str = "undeliverable";
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, QueryDsl, Queryable, Selectable, SelectableHelper};
use diesel_async::RunQueryDsl;

use crate::OpsError;

/// A recorded dead letter.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = dead_letter)]
pub struct Letter {
    pub id: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub reason: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub attempts: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Which letters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this stage (`email`, `sms`, `undeliverable`, `bill-sink`, ...).
    pub stage: Option<String>,
    /// Replayed ones too.
    pub include_replayed: bool,
    /// Only letters recorded at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Only letters recorded before this instant.
    pub until: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// Letters, newest first.
pub async fn list(common: &CommonArgs, filter: &Filter) -> Result<Vec<Letter>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let mut q = dead_letter::table
        .select(Letter::as_select())
        .order(dead_letter::id.desc())
        .limit(filter.limit.max(1))
        .into_boxed();
    if let Some(s) = &filter.stage {
        q = q.filter(dead_letter::stage.eq(s.clone()));
    }
    if !filter.include_replayed {
        q = q.filter(dead_letter::replayed_at.is_null());
    }
    if let Some(t) = filter.since {
        q = q.filter(dead_letter::created_at.ge(t));
    }
    if let Some(t) = filter.until {
        q = q.filter(dead_letter::created_at.lt(t));
    }
    Ok(q.load(&mut conn).await?)
}

/// Letter `id`.
pub async fn one(common: &CommonArgs, id: i64) -> Result<Letter, OpsError> {
    use diesel::OptionalExtension;
    let mut conn = billing_db::connect(&common.database_url).await?;
    dead_letter::table
        .select(Letter::as_select())
        .filter(dead_letter::id.eq(id))
        .first(&mut conn)
        .await
        .optional()?
        .ok_or_else(|| OpsError::NotFound(format!("no dead letter {id}")))
}

/// Replays the letters `ids` (every letter not yet replayed when empty, up to `limit`):
/// returns the ids replayed. A letter without a payload cannot be replayed and is refused.
pub async fn replay(common: &CommonArgs, ids: &[i64], limit: i64) -> Result<Vec<i64>, OpsError> {
    let mut conn = billing_db::connect(&common.database_url).await?;
    let mut q = dead_letter::table
        .select(Letter::as_select())
        .order(dead_letter::id)
        .into_boxed();
    if ids.is_empty() {
        q = q
            .filter(dead_letter::replayed_at.is_null())
            .limit(limit.max(1));
    } else {
        q = q.filter(dead_letter::id.eq_any(ids.to_vec()));
    }
    let letters: Vec<Letter> = q.load(&mut conn).await?;
    if let Some(missing) = ids.iter().find(|id| !letters.iter().any(|l| l.id == **id)) {
        return Err(OpsError::NotFound(format!("no dead letter {missing}")));
    }
    if let Some(l) = letters.iter().find(|l| l.payload.is_none()) {
        return Err(OpsError::Invalid(format!(
            "dead letter {} has no payload to replay",
            l.id
        )));
    }
    // A letter names its own source topic, and letters can be forged: replay only to this
    // deployment's input topics, never to an arbitrary (or the dead-letter) topic.
    let catalogue = common.catalogue();
    if let Some(l) = letters.iter().find(|l| {
        catalogue
            .spec_of(&l.source_topic)
            .is_none_or(|s| s.name == DEAD_LETTERS.spec.name)
    }) {
        return Err(OpsError::Invalid(format!(
            "dead letter {} names topic {:?}, which is not an input topic of this deployment",
            l.id, l.source_topic
        )));
    }
    let producer = Producer::new(&common.kafka())?;
    let registry = Registry::new(&common.schema_registry_url)?;
    let sms_decoder = Decoder::<SmsRequest>::new(registry);
    let mut done = Vec::new();
    for l in &letters {
        // An undeliverable bill is sent again from the SMS channel's first attempt: its SMS
        // delivery is reopened, or that channel's claim would find the chain already ended.
        if l.stage == UNDELIVERABLE {
            let request = sms_decoder.decode(l.payload.as_deref()).await?;
            diesel::sql_query(
                "update delivery set status = 'queued', attempts = 0, handover = null, updated_at = now()
                 where bill_id = $1 and channel = 'sms' and status in ('dead', 'unknown')",
            )
            .bind::<diesel::sql_types::BigInt, _>(request.bill_id)
            .execute(&mut conn)
            .await?;
        }
        producer
            .send(
                &l.source_topic,
                l.key.as_deref(),
                l.payload.as_deref(),
                None,
            )
            .await?;
        diesel::update(dead_letter::table.filter(dead_letter::id.eq(l.id)))
            .set(dead_letter::replayed_at.eq(Utc::now()))
            .execute(&mut conn)
            .await?;
        done.push(l.id);
    }
    Ok(done)
}

/// A letter's payload as JSON for people: the writer schema named by its Confluent frame,
/// fetched from the registry and checked like every decoder's (no self-containing types, no
/// allocation past [`billing_schema::codec::MAX_DECODE_ALLOCATION`]). `Err` says why it cannot
/// be shown (a hostile record often cannot).
pub async fn payload_json(
    common: &CommonArgs,
    letter: &Letter,
) -> Result<serde_json::Value, String> {
    use billing_schema::codec::{MAX_DECODE_ALLOCATION, split_frame, unsafe_schema};
    let payload = letter
        .payload
        .as_deref()
        .ok_or("no payload (a tombstone)")?;
    let (id, mut body) = split_frame(payload).map_err(|e| e.to_string())?;
    let registry = Registry::new(&common.schema_registry_url).map_err(|e| e.to_string())?;
    let schema = registry.schema_by_id(id).await.map_err(|e| e.to_string())?;
    if let Some(why) = unsafe_schema(&schema) {
        return Err(format!("schema {id} is not decoded: {why}"));
    }
    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .map_err(|e| e.to_string())?;
    let value = reader.read_value(&mut body).map_err(|e| e.to_string())?;
    serde_json::Value::try_from(value).map_err(|e| e.to_string())
}
