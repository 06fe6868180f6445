//! `sms`: the sms delivery channel. See the crate docs.

use billing_messaging::{
    ChannelConfig, MessagingError, SimulationArgs,
    guard::GuardArgs,
    providers::{SmsProviderArgs, sms_gateway},
};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "sms", version, about = "Deliver bills by sms")]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
    #[command(flatten)]
    provider: SmsProviderArgs,
    #[command(flatten)]
    gateway: SimulationArgs,
    #[command(flatten)]
    guard: GuardArgs,
    /// Sends in flight at once (the gateway's latency is hidden by concurrency).
    #[arg(long, env = "SMS_MAX_IN_FLIGHT", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    max_in_flight: u64,
    /// Attempts on this channel, the first included (2 to 5).
    #[arg(long, env = "SMS_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=5))]
    attempts: u32,
    /// Delay before the first retry, in milliseconds; it doubles with each retry.
    #[arg(long, env = "SMS_BACKOFF_MS", default_value_t = 1000)]
    backoff_ms: u64,
    /// How long a claim on a delivery lasts, in milliseconds: longer than any provider call.
    /// A delivery whose sender died is taken over (or held for an operator) after it.
    #[arg(long, env = "SMS_CLAIM_LEASE_MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    claim_lease_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    let mut config = ChannelConfig::from_flags(cli.max_in_flight, cli.attempts, cli.backoff_ms);
    config.claim_lease = std::time::Duration::from_millis(cli.claim_lease_ms);
    // A send waiting on an open circuit breaker must still own its claim: it waits at most
    // half the lease.
    let mut cli = cli;
    cli.guard.max_hold_ms = cli.guard.max_hold_ms.min(cli.claim_lease_ms / 2);
    let cli = &cli;
    billing_messaging::channel::serve(&cli.common, config, |pool| async move {
        let gateway = sms_gateway(&cli.provider, &cli.gateway, &cli.guard, pool)
            .map_err(MessagingError::Config)?;
        billing_sms::SmsChannel::new(&cli.common, gateway).await
    })
    .await?;
    Ok(())
}
