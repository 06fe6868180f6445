//! `dlq`: records dead letters in PostgreSQL. See the crate docs.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "dlq", version, about = "Record dead letters in PostgreSQL")]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
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
    billing_dlq::run(&cli.common, false, billing_runtime::shutdown::signal()).await?;
    Ok(())
}
