//! Gateways: where a rendered message leaves the platform. Each channel has its trait
//! ([`MailGateway`], [`SmsGateway`]), so a processor is tested against what it would have sent.
//!
//! Every message carries an idempotency key (the delivery id and channel). A provider that
//! honours it (as the simulated one does) delivers a key once however often it is submitted,
//! which is what closes the one window the platform cannot close itself: a process killed
//! after the provider accepted a message but before the `delivery` row recorded it.

use std::{
    collections::HashSet,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use billing_db::PgPool;
use diesel::sql_types::{Array, Text};
use diesel_async::RunQueryDsl;

use crate::batch::Batcher;

/// A send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// May succeed later: retried with backoff.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed on this channel (an undeliverable address): no retries.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// An email, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Delivered at most once per key.
    pub idempotency_key: String,
    pub to: String,
    pub subject: String,
    pub html: String,
    /// 0 for the first attempt (the simulation draws its failures per attempt).
    pub attempt: u32,
}

/// A text message, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sms {
    pub idempotency_key: String,
    pub to: String,
    pub text: String,
    pub attempt: u32,
}

/// Sends email.
pub trait MailGateway: Send + Sync + 'static {
    /// Submits one email; returns once the provider accepted or refused it.
    fn send(&self, mail: &Mail) -> impl Future<Output = Result<(), SendError>> + Send;

    /// What to do when a sender died before this provider's answer was recorded: hold for an
    /// operator unless the provider de-duplicates by idempotency key.
    fn unknown_outcome(&self) -> UnknownOutcome {
        UnknownOutcome::Hold
    }
}

/// Sends SMS.
pub trait SmsGateway: Send + Sync + 'static {
    /// Submits one text message; returns once the provider accepted or refused it.
    fn send(&self, sms: &Sms) -> impl Future<Output = Result<(), SendError>> + Send;

    /// As [`MailGateway::unknown_outcome`].
    fn unknown_outcome(&self) -> UnknownOutcome {
        UnknownOutcome::Hold
    }
}

/// What a channel does with a delivery whose process died after claiming it, before the
/// provider's answer was recorded: the message may or may not have gone out. A property of
/// the provider, so each gateway states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOutcome {
    /// Send again once the claim's lease runs out (at least once): for providers that
    /// de-duplicate by idempotency key, so the second submission is not a second message.
    Resend,
    /// Mark the delivery `unknown` and quarantine the request for an operator (at most
    /// once): for providers without idempotency keys, such as SMTP.
    Hold,
}

/// How the simulated gateway behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulationArgs {
    /// Latency of every send, in milliseconds.
    #[arg(
        long = "gateway-latency-ms",
        env = "GATEWAY_LATENCY_MS",
        default_value_t = 1000
    )]
    pub latency_ms: u64,
    /// Share of attempts that fail transiently (0 to 1).
    #[arg(long = "gateway-failure-rate", env = "GATEWAY_FAILURE_RATE", default_value_t = 0.01, value_parser = parse_rate)]
    pub failure_rate: f64,
    /// Seed of the failure draws: the same seed fails the same attempts.
    #[arg(long = "gateway-seed", env = "GATEWAY_SEED", default_value_t = 7)]
    pub seed: u64,
    /// Where accepted messages are recorded: `memory` (this process only) or `postgres`
    /// (the `gateway_mailbox` table, which survives restarts; tests and demos).
    #[arg(long = "gateway-mailbox", env = "GATEWAY_MAILBOX", default_value = "memory", value_parser = ["memory", "postgres"])]
    pub mailbox: String,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("a rate is between 0 and 1, got {r}"))
    }
}

/// Where the simulation keeps the keys it accepted.
#[derive(Debug, Clone)]
enum Mailbox {
    Memory(Arc<Mutex<HashSet<String>>>),
    /// Accepted keys in `gateway_mailbox`, written in batches.
    Postgres(Batcher<(String, String), ()>),
}

/// A provider with a latency, a failure rate and idempotency keys. Email addresses at the
/// reserved `.invalid` top-level domain (RFC 2606) are undeliverable: a permanent failure.
#[derive(Debug, Clone)]
pub struct SimulatedGateway {
    channel: &'static str,
    latency: Duration,
    failure_rate: f64,
    seed: u64,
    mailbox: Mailbox,
}

impl SimulatedGateway {
    /// A simulated gateway for `channel` (`email`, `sms`); `pool` is needed for the postgres
    /// mailbox.
    pub fn new(
        channel: &'static str,
        args: &SimulationArgs,
        pool: Option<PgPool>,
    ) -> Result<Self, String> {
        let mailbox = match (args.mailbox.as_str(), pool) {
            ("postgres", Some(pool)) => Mailbox::Postgres(mailbox_writer(channel, pool)),
            ("postgres", None) => return Err("the postgres mailbox needs a database".into()),
            _ => Mailbox::Memory(Arc::default()),
        };
        Ok(SimulatedGateway {
            channel,
            latency: Duration::from_millis(args.latency_ms),
            failure_rate: args.failure_rate,
            seed: args.seed,
            mailbox,
        })
    }

    /// Whether the draw for (`key`, `attempt`) fails: deterministic for a seed, so a test can
    /// tell each bill's outcome in advance, kills or not.
    pub fn fails(&self, key: &str, attempt: u32) -> bool {
        let mut h = DefaultHasher::new();
        (self.seed, key, attempt).hash(&mut h);
        #[allow(clippy::cast_precision_loss)] // a uniform draw in [0, 1) needs no more bits
        let draw = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
        draw < self.failure_rate
    }

    /// What a run without faults leaves in `delivery` for bill `bill_id` with `attempts` per
    /// channel: (channel, status, attempts) per channel tried, email first, by this
    /// simulation's draws. The oracle of the kill tests and `scripts/chaos`.
    pub fn calm_history(
        &self,
        bill_id: i64,
        undeliverable_email: bool,
        attempts: i32,
    ) -> Vec<(String, String, i32)> {
        let first_success = |channel: &str| {
            (0..attempts).find(|a| !self.fails(&format!("{channel}-{bill_id}"), a.unsigned_abs()))
        };
        let mut rows = Vec::new();
        match (undeliverable_email, first_success("email")) {
            (false, Some(a)) => return vec![("email".into(), "sent".into(), a + 1)],
            (true, _) => rows.push(("email".into(), "failed".into(), 1)),
            (false, None) => rows.push(("email".into(), "failed".into(), attempts)),
        }
        match first_success("sms") {
            Some(a) => rows.push(("sms".into(), "sent".into(), a + 1)),
            None => rows.push(("sms".into(), "dead".into(), attempts)),
        }
        rows
    }

    async fn submit(&self, key: &str, to: &str, attempt: u32) -> Result<(), SendError> {
        tokio::time::sleep(self.latency).await;
        if to.ends_with(".invalid") {
            return Err(SendError::Permanent(format!(
                "{}: recipient domain does not exist",
                self.channel
            )));
        }
        if self.fails(key, attempt) {
            return Err(SendError::Transient(format!(
                "{}: gateway unavailable (simulated)",
                self.channel
            )));
        }
        match &self.mailbox {
            Mailbox::Memory(keys) => {
                keys.lock()
                    .map_err(|_| SendError::Transient("mailbox poisoned".into()))?
                    .insert(key.to_string());
            }
            Mailbox::Postgres(writer) => writer
                .call((key.to_string(), to.to_string()))
                .await
                .map_err(|e| SendError::Transient(format!("mailbox: {e}")))?,
        }
        Ok(())
    }
}

/// How long the simulated provider keeps trying to record an acceptance while its database
/// is unreachable. The provider stands for another company's system: an outage of *our*
/// PostgreSQL (where the simulation happens to keep its mailbox) must not look like a
/// provider failure, or a fault-injection run's attempts would differ from a calm run's.
const MAILBOX_PATIENCE: Duration = Duration::from_secs(60);

fn mailbox_writer(channel: &'static str, pool: PgPool) -> Batcher<(String, String), ()> {
    Batcher::spawn(
        "gateway-mailbox",
        2,
        2000,
        move |batch: Vec<(String, String)>| {
            let pool = pool.clone();
            async move {
                let (keys, addresses): (Vec<String>, Vec<String>) = batch.iter().cloned().unzip();
                let started = std::time::Instant::now();
                loop {
                    match record_accepted(&pool, channel, &keys, &addresses).await {
                        Ok(()) => return Ok(vec![(); batch.len()]),
                        Err(e) if started.elapsed() > MAILBOX_PATIENCE => return Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                }
            }
        },
    )
}

async fn record_accepted(
    pool: &PgPool,
    channel: &str,
    keys: &[String],
    addresses: &[String],
) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query(
        "insert into gateway_mailbox (channel, idempotency_key, address)
         select $1, k, a from unnest($2::text[], $3::text[]) as t(k, a)
         on conflict (channel, idempotency_key)
         do update set resubmissions = gateway_mailbox.resubmissions + 1",
    )
    .bind::<Text, _>(channel)
    .bind::<Array<Text>, _>(keys)
    .bind::<Array<Text>, _>(addresses)
    .execute(&mut conn)
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

impl MailGateway for SimulatedGateway {
    async fn send(&self, mail: &Mail) -> Result<(), SendError> {
        self.submit(&mail.idempotency_key, &mail.to, mail.attempt)
            .await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        UnknownOutcome::Resend
    }
}

impl SmsGateway for SimulatedGateway {
    async fn send(&self, sms: &Sms) -> Result<(), SendError> {
        self.submit(&sms.idempotency_key, &sms.to, sms.attempt)
            .await
    }

    fn unknown_outcome(&self) -> UnknownOutcome {
        UnknownOutcome::Resend
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(rate: f64) -> SimulationArgs {
        SimulationArgs {
            latency_ms: 0,
            failure_rate: rate,
            seed: 1,
            mailbox: "memory".into(),
        }
    }

    #[tokio::test]
    async fn failures_follow_the_rate_and_the_seed() {
        let g = SimulatedGateway::new("email", &args(0.1), None).unwrap();
        let failed = (0..10_000)
            .filter(|i| g.fails(&format!("email-{i}"), 0))
            .count();
        assert!((800..1200).contains(&failed), "{failed}");
        let again = SimulatedGateway::new("email", &args(0.1), None).unwrap();
        assert!((0..100).all(|i| g.fails(&i.to_string(), 1) == again.fails(&i.to_string(), 1)));
        let mail = Mail {
            idempotency_key: "k".into(),
            to: "x@bounce.invalid".into(),
            subject: String::new(),
            html: String::new(),
            attempt: 0,
        };
        assert!(matches!(
            MailGateway::send(&g, &mail).await,
            Err(SendError::Permanent(_))
        ));
        assert!(SimulatedGateway::new("email", &args(0.0), None).is_ok());
    }
}
