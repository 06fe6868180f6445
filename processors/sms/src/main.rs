//! `sms`: the sms delivery channel. See the crate docs.

use billing_messaging::{
    MessagingError, SimulationArgs,
    guard::GuardArgs,
    providers::{SmsProviderArgs, sms_gateway},
};
use clap::Parser;

billing_messaging::channel_flags!(Flags, "SMS");

#[derive(Debug, Parser)]
#[command(name = "sms", version, about = "Deliver bills by SMS")]
struct Cli {
    #[command(flatten)]
    common: billing_runtime::CommonArgs,
    #[command(flatten)]
    provider: SmsProviderArgs,
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
        let gateway = sms_gateway(&cli.provider, &cli.gateway, &cli.guard, pool)
            .map_err(MessagingError::Config)?;
        billing_sms::SmsChannel::new(&cli.common, gateway).await
    })
    .await?;
    Ok(())
}
