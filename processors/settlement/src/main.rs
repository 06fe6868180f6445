//! `settlement`: settles a month once (`--month`) or every month on a schedule. See the
//! crate docs for what it reads, writes and guarantees.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = billing_settlement::Cli::parse();
    billing_runtime::metrics::serve(cli.common.metrics_addr, billing_runtime::shutdown::signal())
        .await?;
    billing_settlement::main_loop(cli, billing_runtime::shutdown::signal()).await?;
    Ok(())
}
