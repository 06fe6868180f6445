//! `billing`: the operator CLI. Every command calls a function in `billing-ops`; this file
//! only parses arguments and prints. Exit codes: 0 success, 1 failure (one line on stderr),
//! 2 bad usage.

use std::process::ExitCode;

use billing_domain::BillingMonth;
use billing_runtime::CommonArgs;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "billing",
    version,
    about = "Operate the telecom billing platform"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The local stack: Kafka-API broker, schema registry, PostgreSQL.
    Stack {
        #[command(subcommand)]
        action: StackAction,
    },
    /// Generate members, products and a month's usage onto the changelog topics.
    Seed {
        /// The billing month, YYYY-MM.
        #[arg(long)]
        month: BillingMonth,
        /// How many members.
        #[arg(long, default_value_t = 1_000_000)]
        members: u64,
        /// The generator's seed: the same seed gives the same data.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
enum StackAction {
    /// Start what is missing (idempotent) and print the variables to export.
    Up,
    /// Stop the broker and registry; --purge also deletes topics, schemas and database contents.
    Down {
        #[arg(long)]
        purge: bool,
    },
    /// Whether each component answers (exit 1 if any does not).
    Status,
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let common = cli.common;
    match cli.command {
        Command::Stack {
            action: StackAction::Up,
        } => {
            let up = billing_ops::stack::up(&common).await?;
            for s in &up.started {
                eprintln!("started {s}");
            }
            print!("{}", up.exports);
        }
        Command::Stack {
            action: StackAction::Down { purge },
        } => {
            for line in billing_ops::stack::down(&common, purge).await? {
                eprintln!("{line}");
            }
        }
        Command::Stack {
            action: StackAction::Status,
        } => {
            let s = billing_ops::stack::status(&common).await;
            let word = |up: bool| if up { "up" } else { "down" };
            println!(
                "postgres         {:4}  {}",
                word(s.postgres),
                billing_ops::stack::mask(&common.database_url)
            );
            println!(
                "broker           {:4}  {}",
                word(s.broker),
                common.kafka_brokers
            );
            println!(
                "schema-registry  {:4}  {}",
                word(s.registry),
                common.schema_registry_url
            );
            if !s.all_up() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Seed {
            month,
            members,
            seed,
            quiet,
        } => {
            let bar = (!quiet).then(|| billing_ops::seed::progress_bar(members));
            let options = billing_ops::seed::SeedOptions {
                month,
                members,
                seed,
            };
            let r = billing_ops::seed::seed(&common, options, bar).await?;
            println!("seeded {} for seed {seed}", r.month);
            for (topic, n) in &r.topics {
                println!("  {topic:<24} {n:>10} records");
            }
            println!(
                "  {} records, {} bytes in {:.2} s: {} records/s",
                r.members + r.products + r.usage_records,
                r.bytes,
                r.elapsed.as_secs_f64(),
                r.records_per_sec()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("billing: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("billing: {e:#}");
            ExitCode::from(1)
        }
    }
}
