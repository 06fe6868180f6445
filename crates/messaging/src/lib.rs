//! What every delivery channel shares.
//!
//! # Layout
//! - [`channel`]: the [`Channel`] trait and the one processor loop every channel runs
//!   (look-up, forbidden hours, render, send, retry topics with backoff, give up).
//! - [`gateway`]: the gateway traits ([`MailGateway`], [`SmsGateway`]) and the simulated
//!   provider (latency, failure rate, seed, idempotency keys, undeliverable addresses).
//! - [`providers`]: the real providers (SMTP with lettre, an HTTP SMS API), chosen by
//!   configuration, and the one function per channel that builds the configured gateway.
//! - [`guard`]: a rate limit and a circuit breaker around any gateway.
//! - [`template`]: placeholders, validation at activation, maud rendering (escaped).
//! - [`store`]: bills looked up in batches, delivery state written in batches, templates and
//!   quiet hours.
//! - [`hours`]: quiet hours and do-not-disturb windows at send time.
//! - [`batch`]: the batching primitive behind the look-ups and writes.

pub mod batch;
pub mod channel;
pub mod gateway;
pub mod guard;
pub mod hours;
pub mod providers;
pub mod store;
pub mod template;

pub use channel::{
    Channel, ChannelConfig, ChannelDeps, ChannelRequest, ChannelStats, ChannelSummary, Envelope,
    GaveUp, MessagingError, run,
};
pub use gateway::{
    Mail, MailGateway, SendError, SimulatedGateway, SimulationArgs, Sms, SmsGateway, UnknownOutcome,
};
