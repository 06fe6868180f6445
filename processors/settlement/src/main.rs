//! `settlement`: settles a month once (`--month`) or every month on a schedule. See the
//! crate docs for what it reads, writes and guarantees.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = billing_settlement::Cli::parse();
    billing_settlement::main_loop(cli, billing_runtime::shutdown::signal()).await?;
    Ok(())
}
