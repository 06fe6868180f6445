//! Confluent wire format over a schema registry.
//!
//! A framed value is `0x00`, the writer schema's registry id (4 bytes, big-endian), then the
//! Avro binary datum. [`Encoder`] registers its schema once and then frames values with no I/O;
//! [`Decoder`] looks each writer id up once (cached), resolves the writer schema against the
//! reader's compiled-in schema (or, when they are the same, deserializes straight into the
//! type with a reader built once per id), and refuses anything that is short, mis-framed, unknown or has
//! bytes left over: a corrupt record is an error value for the caller to quarantine.

use std::{
    collections::HashMap,
    fmt,
    marker::PhantomData,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use apache_avro::{Schema, reader::datum::GenericDatumReader, writer::datum::GenericDatumWriter};
use schema_registry_converter::{
    async_impl::{
        avro::AvroDecoder,
        schema_registry::{SrSettings, post_schema},
    },
    error::SRCError,
    schema_registry_common::{SchemaType, SuppliedSchema},
};

use crate::types::AvroRecord;

/// The Confluent magic byte.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    #[error("payload of {len} bytes is shorter than the {HEADER_LEN}-byte Confluent header")]
    TooShort { len: usize },
    #[error("payload starts with byte {0:#04x}, not the Confluent magic byte 0x00")]
    BadMagic(u8),
    #[error("record has no value (a tombstone) where a value was expected")]
    Missing,
    #[error("schema id {id} is not known to the registry: {reason}")]
    UnknownSchema { id: u32, reason: String },
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    #[error("schema registry refused a schema for subject {subject}: {reason}")]
    Rejected { subject: String, reason: String },
    #[error("avro datum does not match schema {id}: {reason}")]
    Malformed { id: u32, reason: String },
    #[error("avro datum for schema {id} has {extra} bytes left over")]
    TrailingBytes { id: u32, extra: usize },
    #[error("avro encoding failed: {0}")]
    Encode(String),
    #[error("schema id {id} is not registered under {expected}")]
    WrongSubject { id: u32, expected: String },
    #[error("schema id {id} is refused: {reason}")]
    UnsafeSchema { id: u32, reason: String },
}

impl CodecError {
    /// Whether trying again later may succeed (the registry was unreachable). Everything else
    /// is a property of the record itself and must be quarantined, not retried.
    pub fn is_retriable(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }
}

/// Splits a Confluent-framed payload into its schema id and Avro body, checking the length
/// before reading the header.
pub fn split_frame(payload: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if payload.len() < HEADER_LEN {
        return Err(CodecError::TooShort { len: payload.len() });
    }
    if payload[0] != MAGIC {
        return Err(CodecError::BadMagic(payload[0]));
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Ok((id, &payload[HEADER_LEN..]))
}

/// Writes the Confluent header for `id` into `buf`.
pub fn write_header(buf: &mut Vec<u8>, id: u32) {
    buf.push(MAGIC);
    buf.extend_from_slice(&id.to_be_bytes());
}

/// Encodes a value as a bare Avro datum with its own schema (no header).
pub fn encode_datum<T: AvroRecord>(value: &T) -> Result<Vec<u8>, CodecError> {
    let writer = GenericDatumWriter::builder(T::schema())
        .build()
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    writer
        .write_ser_to_vec(value)
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a bare Avro datum written with `writer`, resolved to `T`'s schema.
pub fn decode_datum<T: AvroRecord>(writer: &Schema, body: &[u8]) -> Result<T, CodecError> {
    decode_resolved(0, writer, T::schema(), body)
}

fn decode_resolved<T: AvroRecord>(
    id: u32,
    writer: &Schema,
    reader: &Schema,
    mut body: &[u8],
) -> Result<T, CodecError> {
    let malformed = |e: apache_avro::Error| CodecError::Malformed {
        id,
        reason: e.to_string(),
    };
    let datum_reader = GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .map_err(malformed)?;
    let value = datum_reader.read_value(&mut body).map_err(malformed)?;
    if !body.is_empty() {
        return Err(CodecError::TrailingBytes {
            id,
            extra: body.len(),
        });
    }
    apache_avro::from_value::<T>(&value).map_err(malformed)
}

fn registry_error(e: SRCError) -> CodecError {
    CodecError::RegistryUnavailable(e.to_string())
}

/// A Confluent-compatible schema registry client, shared by encoders and decoders.
#[derive(Clone)]
pub struct Registry {
    url: Arc<str>,
    http: reqwest::Client,
    settings: Arc<SrSettings>,
    /// Id-keyed writer-schema cache; it also de-duplicates concurrent look-ups of one id.
    lookups: Arc<AvroDecoder>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A client for the registry at `url`.
    pub fn new(url: &str) -> Result<Self, CodecError> {
        let settings = SrSettings::new_builder(url.trim_end_matches('/').to_string())
            .set_timeout(Duration::from_secs(10))
            .build()
            .map_err(registry_error)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CodecError::RegistryUnavailable(e.to_string()))?;
        Ok(Registry {
            url: url.trim_end_matches('/').into(),
            http,
            lookups: Arc::new(AvroDecoder::new(settings.clone())),
            settings: Arc::new(settings),
        })
    }

    /// The underlying settings, for schema_registry_converter's other calls.
    pub fn settings(&self) -> &SrSettings {
        &self.settings
    }

    /// Registers `schema_json` under `subject` (idempotent: an identical schema returns its
    /// existing id) and returns the id. An incompatible schema is [`CodecError::Rejected`].
    pub async fn register(&self, subject: &str, schema_json: &str) -> Result<u32, CodecError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema_json.to_string());
        match post_schema(&self.settings, subject.to_string(), supplied).await {
            Ok(registered) => Ok(registered.id),
            Err(e) if e.retriable => Err(registry_error(e)),
            Err(e) => Err(CodecError::Rejected {
                subject: subject.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// The subjects schema `id` is registered under (`GET /schemas/ids/{id}/versions`).
    pub async fn subjects_of(&self, id: u32) -> Result<Vec<String>, CodecError> {
        #[derive(serde::Deserialize)]
        struct Use {
            subject: String,
        }
        let url = format!("{}/schemas/ids/{id}/versions", self.url);
        let unavailable = |e: reqwest::Error| CodecError::RegistryUnavailable(e.to_string());
        let response = self.http.get(&url).send().await.map_err(unavailable)?;
        match response.status() {
            s if s.is_success() => {
                let uses: Vec<Use> = response.json().await.map_err(unavailable)?;
                Ok(uses.into_iter().map(|u| u.subject).collect())
            }
            s if s.is_client_error() => Err(CodecError::UnknownSchema {
                id,
                reason: format!("{s} from {url}"),
            }),
            s => Err(CodecError::RegistryUnavailable(format!("{s} from {url}"))),
        }
    }

    /// The schema registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<Schema, CodecError> {
        match self.lookups.get_schema(id).await {
            Ok(found) => Ok(found.parsed.clone()),
            Err(e) if e.retriable => {
                self.lookups.remove_errors_from_cache();
                Err(registry_error(e))
            }
            Err(e) => Err(CodecError::UnknownSchema {
                id,
                reason: e.error,
            }),
        }
    }
}

/// Frames values of `V` under one registered schema id. Encoding does no I/O.
pub struct Encoder<V> {
    id: u32,
    writer: GenericDatumWriter<'static>,
    _value: PhantomData<fn(&V)>,
}

impl<V> fmt::Debug for Encoder<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<V: AvroRecord> Encoder<V> {
    /// Registers `V`'s schema under `subject` and returns an encoder for it.
    pub async fn register(registry: &Registry, subject: &str) -> Result<Self, CodecError> {
        let id = registry.register(subject, V::SCHEMA_JSON).await?;
        Self::with_id(id)
    }

    /// An encoder for a schema id obtained elsewhere.
    pub fn with_id(id: u32) -> Result<Self, CodecError> {
        let writer = GenericDatumWriter::builder(V::schema())
            .build()
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(Encoder {
            id,
            writer,
            _value: PhantomData,
        })
    }

    /// The registry id every framed value carries.
    pub fn schema_id(&self) -> u32 {
        self.id
    }

    /// Appends the framed value to `buf`.
    pub fn encode_into(&self, value: &V, buf: &mut Vec<u8>) -> Result<(), CodecError> {
        write_header(buf, self.id);
        self.writer
            .write_ser(buf, value)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(())
    }

    /// The framed value.
    pub fn encode(&self, value: &V) -> Result<Vec<u8>, CodecError> {
        let mut buf = Vec::with_capacity(128);
        self.encode_into(value, &mut buf)?;
        Ok(buf)
    }
}

/// A writer schema as the decoder keeps it.
struct WriterSchema {
    /// Leaked once per admitted id and decoder (a few per process: ids registered under the
    /// decoder's subjects), so that `direct` can borrow it for the life of the cache.
    schema: &'static Schema,
    /// When the writer's schema is the reader's (the usual case), a reader built once that
    /// deserializes straight into the type: no intermediate `Value`, no resolution pass, no
    /// name table rebuilt per record. Other writers go through resolution.
    direct: Option<GenericDatumReader<'static>>,
}

impl WriterSchema {
    fn new(schema: Schema, reader: &Schema) -> Result<Self, apache_avro::Error> {
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let direct = if schema.canonical_form() == reader.canonical_form() {
            Some(GenericDatumReader::builder(schema).build()?)
        } else {
            None
        };
        Ok(WriterSchema { schema, direct })
    }

    fn decode<T: AvroRecord>(&self, id: u32, mut body: &[u8]) -> Result<T, CodecError> {
        let Some(direct) = &self.direct else {
            return decode_resolved(id, self.schema, T::schema(), body);
        };
        let value: T = direct
            .read_deser(&mut body)
            .map_err(|e| CodecError::Malformed {
                id,
                reason: e.to_string(),
            })?;
        if !body.is_empty() {
            return Err(CodecError::TrailingBytes {
                id,
                extra: body.len(),
            });
        }
        Ok(value)
    }
}

/// The most one decoded collection, string or byte array may allocate. Records are at most
/// a megabyte, so no honest value comes near it; a forged block count (say, an array of a
/// billion nulls, which costs no bytes on the wire) is refused instead of allocated.
pub const MAX_DECODE_ALLOCATION: usize = 8 * 1024 * 1024;

/// Why a writer schema cannot be decoded safely, whatever the record: a type that contains
/// itself (nesting is bounded only by the record's bytes, so decoding could overflow the
/// stack), or a collection of values that take no bytes on the wire.
pub fn unsafe_schema(schema: &Schema) -> Option<String> {
    fn zero_width(s: &Schema) -> bool {
        match s {
            Schema::Null => true,
            Schema::Record(r) => r.fields.iter().all(|f| zero_width(&f.schema)),
            Schema::Fixed(f) => f.size == 0,
            _ => false,
        }
    }
    fn walk<'a>(s: &'a Schema, path: &mut Vec<&'a apache_avro::schema::Name>) -> Option<String> {
        match s {
            Schema::Ref { name } if path.contains(&name) => {
                Some(format!("type {} contains itself", name.fullname(None)))
            }
            Schema::Record(r) => {
                path.push(&r.name);
                let found = r.fields.iter().find_map(|f| walk(&f.schema, path));
                path.pop();
                found
            }
            Schema::Array(a) if zero_width(&a.items) => {
                Some("an array of zero-width items".to_string())
            }
            Schema::Map(m) if zero_width(&m.types) => {
                Some("a map of zero-width values".to_string())
            }
            Schema::Array(a) => walk(&a.items, path),
            Schema::Map(m) => walk(&m.types, path),
            Schema::Union(u) => u.variants().iter().find_map(|v| walk(v, path)),
            _ => None,
        }
    }
    walk(schema, &mut Vec::new())
}

/// Decodes framed values into `V`, whatever compatible schema they were written with.
///
/// Hostile input stops here: a writer id must be registered under one of the decoder's
/// subjects (the topics it reads), its schema must be [safe](unsafe_schema), and no
/// allocation may exceed [`MAX_DECODE_ALLOCATION`]. Verdicts on registered schemas are cached
/// per id, refusals too, so a flood of forged records costs one registry look-up.
pub struct Decoder<V> {
    registry: Registry,
    /// Subjects a writer id must be registered under; `None` accepts any registered id.
    subjects: Option<Arc<[String]>>,
    writers: RwLock<HashMap<u32, Result<Arc<WriterSchema>, CodecError>>>,
    /// Held while an id is looked up, so that the records in flight when a new id appears
    /// wait for one look-up instead of each making its own (a processor starts with
    /// thousands in flight). It keeps each id's last uncached failure (registry unavailable,
    /// id unknown yet) and when it happened: a record that waited through a failed look-up
    /// gets its answer instead of asking again, so an unreachable registry costs one time-out
    /// per id and moment, not one per record in flight.
    admitting: tokio::sync::Mutex<HashMap<u32, (std::time::Instant, CodecError)>>,
    /// Writer ids looked up in the registry so far (see [`Decoder::admissions`]).
    admissions: AtomicU64,
    _value: PhantomData<fn() -> V>,
}

impl<V> fmt::Debug for Decoder<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl<V: AvroRecord> Decoder<V> {
    /// A decoder resolving writer ids through `registry`, for tools that read any topic.
    pub fn new(registry: Registry) -> Self {
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION);
        Decoder {
            registry,
            subjects: None,
            writers: RwLock::new(HashMap::new()),
            admitting: tokio::sync::Mutex::new(HashMap::new()),
            admissions: AtomicU64::new(0),
            _value: PhantomData,
        }
    }

    /// A decoder for a processor's input: only ids registered under `subjects` are read.
    pub fn for_subjects(registry: Registry, subjects: Vec<String>) -> Self {
        Decoder {
            subjects: Some(subjects.into()),
            ..Self::new(registry)
        }
    }

    /// How many times this decoder has asked the registry about a writer id.
    pub fn admissions(&self) -> u64 {
        self.admissions.load(Ordering::Relaxed)
    }

    async fn admit(&self, id: u32) -> Result<Arc<WriterSchema>, CodecError> {
        self.admissions.fetch_add(1, Ordering::Relaxed);
        if let Some(subjects) = &self.subjects {
            let uses = self.registry.subjects_of(id).await?;
            if !uses.iter().any(|u| subjects.contains(u)) {
                return Err(CodecError::WrongSubject {
                    id,
                    expected: subjects.join(" or "),
                });
            }
        }
        let schema = self.registry.schema_by_id(id).await?;
        if let Some(reason) = unsafe_schema(&schema) {
            return Err(CodecError::UnsafeSchema { id, reason });
        }
        let writer =
            WriterSchema::new(schema, V::schema()).map_err(|e| CodecError::UnsafeSchema {
                id,
                reason: e.to_string(),
            })?;
        Ok(Arc::new(writer))
    }

    fn cached(&self, id: u32) -> Option<Result<Arc<WriterSchema>, CodecError>> {
        self.writers.read().ok().and_then(|m| m.get(&id).cloned())
    }

    async fn writer(&self, id: u32) -> Result<Arc<WriterSchema>, CodecError> {
        if let Some(found) = self.cached(id) {
            return found;
        }
        let asked = std::time::Instant::now();
        let mut failures = self.admitting.lock().await;
        if let Some(found) = self.cached(id) {
            return found;
        }
        if let Some((at, failure)) = failures.get(&id)
            && *at >= asked
        {
            return Err(failure.clone());
        }
        let verdict = self.admit(id).await;
        if let Err(failure) = &verdict {
            if failures.len() >= 1024 {
                failures.clear(); // forged ids by the thousand: keep the map small
            }
            failures.insert(id, (std::time::Instant::now(), failure.clone()));
        }
        // A verdict on a registered schema never changes; an unreachable registry, or an id it
        // does not know yet (a registry replica behind its leader), is asked again next time.
        if !matches!(
            verdict,
            Err(CodecError::RegistryUnavailable(_) | CodecError::UnknownSchema { .. })
        ) && let Ok(mut m) = self.writers.write()
        {
            m.insert(id, verdict.clone());
        }
        verdict
    }

    /// Decodes one framed payload; `None` (a tombstone) is [`CodecError::Missing`].
    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<V, CodecError> {
        let (id, body) = split_frame(payload.ok_or(CodecError::Missing)?)?;
        let writer = self.writer(id).await?;
        writer.decode(id, body)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::types::UsageRecord;

    #[test]
    fn short_and_misframed_payloads_are_errors() {
        assert!(matches!(
            split_frame(&[]),
            Err(CodecError::TooShort { len: 0 })
        ));
        assert!(matches!(
            split_frame(&[0, 0, 0, 1]),
            Err(CodecError::TooShort { len: 4 })
        ));
        assert!(matches!(
            split_frame(&[1, 0, 0, 0, 1]),
            Err(CodecError::BadMagic(1))
        ));
        let (id, body) = split_frame(&[0, 0, 0, 1, 2, 9]).unwrap();
        assert_eq!((id, body), (258, &[9u8][..]));
    }

    #[test]
    fn encoder_frames_with_its_id() {
        let enc = Encoder::<UsageRecord>::with_id(0x0102_0304).unwrap();
        let rec = UsageRecord {
            usage_id: "u".into(),
            member_id: 1,
            product_id: "p".into(),
            quantity: 3,
            billing_month: "2026-11".into(),
            occurred_at: 5,
        };
        let bytes = enc.encode(&rec).unwrap();
        let (id, body) = split_frame(&bytes).unwrap();
        assert_eq!(id, 0x0102_0304);
        assert_eq!(
            decode_datum::<UsageRecord>(UsageRecord::schema(), body).unwrap(),
            rec
        );
    }

    #[test]
    fn truncated_or_padded_bodies_are_errors() {
        let rec = UsageRecord {
            usage_id: "usage".into(),
            member_id: 1,
            product_id: "p".into(),
            quantity: 3,
            billing_month: "2026-11".into(),
            occurred_at: 5,
        };
        let body = encode_datum(&rec).unwrap();
        let cut = &body[..body.len() - 3];
        assert!(decode_datum::<UsageRecord>(UsageRecord::schema(), cut).is_err());
        let mut padded = body.clone();
        padded.push(7);
        assert!(matches!(
            decode_datum::<UsageRecord>(UsageRecord::schema(), &padded),
            Err(CodecError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn recursive_and_zero_width_schemas_are_refused() {
        let list = Schema::parse_str(
            r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
        )
        .unwrap();
        assert!(unsafe_schema(&list).unwrap().contains("contains itself"));
        let nulls = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":{"type":"array","items":"null"}}]}"#,
        )
        .unwrap();
        assert!(unsafe_schema(&nulls).unwrap().contains("zero-width"));
        for schema in [
            UsageRecord::schema(),
            crate::types::Bill::schema(),
            crate::types::DeadLetter::schema(),
        ] {
            assert_eq!(unsafe_schema(schema), None);
        }
    }
}
