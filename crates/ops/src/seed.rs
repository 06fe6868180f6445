//! `billing seed`: the generator's month onto the changelog topics.
//!
//! Members and usage are keyed by member id with the murmur2 partitioner, so a member's usage
//! lands on the same partition number as the member (co-partitioned). Records are produced
//! through a threaded producer whose delivery callback counts acknowledgements per topic; the
//! report's counts are acknowledged records, and any delivery failure fails the seed.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use billing_domain::{BillingMonth, generator::Generator, products};
use billing_runtime::CommonArgs;
use billing_schema::{
    Encoder, Member, Product, Registry, UsageRecord,
    catalogue::{MEMBERS, PRODUCTS, USAGE_RECORDS},
};
use indicatif::ProgressBar;
use rdkafka::{
    ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer},
    util::Timeout,
};

use crate::OpsError;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedOptions {
    pub month: BillingMonth,
    pub members: u64,
    pub seed: u64,
}

/// What was written (acknowledged by the broker).
#[derive(Debug, Clone, PartialEq)]
pub struct SeedReport {
    pub month: BillingMonth,
    pub members: u64,
    pub products: u64,
    pub usage_records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// (topic, records) for each topic written.
    pub topics: Vec<(String, u64)>,
}

impl SeedReport {
    /// Records per second over the whole run.
    pub fn records_per_sec(&self) -> u64 {
        let records = self.members + self.products + self.usage_records;
        let ms = u64::try_from(self.elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        records.saturating_mul(1000) / ms
    }
}

const PRODUCTS_IDX: usize = 0;
const MEMBERS_IDX: usize = 1;
const USAGE_IDX: usize = 2;

/// Counts deliveries per topic from librdkafka's callback thread.
#[derive(Debug, Default)]
struct Counting {
    delivered: [AtomicU64; 3],
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, topic: usize) {
        match result {
            Ok(_) => {
                if let Some(c) = self.delivered.get(topic) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

fn send(
    producer: &ThreadedProducer<Counting>,
    topic: &str,
    idx: usize,
    key: &[u8],
    payload: &[u8],
) -> Result<(), OpsError> {
    loop {
        let record = BaseRecord::with_opaque_to(topic, idx)
            .key(key)
            .payload(payload);
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(OpsError::Kafka(e)),
        }
    }
}

struct Encoders {
    member: Encoder<Member>,
    product: Encoder<Product>,
    usage: Encoder<UsageRecord>,
}

/// Generates `options.members` members, the catalogue and the month's usage onto the topics.
pub async fn seed(
    common: &CommonArgs,
    options: SeedOptions,
    progress: Option<ProgressBar>,
) -> Result<SeedReport, OpsError> {
    if options.members == 0 {
        return Err(OpsError::Seed("--members must be at least 1".into()));
    }
    crate::topics::ensure(common).await?;
    let catalogue = common.catalogue();
    let registry = Registry::new(&common.schema_registry_url)?;
    let encoders = Encoders {
        member: Encoder::register(&registry, &catalogue.value_subject(&MEMBERS.spec)).await?,
        product: Encoder::register(&registry, &catalogue.value_subject(&PRODUCTS.spec)).await?,
        usage: Encoder::register(&registry, &catalogue.value_subject(&USAGE_RECORDS.spec)).await?,
    };
    let topics = [
        catalogue.name(&PRODUCTS.spec),
        catalogue.name(&MEMBERS.spec),
        catalogue.name(&USAGE_RECORDS.spec),
    ];
    let kafka = common.kafka();
    let tz = common.billing_tz;
    let started = Instant::now();
    let report = tokio::task::spawn_blocking(move || -> Result<SeedReport, OpsError> {
        let context = Counting::default();
        let producer: ThreadedProducer<Counting> =
            kafka.producer_config().set("linger.ms", "50").create_with_context(context)?;
        let generator = Generator::new(options.seed, options.month, tz);
        let mut sent = [0u64; 3];
        let mut bytes = 0u64;
        let mut buf = Vec::with_capacity(512);

        for product in products::catalogue(generator.updated_at()) {
            buf.clear();
            encoders.product.encode_into(&product, &mut buf)?;
            send(&producer, &topics[PRODUCTS_IDX], PRODUCTS_IDX, product.product_id.as_bytes(), &buf)?;
            sent[PRODUCTS_IDX] += 1;
            bytes += buf.len() as u64;
        }
        let members = i64::try_from(options.members).map_err(|_| OpsError::Seed("too many members".into()))?;
        for id in 1..=members {
            let key = id.to_string();
            buf.clear();
            encoders.member.encode_into(&generator.member(id), &mut buf)?;
            send(&producer, &topics[MEMBERS_IDX], MEMBERS_IDX, key.as_bytes(), &buf)?;
            sent[MEMBERS_IDX] += 1;
            bytes += buf.len() as u64;
            for usage in generator.usage(id) {
                buf.clear();
                encoders.usage.encode_into(&usage, &mut buf)?;
                send(&producer, &topics[USAGE_IDX], USAGE_IDX, key.as_bytes(), &buf)?;
                sent[USAGE_IDX] += 1;
                bytes += buf.len() as u64;
            }
            if id % 1000 == 0
                && let Some(p) = &progress {
                    p.inc(1000);
                }
        }
        producer.flush(Timeout::After(Duration::from_secs(300)))?;
        if let Some(p) = &progress {
            p.finish();
        }
        let ctx = producer.context();
        let failed = ctx.failed.load(Ordering::Relaxed);
        let delivered: Vec<u64> = ctx.delivered.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        if failed > 0 || delivered != sent {
            let first = ctx.first_error.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
            return Err(OpsError::Seed(format!(
                "{failed} records were not acknowledged (sent {sent:?}, acknowledged {delivered:?}): {first}"
            )));
        }
        Ok(SeedReport {
            month: options.month,
            members: sent[MEMBERS_IDX],
            products: sent[PRODUCTS_IDX],
            usage_records: sent[USAGE_IDX],
            bytes,
            elapsed: started.elapsed(),
            topics: topics.iter().cloned().zip(sent).collect(),
        })
    })
    .await
    .map_err(|e| OpsError::Seed(format!("seed task failed: {e}")))??;
    tracing::info!(
        month = %report.month,
        members = report.members,
        usage_records = report.usage_records,
        elapsed_ms = u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
        records_per_sec = report.records_per_sec(),
        "seed complete"
    );
    Ok(report)
}

/// A shared handle for tests and the CLI to build a progress bar of the right length.
pub fn progress_bar(members: u64) -> ProgressBar {
    let bar = ProgressBar::new(members);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} seeding [{bar:40}] {pos}/{len} members ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
