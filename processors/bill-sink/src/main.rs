//! `bill-sink`: loads bills into PostgreSQL and keeps `member` current. See the crate docs.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = billing_bill_sink::Cli::parse();
    billing_db::migrate(&cli.common.database_url).await?;
    billing_runtime::metrics::serve(cli.common.metrics_addr, billing_runtime::shutdown::signal())
        .await?;
    let summary = billing_bill_sink::run(
        &cli.common,
        cli.sink.into(),
        billing_runtime::shutdown::signal(),
    )
    .await?;
    tracing::info!(?summary, "bill-sink stopped");
    Ok(())
}
