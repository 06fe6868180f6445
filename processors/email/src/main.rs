//! `email`: the email delivery channel. See the crate docs.

use billing_messaging::{
    MessagingError, SimulationArgs,
    guard::GuardArgs,
    providers::{EmailProviderArgs, mail_gateway},
};
use clap::Parser;

billing_messaging::channel_flags!(Flags, "EMAIL");

#[derive(Debug, Parser)]
#[command(name = "email", version, about = "Deliver bills by email")]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
    #[command(flatten)]
    provider: EmailProviderArgs,
    #[command(flatten)]
    gateway: SimulationArgs,
    #[command(flatten)]
    guard: GuardArgs,
    #[command(flatten)]
    channel: Flags,
}

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let mut cli = Cli::parse();
    let config = cli.channel.config(&mut cli.guard);
    let cli = &cli;
    billing_messaging::channel::serve(&cli.common, config, |pool| async move {
        let gateway = mail_gateway(&cli.provider, &cli.gateway, &cli.guard, pool)
            .map_err(MessagingError::Config)?;
        billing_email::EmailChannel::new(&cli.common, gateway).await
    })
    .await?;
    Ok(())
}
