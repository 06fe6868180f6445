//! `schema-registry`: the local, PostgreSQL-backed schema registry. See the crate docs.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Confluent-compatible schema registry backed by PostgreSQL"
)]
struct Cli {
    #[command(flatten)]
    config: billing_registry::RegistryConfig,
}

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    billing_registry::run(cli.config, billing_runtime::shutdown::signal(), None).await?;
    Ok(())
}
