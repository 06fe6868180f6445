//! `dispatch`: a dispatch pass every `--interval` (hourly by default). See the crate docs.

use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "dispatch",
    version,
    about = "Turn settled bills into email requests"
)]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
    /// Seconds between passes.
    #[arg(long, env = "DISPATCH_INTERVAL_SECS", default_value_t = 3600)]
    interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    billing_db::migrate(&cli.common.database_url).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(cli.interval.max(1)));
    let shutdown = billing_runtime::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = tick.tick() => {
                // A failed pass loses nothing (the outbox keeps its rows): the next one retries.
                if let Err(e) = billing_dispatch::run_pass(&cli.common, chrono::Utc::now()).await {
                    tracing::warn!(error = %e, "dispatch pass failed");
                }
            }
        }
    }
}
