//! Configuration shared by every binary. Each setting is a flag and an environment variable
//! (shared/CONTRACT.md), validated at start-up.

use std::time::Duration;

use billing_schema::Catalogue;
use chrono_tz::Tz;
use rdkafka::ClientConfig;

/// The settings every processor and the CLI take.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://billing:billing@127.0.0.1:5432/billing"
    )]
    pub database_url: String,
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Confluent-compatible schema registry base URL.
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    /// Business time zone: delivery days, quiet hours and billing months are read in it.
    #[arg(long, env = "BILLING_TZ", default_value = "Asia/Seoul")]
    pub billing_tz: Tz,
    /// Prefix of every topic and subject (empty in production; tests use their own).
    #[arg(long, env = "BILLING_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Partitions of every member-keyed topic. All of them must agree: it is what keeps
    /// members, usage and bills co-partitioned.
    #[arg(long, env = "BILLING_PARTITIONS", default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,
    /// Extra librdkafka properties (`key=value`, comma-separated), e.g. SASL/TLS settings.
    #[arg(long = "kafka-property", env = "KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Where `now` comes from: `system`, or a simulated clock `sim:<start>,<speed>,<anchor ms>`
    /// shared by every process of a demo (see [`crate::clock`]).
    #[arg(long, env = "BILLING_CLOCK", default_value = "system")]
    pub clock: crate::Clock,
    /// Where a processor serves Prometheus `/metrics` and `/health` (port 0: any free port).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9100")]
    pub metrics_addr: std::net::SocketAddr,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    if k.trim().is_empty() {
        return Err(format!("empty property name in {s:?}"));
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

impl CommonArgs {
    /// The Kafka part of the configuration.
    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings {
            brokers: self.kafka_brokers.clone(),
            properties: self.kafka_properties.clone(),
        }
    }

    /// The topic catalogue as this environment names it.
    pub fn catalogue(&self) -> Catalogue {
        Catalogue::new(self.topic_prefix.clone(), self.partitions)
    }
}

/// How to reach the brokers.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// Passed through to librdkafka unchanged (security settings and tuning).
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Settings for brokers at `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            properties: vec![],
        }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A producer configuration: acks from all replicas, batching for throughput. Neither local
    /// broker implements idempotent producers or transactions, so exactly-once effects come
    /// from idempotent sinks and deterministic keys instead.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        // Java's default partitioner: keys land where Kafka Streams and other clients
        // expect them, and every member-keyed topic stays co-partitioned.
        c.set("partitioner", "murmur2_random")
            .set("acks", "all")
            .set("linger.ms", "10")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("message.timeout.ms", "120000");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// A consumer configuration for `group_id`: offsets are stored by the loop only after the
    /// work is durable (`enable.auto.offset.store=false`) and committed from the store.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "30000")
            .set("max.poll.interval.ms", "300000");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// Exponential backoff with a cap, for retriable errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn flags_parse_and_validate() {
        let cli = Cli::try_parse_from([
            "x",
            "--billing-tz",
            "Asia/Seoul",
            "--kafka-property",
            "security.protocol=SASL_SSL,sasl.mechanism=PLAIN",
            "--partitions",
            "4",
        ])
        .unwrap();
        assert_eq!(cli.common.billing_tz, chrono_tz::Asia::Seoul);
        assert_eq!(cli.common.kafka_properties.len(), 2);
        assert_eq!(cli.common.catalogue().partitions, 4);
        assert!(Cli::try_parse_from(["x", "--billing-tz", "Mars/Olympus"]).is_err());
        assert!(Cli::try_parse_from(["x", "--partitions", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--kafka-property", "nokey"]).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let d: Vec<_> = (0..5).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 5, 5]);
    }
}
