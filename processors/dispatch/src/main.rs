//! `dispatch`: a pass at start, then on every interval of the clock (hourly by default) and at
//! every reservation's time. See the crate docs.

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
    /// Clock seconds between scheduled passes (passes fall on multiples of it).
    #[arg(long, env = "DISPATCH_INTERVAL_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// Real milliseconds between looks for new reservations (and before retrying a failed pass).
    #[arg(long, env = "DISPATCH_POLL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(10..))]
    poll_ms: u64,
}

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    billing_db::migrate(&cli.common.database_url).await?;
    billing_runtime::metrics::serve(cli.common.metrics_addr, billing_runtime::shutdown::signal())
        .await?;
    let config = billing_dispatch::schedule::ScheduleConfig {
        interval: chrono::Duration::seconds(i64::try_from(cli.interval)?),
        poll: Duration::from_millis(cli.poll_ms),
    };
    let summary =
        billing_dispatch::schedule::run(&cli.common, &config, billing_runtime::shutdown::signal())
            .await?;
    tracing::info!(
        passes = summary.passes,
        failed = summary.failed_passes,
        published = summary.published,
        "dispatch stopped"
    );
    Ok(())
}
