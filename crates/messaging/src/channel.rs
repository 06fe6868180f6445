//! A delivery channel's processor, written once for every channel.
//!
//! Consumes the channel's request topic and its retry topics (group: the channel's name), and
//! for each request:
//! 1. looks the bill, its member (and, for email, its items) up through the batching loader;
//!    an unknown bill is quarantined with the reason;
//! 2. skips a bill already delivered on any channel (a repeat, a replay, a race);
//! 3. waits while the system quiet hours or the member's do-not-disturb window hold, by the
//!    injected clock ([`HandleError::Defer`]: the offset does not move);
//! 4. renders the active template and sends through the channel's gateway, with the delivery
//!    id as idempotency key;
//! 5. records the outcome in `delivery` (batched) before the offset may move: `sent`; or, on
//!    a transient failure with attempts left, the request goes to the retry topic of its
//!    attempt with a `not-before` header (exponential backoff) and the delivery is `failed`
//!    with its attempt count; or, on a permanent failure or the last attempt, the channel
//!    gives up: email hands the bill to SMS, SMS to the dead-letter topic.
//!
//! Guarantee: a bill is delivered at most once per idempotency key at the gateway and recorded
//! `sent` once (`delivery_sent_once`); every request ends `sent`, handed over, or dead.

use std::{future::Future, sync::Arc, time::Duration};

use billing_db::PgPool;
use billing_runtime::{
    Backoff, Clock, CommonArgs, HandleError, Handler, Incoming, LoopConfig, LoopDeps, LoopSummary,
    NOT_BEFORE, Processor, Producer, metrics::Counter, run_consumer,
};
use billing_schema::{
    AvroRecord, CodecError, Decoder, Encoder,
    catalogue::{MAX_RETRIES, Topic},
};
use chrono::Utc;
use chrono_tz::Tz;
use rdkafka::message::{Header, OwnedHeaders};

use crate::{
    batch::Batcher,
    gateway::{SendError, UnknownOutcome},
    hours::{Window, forbidden_until},
    store::{
        self, BillContext, ClaimRequest, ClaimState, DeliveryStatus, DeliveryUpdate, Handover,
        Settings, TemplateRow,
    },
};

/// What the processor needs to know of a request, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub delivery_id: String,
    pub bill_id: i64,
    pub member_id: i64,
    /// 0 for the first attempt on this channel.
    pub attempt: i32,
}

/// The key a provider de-duplicates a bill's message on: the channel and the bill, never
/// anything the request record says (a forged request naming another bill's delivery id
/// could otherwise make a provider that honours keys drop that bill's real message).
pub fn idempotency_key(channel: &str, bill_id: i64) -> String {
    format!("{channel}-{bill_id}")
}

/// Spreads the retries of bills that failed together (a provider outage) over the last
/// quarter of their backoff, so they do not all come back at once. A fixed function of the
/// bill and the attempt (a replay waits the same), and never longer than the backoff (the
/// retry topic holds a record at most that long).
pub fn jittered(delay: Duration, bill_id: i64, attempt: usize) -> Duration {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    (bill_id, attempt).hash(&mut h);
    let share = f64::from(u32::try_from(h.finish() % 1000).unwrap_or(0)) / 1000.0;
    delay.saturating_sub((delay / 4).mul_f64(share))
}

/// What giving up on a channel did besides its own outcome: other delivery state to record
/// (e.g. SMS `queued`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    pub also: Vec<DeliveryUpdate>,
}

/// A delivery channel: one implementation (and one catalogue entry for its topics) per
/// channel. See docs/channels.md.
pub trait Channel: Send + Sync + 'static {
    /// The request record on the channel's topics.
    type Request: ChannelRequest;
    /// The name: group id, quarantine stage and `delivery.channel`.
    const NAME: &'static str;
    /// Whether the bill's items are loaded (the email's table needs them, an SMS does not).
    const NEEDS_ITEMS: bool;
    /// This channel's status once it gives up: `failed` (handed to the next channel) or
    /// `dead` (undeliverable).
    const GAVE_UP: DeliveryStatus;

    /// The request topic.
    const TOPIC: Topic<Self::Request>;
    /// The retry topics, one per retry number.
    const RETRY_TOPICS: [Topic<Self::Request>; MAX_RETRIES];
    /// Renders with `template` and sends.
    fn deliver(
        &self,
        bill: &BillContext,
        template: &TemplateRow,
        request: &Self::Request,
    ) -> impl Future<Output = Result<(), SendError>> + Send;
    /// The gateway's policy for a delivery whose outcome is unknown.
    fn unknown_outcome(&self) -> UnknownOutcome;
    /// No attempts left (or a permanent failure): hand the bill on. Returns once what it
    /// published is acknowledged. Called after the give-up is recorded, and again if a redo
    /// finds it recorded, so what it publishes must be harmless twice (the next channel's
    /// claim lets one copy through).
    fn give_up(
        &self,
        bill: &BillContext,
        record: &Incoming<Self::Request>,
        error: &str,
    ) -> impl Future<Output = Result<GaveUp, String>> + Send;
}

/// A channel's request record: what every channel reads of it, and its next attempt.
pub trait ChannelRequest: AvroRecord + Clone + Send + Sync + 'static {
    fn envelope(&self) -> Envelope;
    /// The request for the next attempt after `error`.
    fn next_attempt(&self, error: &str) -> Self;
}

/// The request records share their delivery fields; one implementation serves them all.
macro_rules! channel_request {
    ($($ty:ty),*) => {$(
        impl ChannelRequest for $ty {
            fn envelope(&self) -> Envelope {
                Envelope {
                    delivery_id: self.delivery_id.clone(),
                    bill_id: self.bill_id,
                    member_id: self.member_id,
                    attempt: self.attempt,
                }
            }

            fn next_attempt(&self, error: &str) -> Self {
                Self {
                    attempt: self.attempt + 1,
                    last_error: Some(error.to_string()),
                    ..self.clone()
                }
            }
        }
    )*};
}

channel_request!(billing_schema::EmailRequest, billing_schema::SmsRequest);

/// How a channel processor runs.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Requests being worked on at once: the gateway's latency is hidden by this many
    /// concurrent sends.
    pub max_in_flight: usize,
    /// Bytes (keys and values) of the requests being worked on at once: with
    /// `max_in_flight`, it bounds what records in flight hold, however large they are.
    pub max_in_flight_bytes: usize,
    /// Attempts on this channel, the first included (2 to 5): attempt n goes to retry topic n.
    pub attempts: u32,
    /// Delay before retry n is `initial * 2^(n-1)`, capped.
    pub backoff: Backoff,
    /// How long a template or quiet-hours change may take to be seen.
    pub settings_ttl: Duration,
    /// Database connections.
    pub pool_size: usize,
    /// How long a claim on a delivery lasts: longer than any provider call can take. After
    /// it a successor may take over a delivery whose holder died (see [`UnknownOutcome`]).
    pub claim_lease: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_in_flight: 2000,
            max_in_flight_bytes: billing_runtime::consumer::DEFAULT_MAX_IN_FLIGHT_BYTES,
            attempts: 4,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            settings_ttl: Duration::from_secs(10),
            pool_size: 8,
            claim_lease: Duration::from_secs(60),
        }
    }
}

/// Counters of a channel processor; [`ChannelStats::registered`] ones are also Prometheus
/// metrics (`billing_deliveries_total{channel, outcome}`).
#[derive(Debug, Default)]
pub struct ChannelStats {
    pub sent: Counter,
    pub retried: Counter,
    pub gave_up: Counter,
    pub skipped_delivered: Counter,
    pub deferred: Counter,
}

impl ChannelStats {
    /// Counters registered in the process's metrics under `channel`.
    pub fn registered(channel: &str) -> Self {
        let m = billing_runtime::metrics::global();
        let c = |outcome: &str| {
            m.counter(
                "billing_deliveries_total",
                "Delivery attempts by outcome: sent, retried, gave_up, skipped (already delivered), deferred (forbidden hours).",
                &[("channel", channel), ("outcome", outcome)],
            )
        };
        ChannelStats {
            sent: c("sent"),
            retried: c("retried"),
            gave_up: c("gave_up"),
            skipped_delivered: c("skipped"),
            deferred: c("deferred"),
        }
    }
}

/// A channel processor's start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error(transparent)]
    Connect(#[from] billing_runtime::ConnectError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Produce(#[from] billing_runtime::ProduceError),
    #[error(transparent)]
    Db(#[from] billing_db::DbError),
    #[error(transparent)]
    Loop(#[from] billing_runtime::consumer::LoopError),
    #[error("{0}")]
    Config(String),
}

/// The handler of one channel: the steps in the module docs.
pub struct ChannelHandler<C: Channel> {
    channel: C,
    loader: Batcher<i64, Option<Arc<BillContext>>>,
    writer: Batcher<DeliveryUpdate, ()>,
    /// Claims deliveries in PostgreSQL before the gateway is called: the exclusion that spans
    /// processes (`in_progress` only spans this one).
    claims: Batcher<ClaimRequest, ClaimState>,
    settings: Settings,
    clock: Clock,
    tz: Tz,
    config: ChannelConfig,
    producer: Producer,
    /// (topic name, encoder) per retry number - 1.
    retries: Vec<(String, Encoder<C::Request>)>,
    stats: Arc<ChannelStats>,
    /// Bills being worked on in this process. A bill's requests share a partition (keyed by
    /// member), so a second request of the same bill in flight here (a repeat) waits for the
    /// first to finish and then finds it delivered, instead of racing it to the gateway.
    in_progress: std::sync::Mutex<std::collections::HashSet<i64>>,
}

/// Removes its bill from `in_progress` when the handling ends, however it ends.
struct Claim<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<i64>>,
    bill_id: i64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.bill_id);
        }
    }
}

impl<C: Channel> std::fmt::Debug for ChannelHandler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelHandler")
            .field("channel", &C::NAME)
            .finish_non_exhaustive()
    }
}

fn retriable(e: impl std::fmt::Display) -> HandleError {
    HandleError::Retriable(e.to_string())
}

/// What to do with a request whose claim was refused, from the delivery's state. Pure: the
/// state machine of docs/architecture.md ("a bill is sent by one process at a time").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclaimed {
    /// Delivered, or the delivery is past this attempt (a repeat, a forked retry chain, a
    /// replay): nothing to do.
    Stale,
    /// Another process holds a live claim on it (or the same request is being claimed): ask
    /// again shortly; its outcome, or its lease running out, decides.
    Busy,
    /// This very attempt's outcome is recorded; its hand-over may not have been published (the
    /// process died in between): publish it again.
    Republish(Handover),
    /// Its holder died mid-send and the provider cannot de-duplicate: hold for an operator.
    Hold,
}

/// The identity of a request record, as [`DeliveryUpdate::source`] records it.
pub fn source_of<V>(record: &Incoming<V>) -> String {
    format!("{}/{}/{}", record.topic, record.partition, record.offset)
}

/// Decides [`Unclaimed`] for the request record `source` of `attempt` (0-based) given the
/// state that refused it. Only a redo of the record that recorded the outcome republishes its
/// hand-over: another copy of the same attempt (a duplicated request) is behind it.
pub fn decide(state: &ClaimState, attempt: i32, source: &str) -> Unclaimed {
    let this = attempt.saturating_add(1);
    match state.status {
        Some(DeliveryStatus::Sent | DeliveryStatus::Unknown) => Unclaimed::Stale,
        Some(DeliveryStatus::Sending) if state.attempts == this && state.expired => Unclaimed::Hold,
        Some(DeliveryStatus::Sending) if state.attempts == this => Unclaimed::Busy,
        Some(DeliveryStatus::Failed | DeliveryStatus::Dead)
            if state.attempts == this && state.handover_source.as_deref() == Some(source) =>
        {
            state
                .handover
                .map_or(Unclaimed::Stale, Unclaimed::Republish)
        }
        Some(DeliveryStatus::Queued | DeliveryStatus::Failed) if state.attempts == attempt => {
            Unclaimed::Busy
        }
        None => Unclaimed::Busy,
        Some(_) => Unclaimed::Stale,
    }
}

impl<C: Channel> Handler<C::Request> for ChannelHandler<C> {
    async fn handle(&self, record: &Incoming<C::Request>) -> Result<(), HandleError> {
        let env = record.value.envelope();
        let claimed = self
            .in_progress
            .lock()
            .map_err(|_| retriable("in-progress set poisoned"))?
            .insert(env.bill_id);
        if !claimed {
            return Err(HandleError::Defer(Duration::from_millis(100)));
        }
        let _claim = Claim {
            set: &self.in_progress,
            bill_id: env.bill_id,
        };
        let Some(bill) = self.loader.call(env.bill_id).await.map_err(retriable)? else {
            return Err(HandleError::Final(format!(
                "bill {} not found (delivery {})",
                env.bill_id, env.delivery_id
            )));
        };
        if bill.delivered {
            self.stats.skipped_delivered.inc();
            tracing::debug!(
                bill_id = env.bill_id,
                channel = C::NAME,
                "already delivered"
            );
            return Ok(());
        }
        let settings = self.settings.get().await.map_err(retriable)?;
        let now = self.clock.now();
        let mut windows: Vec<Window> = settings.quiet_hours.iter().copied().collect();
        if let Some((start, end)) = bill.dnd {
            windows.push(Window {
                start,
                end,
                tz: self.tz,
            });
        }
        if let Some(until) = forbidden_until(now, &windows) {
            self.stats.deferred.inc();
            let wait = self.clock.real_until(until).max(Duration::from_millis(10));
            return Err(HandleError::Defer(wait));
        }
        let Some(template) = settings.template.as_ref() else {
            tracing::warn!(channel = C::NAME, "no active template; waiting");
            return Err(HandleError::Defer(self.config.settings_ttl));
        };
        let claim = self
            .claims
            .call(ClaimRequest {
                bill_id: env.bill_id,
                channel: C::NAME,
                attempt: env.attempt,
            })
            .await
            .map_err(retriable)?;
        if !claim.claimed {
            return self.unclaimed(&bill, record, &env, &claim).await;
        }
        let outcome = self.channel.deliver(&bill, template, &record.value).await;
        self.record_outcome(&bill, record, &env, outcome, template.version, now)
            .await
    }
}

impl<C: Channel> ChannelHandler<C> {
    /// A request whose claim was refused: see [`decide`].
    async fn unclaimed(
        &self,
        bill: &BillContext,
        record: &Incoming<C::Request>,
        env: &Envelope,
        claim: &ClaimState,
    ) -> Result<(), HandleError> {
        let error = claim.last_error.clone().unwrap_or_default();
        match decide(claim, env.attempt, &source_of(record)) {
            Unclaimed::Stale => {
                self.stats.skipped_delivered.inc();
                tracing::debug!(
                    bill_id = env.bill_id,
                    channel = C::NAME,
                    attempt = env.attempt,
                    "request behind its delivery; skipped"
                );
                Ok(())
            }
            Unclaimed::Busy => Err(HandleError::Defer(Duration::from_millis(500))),
            Unclaimed::Republish(Handover::Retry) => self.publish_retry(record, env, &error).await,
            Unclaimed::Republish(Handover::GiveUp) => self.give_up(bill, record, &error).await,
            Unclaimed::Hold => {
                self.write(self.update(env, DeliveryStatus::Unknown, None, None))
                    .await?;
                Err(HandleError::Final(format!(
                    "bill {} on {}: the process sending attempt {} died before the provider's answer was recorded; held for an operator (the message may have gone out)",
                    env.bill_id,
                    C::NAME,
                    env.attempt + 1
                )))
            }
        }
    }

    fn update(
        &self,
        env: &Envelope,
        status: DeliveryStatus,
        last_error: Option<String>,
        handover: Option<Handover>,
    ) -> DeliveryUpdate {
        DeliveryUpdate {
            bill_id: env.bill_id,
            channel: C::NAME,
            status,
            attempts: env.attempt.saturating_add(1),
            sent_at: None,
            last_error,
            template_version: None,
            handover,
            source: None,
        }
    }

    async fn write(&self, update: DeliveryUpdate) -> Result<(), HandleError> {
        self.writer.call(update).await.map_err(retriable)
    }

    /// Records the provider's answer at once, then publishes the hand-over it implies: the
    /// record comes first, so a crash in between leaves a redo that republishes (and the next
    /// claim lets one copy through), never a hand-over without its record.
    async fn record_outcome(
        &self,
        bill: &BillContext,
        record: &Incoming<C::Request>,
        env: &Envelope,
        outcome: Result<(), SendError>,
        template_version: i32,
        now: chrono::DateTime<Utc>,
    ) -> Result<(), HandleError> {
        let attempts = env.attempt.saturating_add(1);
        let with_template = |mut u: DeliveryUpdate| {
            u.template_version = Some(template_version);
            u.source = Some(source_of(record));
            u
        };
        match outcome {
            Ok(()) => {
                let mut u = with_template(self.update(env, DeliveryStatus::Sent, None, None));
                u.sent_at = Some(now);
                self.write(u).await?;
                self.stats.sent.inc();
                Ok(())
            }
            Err(SendError::Transient(e))
                if u32::try_from(attempts).is_ok_and(|a| a < self.config.attempts) =>
            {
                let u = self.update(
                    env,
                    DeliveryStatus::Failed,
                    Some(e.clone()),
                    Some(Handover::Retry),
                );
                self.write(with_template(u)).await?;
                self.publish_retry(record, env, &e).await?;
                self.stats.retried.inc();
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                let u = self.update(
                    env,
                    C::GAVE_UP,
                    Some(reason.clone()),
                    Some(Handover::GiveUp),
                );
                self.write(with_template(u)).await?;
                self.give_up(bill, record, &reason).await?;
                self.stats.gave_up.inc();
                tracing::info!(bill_id = env.bill_id, channel = C::NAME, attempts, error = %reason, "channel gave up");
                Ok(())
            }
        }
    }

    /// Publishes the next attempt of `record` to its retry topic, due after its backoff.
    async fn publish_retry(
        &self,
        record: &Incoming<C::Request>,
        env: &Envelope,
        error: &str,
    ) -> Result<(), HandleError> {
        let n = usize::try_from(env.attempt).unwrap_or(0);
        let (topic, encoder) = self.retries.get(n).ok_or_else(|| {
            HandleError::Final(format!("no retry topic for attempt {}", env.attempt + 1))
        })?;
        let delay = jittered(
            self.config.backoff.delay(u32::try_from(n).unwrap_or(0)),
            env.bill_id,
            n,
        );
        let due =
            Utc::now().timestamp_millis() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let due = due.to_string();
        let next = record.value.next_attempt(error);
        let payload = encoder.encode(&next).map_err(retriable)?;
        let key = env.member_id.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: NOT_BEFORE,
            value: Some(due.as_bytes()),
        });
        self.producer
            .send(topic, Some(key.as_bytes()), Some(&payload), Some(headers))
            .await
            .map_err(retriable)?;
        tracing::debug!(
            bill_id = env.bill_id,
            channel = C::NAME,
            attempt = env.attempt + 1,
            ?delay,
            error,
            "retry scheduled"
        );
        Ok(())
    }

    /// Hands the bill on (the channel's [`Channel::give_up`]) and records what that implies.
    async fn give_up(
        &self,
        bill: &BillContext,
        record: &Incoming<C::Request>,
        error: &str,
    ) -> Result<(), HandleError> {
        let gave_up = self
            .channel
            .give_up(bill, record, error)
            .await
            .map_err(HandleError::Retriable)?;
        for also in gave_up.also {
            self.write(also).await?;
        }
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelSummary {
    pub consumer: LoopSummary,
    pub sent: u64,
    pub retried: u64,
    pub gave_up: u64,
    pub skipped_delivered: u64,
}

/// Parts a channel's run needs besides the channel.
#[derive(Clone)]
pub struct ChannelDeps {
    pub pool: PgPool,
    pub stats: Arc<ChannelStats>,
}

impl std::fmt::Debug for ChannelDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDeps").finish_non_exhaustive()
    }
}

/// The full names of the topics a channel consumes: its requests and the retry topics in use.
pub fn consumed_topics<C: Channel>(common: &CommonArgs, attempts: u32) -> Vec<String> {
    let catalogue = common.catalogue();
    let retries = usize::try_from(attempts.saturating_sub(1)).unwrap_or(0);
    std::iter::once(catalogue.name(&C::TOPIC.spec))
        .chain(
            C::RETRY_TOPICS
                .iter()
                .take(retries)
                .map(|t| catalogue.name(&t.spec)),
        )
        .collect()
}

/// Runs the channel's processor until `shutdown`.
pub async fn run<C: Channel>(
    common: &CommonArgs,
    config: ChannelConfig,
    channel: C,
    deps: ChannelDeps,
    shutdown: impl Future<Output = ()>,
) -> Result<ChannelSummary, MessagingError> {
    if !(2..=u32::try_from(MAX_RETRIES + 1).unwrap_or(5)).contains(&config.attempts) {
        return Err(MessagingError::Config(format!(
            "attempts must be 2 to {}, got {}",
            MAX_RETRIES + 1,
            config.attempts
        )));
    }
    let p = Processor::connect(common, C::NAME).await?;
    let catalogue = &p.catalogue;
    let mut retries = Vec::new();
    for t in C::RETRY_TOPICS
        .iter()
        .take(usize::try_from(config.attempts - 1).unwrap_or(0))
    {
        retries.push((p.topic(&t.spec), p.encoder::<C::Request>(&t.spec).await?));
    }
    let topics = consumed_topics::<C>(common, config.attempts);
    let take_over = channel.unknown_outcome() == UnknownOutcome::Resend;
    // Requests are read only under the subjects of the topics consumed.
    let subjects: Vec<String> = std::iter::once(&C::TOPIC.spec)
        .chain(C::RETRY_TOPICS.iter().map(|t| &t.spec))
        .map(|spec| catalogue.value_subject(spec))
        .collect();
    // Only the retry topics honour `billing.not-before`, each held at most its own delay
    // (the header on a request topic, or a later instant, is someone else's forgery).
    let delayed = retries
        .iter()
        .enumerate()
        .map(|(n, (topic, _))| {
            let delay = config.backoff.delay(u32::try_from(n).unwrap_or(u32::MAX));
            (topic.clone(), delay)
        })
        .collect();

    let handler = Arc::new(ChannelHandler {
        channel,
        loader: store::bill_loader(deps.pool.clone(), C::NEEDS_ITEMS),
        writer: store::delivery_writer(deps.pool.clone()),
        claims: store::claimer(
            deps.pool.clone(),
            format!("{}-{}", C::NAME, uuid::Uuid::new_v4().simple()),
            config.claim_lease,
            take_over,
        ),
        settings: Settings::new(deps.pool.clone(), C::NAME, config.settings_ttl),
        clock: common.clock,
        tz: common.billing_tz,
        config: config.clone(),
        producer: p.producer.clone(),
        retries,
        stats: deps.stats.clone(),
        in_progress: std::sync::Mutex::default(),
    });
    let mut loop_config = LoopConfig::new(p.group(C::NAME), topics);
    loop_config.max_in_flight = config.max_in_flight;
    loop_config.max_in_flight_bytes = config.max_in_flight_bytes;
    loop_config.delayed = delayed;
    loop_config.backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(10),
    };
    let loop_deps = LoopDeps {
        kafka: common.kafka(),
        decoder: Arc::new(Decoder::for_subjects(p.registry.clone(), subjects)),
        handler,
        quarantine: p.quarantine.clone(),
    };
    tracing::info!(
        channel = C::NAME,
        max_in_flight = config.max_in_flight,
        attempts = config.attempts,
        "channel processor started"
    );
    let consumer = run_consumer(loop_config, loop_deps, shutdown).await?;
    let s = &deps.stats;
    Ok(ChannelSummary {
        consumer,
        sent: s.sent.get(),
        retried: s.retried.get(),
        gave_up: s.gave_up.get(),
        skipped_delivered: s.skipped_delivered.get(),
    })
}

impl ChannelConfig {
    /// A configuration from a channel binary's flags (backoff capped at 5 minutes).
    pub fn from_flags(max_in_flight: u64, attempts: u32, backoff_ms: u64) -> Self {
        ChannelConfig {
            max_in_flight: usize::try_from(max_in_flight).unwrap_or(usize::MAX),
            attempts,
            backoff: Backoff {
                initial: Duration::from_millis(backoff_ms),
                max: Duration::from_secs(300),
            },
            ..ChannelConfig::default()
        }
    }
}

/// Declares a channel binary's flags, `$prefix` naming their variables (`EMAIL` gives
/// `EMAIL_MAX_IN_FLIGHT`, `EMAIL_MAX_IN_FLIGHT_BYTES`, `EMAIL_ATTEMPTS`, `EMAIL_BACKOFF_MS`,
/// `EMAIL_CLAIM_LEASE_MS`), with
/// `config` turning them into a [`ChannelConfig`]. One declaration for every channel.
#[macro_export]
macro_rules! channel_flags {
    ($name:ident, $prefix:literal) => {
        /// The channel's own flags.
        #[derive(Debug, Clone, clap::Args)]
        pub struct $name {
            /// Sends in flight at once (the gateway's latency is hidden by concurrency: at
            /// most this many per gateway latency, so 20,000 at 1 s capped a channel below
            /// 20,000 sends/s; 40,000 measured faster at about 500 MB, 80,000 no faster).
            #[arg(long, env = concat!($prefix, "_MAX_IN_FLIGHT"), default_value_t = 40_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
            pub max_in_flight: u64,
            /// Bytes (keys and values) of the requests in flight at once, 64 MiB by default.
            /// Requests are small (about 100 bytes), so the count above binds first; this
            /// bounds the memory held if large records reach a request topic (at 40,000 in
            /// flight, 1 MB records would otherwise hold 40 GB).
            #[arg(long, env = concat!($prefix, "_MAX_IN_FLIGHT_BYTES"), default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
            pub max_in_flight_bytes: u64,
            /// Attempts on this channel, the first included (2 to 5).
            #[arg(long, env = concat!($prefix, "_ATTEMPTS"), default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=5))]
            pub attempts: u32,
            /// Delay before the first retry, in milliseconds; it doubles with each retry.
            #[arg(long, env = concat!($prefix, "_BACKOFF_MS"), default_value_t = 1000)]
            pub backoff_ms: u64,
            /// How long a claim on a delivery lasts, in milliseconds: longer than any provider
            /// call. A delivery whose sender died is taken over (or held for an operator)
            /// after it.
            #[arg(long, env = concat!($prefix, "_CLAIM_LEASE_MS"), default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
            pub claim_lease_ms: u64,
        }

        impl $name {
            /// The channel's configuration. A send waiting on an open circuit breaker must
            /// still own its claim, so `guard`'s longest hold is clamped to half the lease.
            pub fn config(
                &self,
                guard: &mut $crate::guard::GuardArgs,
            ) -> $crate::channel::ChannelConfig {
                let mut config = $crate::channel::ChannelConfig::from_flags(
                    self.max_in_flight,
                    self.attempts,
                    self.backoff_ms,
                );
                config.claim_lease = std::time::Duration::from_millis(self.claim_lease_ms);
                config.max_in_flight_bytes =
                    usize::try_from(self.max_in_flight_bytes).unwrap_or(usize::MAX);
                guard.max_hold_ms = guard.max_hold_ms.min(self.claim_lease_ms / 2);
                config
            }
        }
    };
}

/// A channel binary after parsing its flags: migrations, the pool, the channel (`make` builds
/// it, with its configured gateway, from the pool), metrics and health on `METRICS_ADDR`, then
/// [`run`] until SIGTERM.
pub async fn serve<C, F, Fut>(
    common: &CommonArgs,
    config: ChannelConfig,
    make: F,
) -> Result<ChannelSummary, MessagingError>
where
    C: Channel,
    F: FnOnce(PgPool) -> Fut,
    Fut: Future<Output = Result<C, MessagingError>>,
{
    billing_db::migrate(&common.database_url).await?;
    let pool = billing_db::pool(&common.database_url, config.pool_size)?;
    let channel = make(pool.clone()).await?;
    let deps = ChannelDeps {
        pool,
        stats: Arc::new(ChannelStats::registered(C::NAME)),
    };
    billing_runtime::metrics::serve(common.metrics_addr, billing_runtime::shutdown::signal())
        .await
        .map_err(|e| MessagingError::Config(format!("metrics endpoint: {e}")))?;
    let summary = run(
        common,
        config,
        channel,
        deps,
        billing_runtime::shutdown::signal(),
    )
    .await?;
    tracing::info!(
        channel = C::NAME,
        sent = summary.sent,
        retried = summary.retried,
        gave_up = summary.gave_up,
        skipped = summary.skipped_delivered,
        "channel stopped"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: DeliveryStatus, attempts: i32) -> ClaimState {
        ClaimState {
            claimed: false,
            status: Some(status),
            attempts,
            expired: false,
            handover: None,
            handover_source: Some(SRC.to_string()),
            last_error: None,
        }
    }

    const SRC: &str = "email-requests-retry-1/0/7";

    #[test]
    fn a_redo_of_a_recorded_attempt_republishes_its_hand_over() {
        let mut s = state(DeliveryStatus::Failed, 2);
        s.handover = Some(Handover::Retry);
        assert_eq!(decide(&s, 1, SRC), Unclaimed::Republish(Handover::Retry));
        s.status = Some(DeliveryStatus::Dead);
        s.handover = Some(Handover::GiveUp);
        assert_eq!(decide(&s, 1, SRC), Unclaimed::Republish(Handover::GiveUp));
    }

    #[test]
    fn another_copy_of_a_recorded_attempt_is_stale() {
        let mut s = state(DeliveryStatus::Dead, 2);
        s.handover = Some(Handover::GiveUp);
        assert_eq!(
            decide(&s, 1, "email-requests-retry-1/0/8"),
            Unclaimed::Stale
        );
    }

    #[test]
    fn a_request_behind_its_delivery_is_stale() {
        // A second copy of attempt 1's request after attempt 2 was claimed (a forked chain)
        assert_eq!(
            decide(&state(DeliveryStatus::Sending, 3), 1, SRC),
            Unclaimed::Stale
        );
        let mut s = state(DeliveryStatus::Failed, 3);
        s.handover = Some(Handover::Retry);
        assert_eq!(decide(&s, 1, SRC), Unclaimed::Stale);
        assert_eq!(
            decide(&state(DeliveryStatus::Sent, 1), 0, SRC),
            Unclaimed::Stale
        );
        assert_eq!(
            decide(&state(DeliveryStatus::Unknown, 1), 0, SRC),
            Unclaimed::Stale
        );
        assert_eq!(
            decide(&state(DeliveryStatus::Dead, 4), 0, SRC),
            Unclaimed::Stale
        );
    }

    #[test]
    fn a_live_claim_waits_and_a_dead_holder_is_held_for_an_operator() {
        let mut s = state(DeliveryStatus::Sending, 1);
        assert_eq!(decide(&s, 0, SRC), Unclaimed::Busy);
        s.expired = true;
        assert_eq!(decide(&s, 0, SRC), Unclaimed::Hold);
    }

    #[test]
    fn retries_are_spread_over_the_last_quarter_of_their_backoff() {
        let d = Duration::from_secs(8);
        let delays: std::collections::HashSet<Duration> =
            (0..50).map(|b| jittered(d, b, 1)).collect();
        assert!(delays.iter().all(|j| *j <= d && *j >= d * 3 / 4));
        assert!(delays.len() > 40, "bills spread: {}", delays.len());
        assert_eq!(jittered(d, 7, 1), jittered(d, 7, 1));
    }

    #[test]
    fn idempotency_keys_come_from_the_bill_and_channel_only() {
        assert_eq!(
            idempotency_key("email", 2026110000000007),
            "email-2026110000000007"
        );
        assert_ne!(idempotency_key("sms", 7), idempotency_key("email", 7));
    }
}
