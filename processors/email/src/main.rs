//! `email`: the email delivery channel. See the crate docs.

use std::{sync::Arc, time::Duration};

use billing_messaging::{ChannelConfig, ChannelDeps, SimulatedGateway, SimulationArgs};
use billing_runtime::Backoff;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "email", version, about = "Deliver bills by email")]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
    #[command(flatten)]
    gateway: SimulationArgs,
    /// Sends in flight at once (the gateway's latency is hidden by concurrency).
    #[arg(long, env = "EMAIL_MAX_IN_FLIGHT", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=200_000))]
    max_in_flight: u64,
    /// Attempts on this channel, the first included (2 to 5).
    #[arg(long, env = "EMAIL_ATTEMPTS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=5))]
    attempts: u32,
    /// Delay before the first retry, in milliseconds; it doubles with each retry.
    #[arg(long, env = "EMAIL_BACKOFF_MS", default_value_t = 1000)]
    backoff_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    billing_db::migrate(&cli.common.database_url).await?;
    let config = ChannelConfig {
        max_in_flight: usize::try_from(cli.max_in_flight)?,
        attempts: cli.attempts,
        backoff: Backoff {
            initial: Duration::from_millis(cli.backoff_ms),
            max: Duration::from_secs(300),
        },
        ..ChannelConfig::default()
    };
    let pool = billing_db::pool(&cli.common.database_url, config.pool_size)?;
    let gateway = SimulatedGateway::new(billing_email::NAME, &cli.gateway, Some(pool.clone()))
        .map_err(anyhow::Error::msg)?;
    let channel = billing_email::EmailChannel::new(&cli.common, gateway).await?;
    let deps = ChannelDeps {
        pool,
        stats: Arc::new(billing_messaging::ChannelStats::registered(billing_email::NAME)),
    };
    billing_runtime::metrics::serve(cli.common.metrics_addr, billing_runtime::shutdown::signal()).await?;
    let summary = billing_messaging::run(
        &cli.common,
        config,
        channel,
        deps,
        billing_runtime::shutdown::signal(),
    )
    .await?;
    tracing::info!(sent = summary.sent, retried = summary.retried, gave_up = summary.gave_up, skipped = summary.skipped_delivered, "email stopped");
    Ok(())
}
