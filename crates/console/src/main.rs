//! `console`: the operator console as its own process (the same as `billing console`).

use billing_console::ConsoleArgs;
use billing_runtime::CommonArgs;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "console",
    version,
    about = "The billing operator console (web)"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    console: ConsoleArgs,
}

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    billing_runtime::telemetry::init();
    billing_console::serve(cli.common, cli.console, billing_runtime::shutdown::signal()).await?;
    Ok(())
}
