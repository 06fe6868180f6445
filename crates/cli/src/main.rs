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
    /// Settle a month and load its bills into PostgreSQL, to completion.
    Settle {
        /// The billing month, YYYY-MM.
        #[arg(long)]
        month: BillingMonth,
    },
    /// One dispatch pass: due bills outside forbidden hours become email requests.
    Dispatch {
        /// The instant of the pass (RFC 3339); the real clock by default.
        #[arg(long)]
        now: Option<chrono::DateTime<chrono::FixedOffset>>,
    },
    /// Reserve a dispatch: at a date-time, the bills of a month or of some members go out, once.
    Reservation {
        #[command(subcommand)]
        action: ReservationAction,
    },
    /// Apply the database migrations, create the catalogue topics and register their schemas.
    Migrate,
    /// Recompute every bill of a month from its items and the usage; exit 1 on any discrepancy.
    Reconcile {
        /// The billing month, YYYY-MM.
        #[arg(long)]
        month: BillingMonth,
        /// Discrepancies printed at most.
        #[arg(long, default_value_t = 50)]
        show: usize,
    },
}

#[derive(Debug, Subcommand)]
enum ReservationAction {
    /// Register a reservation.
    Add {
        /// When it fires (RFC 3339, e.g. 2026-12-05T10:00:00+09:00).
        #[arg(long)]
        at: chrono::DateTime<chrono::FixedOffset>,
        /// Only bills of this month.
        #[arg(long)]
        month: Option<BillingMonth>,
        /// Only these members' bills (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        members: Option<Vec<i64>>,
        /// Why (shown in the list).
        #[arg(long)]
        note: Option<String>,
    },
    /// Reservations waiting to fire (--all: fired ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Cancel a reservation that has not fired.
    Cancel { id: i64 },
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
        Command::Settle { month } => {
            let r = billing_ops::settle::settle(&common, month).await?;
            let s = &r.settlement;
            println!("settled {month} in {:.2} s", s.elapsed.as_secs_f64());
            println!(
                "  settlement: {} partitions, {} members, {} usage records ({} of other months), {} bills, {} quarantined",
                s.partitions, s.members, s.usage_records, s.other_months, s.bills, s.quarantined
            );
            println!(
                "  bill-sink:  {} bills inserted, {} items, {} members upserted, {} quarantined in {:.2} s",
                r.sink.bills_inserted,
                r.sink.items_inserted,
                r.sink.members_upserted,
                r.sink.quarantined,
                r.sink.elapsed.as_secs_f64()
            );
            println!(
                "  dlq:        {} dead letters recorded",
                r.dead_letters.processed
            );
            let t = &r.totals;
            println!(
                "  database:   {} bills, {} items; total {} won, discount {} won, VAT {} won, final {} won",
                t.bills, t.items, t.total_amount, t.discount_amount, t.vat_amount, t.final_amount
            );
        }
        Command::Dispatch { now } => {
            let now = now.map(|n| n.with_timezone(&chrono::Utc));
            let s = billing_ops::dispatch::dispatch(&common, now).await?;
            let quiet = if s.quiet_hours {
                " (system quiet hours: nothing selected)"
            } else {
                ""
            };
            println!(
                "dispatch pass{quiet}: {} selected, {} held, {} email requests published, {} reservations fired",
                s.selected, s.held, s.published, s.reservations_fired
            );
        }
        Command::Reservation { action } => match action {
            ReservationAction::Add {
                at,
                month,
                members,
                note,
            } => {
                let scope = billing_dispatch_scope(month, members);
                let r = billing_ops::dispatch::reserve(
                    &common,
                    at.with_timezone(&chrono::Utc),
                    scope,
                    note,
                )
                .await?;
                println!("reservation {} fires at {}", r.id, r.fire_at.with_timezone(&common.billing_tz));
            }
            ReservationAction::List { all } => {
                let rs = billing_ops::dispatch::reservations(&common, all).await?;
                println!("{:>6}  {:25}  {:8}  {:10}  {:25}  note", "id", "fires at", "month", "members", "fired at");
                for r in rs {
                    let members = r.member_ids.as_ref().map_or("all".to_string(), |m| m.len().to_string());
                    let fired = r.fired_at.map_or("-".to_string(), |t| t.with_timezone(&common.billing_tz).to_rfc3339());
                    println!(
                        "{:>6}  {:25}  {:8}  {:10}  {:25}  {}",
                        r.id,
                        r.fire_at.with_timezone(&common.billing_tz).to_rfc3339(),
                        r.billing_month.as_deref().unwrap_or("any"),
                        members,
                        fired,
                        r.note.as_deref().unwrap_or("")
                    );
                }
            }
            ReservationAction::Cancel { id } => {
                billing_ops::dispatch::cancel_reservation(&common, id).await?;
                println!("reservation {id} cancelled");
            }
        },
        Command::Migrate => {
            billing_ops::topics::migrate(&common).await?;
            println!("migrations applied, topics created, schemas registered");
        }
        Command::Reconcile { month, show } => {
            let r = billing_ops::reconcile::reconcile(&common, month).await?;
            println!(
                "reconciled {month}: {} bills, {} usage items, {} usage records",
                r.bills, r.usage_items, r.usage_records
            );
            for d in r.discrepancies.iter().take(show) {
                println!("  member {}: {}", d.member_id, d.what);
            }
            if !r.discrepancies.is_empty() {
                anyhow::bail!("{} discrepancies in {month}", r.discrepancies.len());
            }
            println!("  no discrepancies");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A reservation's scope from the flags (validated by the library).
fn billing_dispatch_scope(
    month: Option<BillingMonth>,
    members: Option<Vec<i64>>,
) -> billing_ops::dispatch::Scope {
    billing_ops::dispatch::Scope {
        billing_month: month.map(|m| m.to_string()),
        member_ids: members,
    }
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
