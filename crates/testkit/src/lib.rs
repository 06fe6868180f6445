//! Integration-test helpers over the real stack (`billing stack up`, as `scripts/test` does).
//!
//! Each test gets its own topic prefix (so its own topics and schema subjects), its own
//! consumer groups and, when it needs one, its own PostgreSQL schema with the migrations
//! applied: tests share one broker, registry and server without meeting. A missing stack is
//! a loud failure, never a skipped test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, time::Duration};

use billing_runtime::{CommonArgs, KafkaSettings, admin};
use billing_schema::{Catalogue, Registry, TopicSpec, catalogue::ALL};
use diesel_async::SimpleAsyncConnection;
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
};

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test, which starts the stack (billing stack up)")
    })
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// One test's isolated view of the stack.
#[derive(Debug, Clone)]
pub struct TestEnv {
    pub common: CommonArgs,
    pub registry: Registry,
}

/// A record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl TestEnv {
    /// A fresh prefix with every catalogue topic created (3 partitions each, unless `partitions`).
    pub async fn new() -> TestEnv {
        Self::with_partitions(3).await
    }

    /// As [`TestEnv::new`] with a given shared partition count.
    pub async fn with_partitions(partitions: i32) -> TestEnv {
        let common = CommonArgs {
            database_url: required("DATABASE_URL"),
            kafka_brokers: required("KAFKA_BROKERS"),
            schema_registry_url: required("SCHEMA_REGISTRY_URL"),
            billing_tz: std::env::var("BILLING_TZ")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(chrono_tz::Asia::Seoul),
            topic_prefix: format!("t{}.", short_id()),
            clock: billing_runtime::Clock::System,
            metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            partitions,
            kafka_properties: vec![],
        };
        admin::ensure_topics(&common.kafka(), &common.catalogue())
            .await
            .expect("create test topics");
        let registry = Registry::new(&common.schema_registry_url).expect("registry client");
        TestEnv { common, registry }
    }

    pub fn catalogue(&self) -> Catalogue {
        self.common.catalogue()
    }

    pub fn kafka(&self) -> KafkaSettings {
        self.common.kafka()
    }

    /// The full name of a catalogue topic.
    pub fn topic(&self, spec: &TopicSpec) -> String {
        self.catalogue().name(spec)
    }

    /// A consumer group private to this test.
    pub fn group(&self, name: &str) -> String {
        format!("{}{name}", self.common.topic_prefix)
    }

    /// Every catalogue topic's full name.
    pub fn all_topics(&self) -> Vec<String> {
        ALL.iter().map(|s| self.topic(s)).collect()
    }

    /// A PostgreSQL schema private to this test, migrated; returns its connection URL.
    pub async fn database(&self) -> String {
        let schema = format!("t_{}", short_id());
        let mut conn = billing_db::connect(&self.common.database_url)
            .await
            .expect("connect to PostgreSQL");
        conn.batch_execute(&format!("create schema {schema}"))
            .await
            .expect("create test schema");
        let url = billing_db::with_search_path(&self.common.database_url, &schema);
        billing_db::migrate(&url)
            .await
            .expect("migrate test schema");
        url
    }

    /// Records in `topic` (sum over partitions of high minus low watermark).
    pub async fn record_count(&self, topic: &str) -> u64 {
        let consumer = self.reader();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let marks =
                billing_runtime::consumer::end_offsets(&consumer, &[topic]).expect("watermarks");
            marks
                .values()
                .map(|(low, high)| u64::try_from(high - low).unwrap_or(0))
                .sum()
        })
        .await
        .unwrap()
    }

    fn reader(&self) -> StreamConsumer {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.common.kafka_brokers)
            .set("group.id", self.group(&format!("reader-{}", short_id())))
            .set("enable.auto.commit", "false");
        c.create().expect("reader")
    }

    /// Reads `topic` from the beginning until `count` records arrived or `timeout` passed.
    pub async fn read(&self, topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
        let consumer = self.reader();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < count {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => panic!("read {topic}: {e}"),
                Ok(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    (
                                        x.key.to_string(),
                                        String::from_utf8_lossy(x.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(Consumed {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers,
                    });
                }
            }
        }
        out
    }

    /// The group's committed offsets for `topic`, by partition.
    pub async fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.common.kafka_brokers)
            .set("group.id", group);
        let consumer: StreamConsumer = c.create().expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}

/// An instant given in Korea's local time (UTC+9), e.g. `kst("2026-11-24T09:00:00")`.
pub fn kst(local: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(&format!("{local}+09:00"))
        .expect("a local time like 2026-11-24T09:00:00")
        .with_timezone(&chrono::Utc)
}

/// The one number `sql` selects as `n` (e.g. `select count(*)::bigint as n from bill`) on the
/// database at `url`.
pub async fn count(url: &str, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = billing_db::connect(url)
        .await
        .expect("connect to PostgreSQL");
    let rows: Vec<N> = diesel::sql_query(sql)
        .load(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.as_slice()
        .first()
        .map_or_else(|| panic!("{sql}: no row"), |r| r.n)
}
