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
    /// Email and SMS templates: versions, activation (validated), previews with a real bill.
    Template {
        #[command(subcommand)]
        action: TemplateAction,
    },
    /// Dead letters: what could not be processed or delivered.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// The system quiet hours: no message is sent and no bill dispatched inside them.
    QuietHours {
        #[command(subcommand)]
        action: QuietHoursAction,
    },
    /// The operator console (web pages) until interrupted.
    Console {
        #[command(flatten)]
        args: billing_console::ConsoleArgs,
    },
    /// Console accounts.
    Operator {
        #[command(subcommand)]
        action: OperatorAction,
    },
    /// Deliveries held for an operator.
    Delivery {
        #[command(subcommand)]
        action: DeliveryAction,
    },
    /// Move a consumer group on a topic so its stage re-processes (stop the group first).
    Replay {
        /// The consumer group (a processor's name, with the topic prefix if any).
        #[arg(long)]
        group: String,
        /// The full topic name.
        #[arg(long)]
        topic: String,
        /// To each partition's first record.
        #[arg(long, group = "target", required = true)]
        to_earliest: bool,
        /// To this offset on every partition.
        #[arg(long, group = "target")]
        to_offset: Option<i64>,
        /// To the first record at or after this instant (RFC 3339).
        #[arg(long, group = "target")]
        to_time: Option<chrono::DateTime<chrono::FixedOffset>>,
        /// Show the moves without making them.
        #[arg(long)]
        dry_run: bool,
    },
    /// The whole month end to end on the local stack: seed, settle, deliver on a simulated
    /// clock with the real processors, and report.
    Demo {
        /// How many members.
        #[arg(long, default_value_t = 1_000_000)]
        members: u64,
        /// The billing month (its bills are delivered the month after).
        #[arg(long, default_value = "2026-11")]
        month: BillingMonth,
        /// The generator's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated seconds per real second while bills are delivered.
        #[arg(long, default_value_t = 14_400.0)]
        speed: f64,
        /// Gateway latency in milliseconds.
        #[arg(long, default_value_t = 1000)]
        gateway_latency_ms: u64,
        /// Share of gateway attempts that fail transiently.
        #[arg(long, default_value_t = 0.01)]
        gateway_failure_rate: f64,
        /// Seed of the gateway's failures.
        #[arg(long, default_value_t = 7)]
        gateway_seed: u64,
        /// Give up delivering after this many minutes.
        #[arg(long, default_value_t = 60)]
        timeout_min: u64,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Where the console listens while the month is delivered (a one-time login is printed).
        #[arg(long, default_value = "127.0.0.1:8090")]
        console: std::net::SocketAddr,
        /// Do not start the console.
        #[arg(long)]
        no_console: bool,
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
enum TemplateAction {
    /// Every version of every template.
    List,
    /// One version, whole.
    Show { id: i64 },
    /// Store a new inactive version (the next number for its name).
    Create {
        /// email or sms.
        #[arg(long)]
        channel: String,
        #[arg(long)]
        name: String,
        /// The email subject (placeholders allowed).
        #[arg(long)]
        subject: Option<String>,
        /// The body, plain text with {{placeholders}}; blank lines separate paragraphs.
        #[arg(
            long,
            conflicts_with = "body_file",
            required_unless_present = "body_file"
        )]
        body: Option<String>,
        /// Read the body from a file.
        #[arg(long)]
        body_file: Option<std::path::PathBuf>,
    },
    /// Validate a version's placeholders and make it its channel's active template.
    Activate { id: i64 },
    /// Render a version with a real bill.
    Preview {
        id: i64,
        /// The bill to render (the first bill by default).
        #[arg(long)]
        bill: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Dead letters, newest first.
    List {
        /// Only this stage (email, sms, undeliverable, bill-sink, ...).
        #[arg(long)]
        stage: Option<String>,
        /// Replayed letters too.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Send letters again to their source topics (all unreplayed ones without --id).
    Replay {
        #[arg(long = "id", value_delimiter = ',')]
        ids: Vec<i64>,
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorAction {
    /// Create a console account; its password (12 characters or more) is read from standard
    /// input, one line.
    Add {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator"])]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
enum QuietHoursAction {
    /// The window in force.
    Show,
    /// Set the window, HH:MM to HH:MM in BILLING_TZ (it may cross midnight: 21:00 08:00).
    Set { start: String, end: String },
}

#[derive(Debug, Subcommand)]
enum DeliveryAction {
    /// Answer for a delivery held `unknown` (its sender died mid-send on a provider without
    /// idempotency keys): `sent` if the provider's log shows the message, `resend` if not.
    Resolve {
        #[arg(long)]
        bill: i64,
        #[arg(long, value_parser = ["email", "sms"])]
        channel: String,
        #[arg(long = "as", value_parser = ["sent", "resend"])]
        resolution: String,
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
                println!(
                    "reservation {} fires at {}",
                    r.id,
                    r.fire_at.with_timezone(&common.billing_tz)
                );
            }
            ReservationAction::List { all } => {
                let rs = billing_ops::dispatch::reservations(&common, all).await?;
                println!(
                    "{:>6}  {:25}  {:8}  {:10}  {:25}  note",
                    "id", "fires at", "month", "members", "fired at"
                );
                for r in rs {
                    let members = r
                        .member_ids
                        .as_ref()
                        .map_or("all".to_string(), |m| m.len().to_string());
                    let fired = r.fired_at.map_or("-".to_string(), |t| {
                        t.with_timezone(&common.billing_tz).to_rfc3339()
                    });
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
        Command::Template { action } => match action {
            TemplateAction::List => {
                println!(
                    "{:>5}  {:6}  {:20}  {:>7}  {:6}  created",
                    "id", "chan", "name", "version", "active"
                );
                for t in billing_ops::templates::list(&common).await? {
                    println!(
                        "{:>5}  {:6}  {:20}  {:>7}  {:6}  {}",
                        t.id,
                        t.channel,
                        t.name,
                        t.version,
                        if t.active { "yes" } else { "" },
                        t.created_at
                            .with_timezone(&common.billing_tz)
                            .format("%Y-%m-%d %H:%M")
                    );
                }
            }
            TemplateAction::Show { id } => {
                let t = billing_ops::templates::show(&common, id).await?;
                println!(
                    "template {} ({} {} v{}{})",
                    t.id,
                    t.channel,
                    t.name,
                    t.version,
                    if t.active { ", active" } else { "" }
                );
                if let Some(s) = &t.subject {
                    println!("subject: {s}");
                }
                println!("{}", t.body);
            }
            TemplateAction::Create {
                channel,
                name,
                subject,
                body,
                body_file,
            } => {
                let body = match (body, body_file) {
                    (Some(b), _) => b,
                    (None, Some(f)) => std::fs::read_to_string(&f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?,
                    (None, None) => anyhow::bail!("a body is needed"),
                };
                let t = billing_ops::templates::create(
                    &common,
                    &channel,
                    &name,
                    subject.as_deref(),
                    &body,
                )
                .await?;
                println!(
                    "created template {} ({} {} v{}), inactive",
                    t.id, t.channel, t.name, t.version
                );
            }
            TemplateAction::Activate { id } => {
                let t = billing_ops::templates::activate(&common, id).await?;
                println!(
                    "template {} ({} {} v{}) is now the active {} template",
                    t.id, t.channel, t.name, t.version, t.channel
                );
            }
            TemplateAction::Preview { id, bill } => {
                let (subject, body) = billing_ops::templates::preview(&common, id, bill).await?;
                if let Some(s) = subject {
                    println!("Subject: {s}\n");
                }
                println!("{body}");
            }
        },
        Command::Dlq { action } => match action {
            DlqAction::List { stage, all, limit } => {
                let filter = billing_ops::dlq::Filter {
                    stage,
                    include_replayed: all,
                    limit,
                    ..Default::default()
                };
                let letters = billing_ops::dlq::list(&common, &filter).await?;
                println!(
                    "{:>7}  {:14}  {:32}  {:>9}  {:20}  reason",
                    "id", "stage", "source", "offset", "recorded"
                );
                for l in &letters {
                    println!(
                        "{:>7}  {:14}  {:32}  {:>9}  {:20}  {}{}",
                        l.id,
                        l.stage,
                        format!("{}[{}]", l.source_topic, l.source_partition),
                        l.source_offset,
                        l.created_at
                            .with_timezone(&common.billing_tz)
                            .format("%Y-%m-%d %H:%M:%S"),
                        l.reason,
                        if l.replayed_at.is_some() {
                            " (replayed)"
                        } else {
                            ""
                        }
                    );
                    if let Some(a) = l.attempts.as_array().filter(|a| !a.is_empty()) {
                        for attempt in a {
                            println!("{:>9}- {}", "", attempt.as_str().unwrap_or_default());
                        }
                    }
                }
                println!("{} letters", letters.len());
            }
            DlqAction::Replay { ids, limit } => {
                let done = billing_ops::dlq::replay(&common, &ids, limit).await?;
                println!("replayed {} dead letters", done.len());
            }
        },
        Command::Operator {
            action: OperatorAction::Add { name, role },
        } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']);
            let role: billing_ops::operators::Role = role.parse()?;
            billing_ops::operators::add(&common, &name, role, password).await?;
            println!("account {name} ({}) added", role.as_str());
        }
        Command::Console { args } => {
            eprintln!(
                "console on http://{}/ (log in with an account from `billing operator add`)",
                args.listen
            );
            billing_console::serve(common, args, billing_runtime::shutdown::signal()).await?;
        }
        Command::QuietHours { action } => {
            let q = match action {
                QuietHoursAction::Show => billing_ops::quiet_hours::show(&common).await?,
                QuietHoursAction::Set { start, end } => {
                    billing_ops::quiet_hours::set(&common, &start, &end).await?
                }
            };
            println!("quiet hours {q}");
        }
        Command::Delivery {
            action:
                DeliveryAction::Resolve {
                    bill,
                    channel,
                    resolution,
                },
        } => {
            use billing_ops::delivery::{Resolution, resolve};
            let r = if resolution == "sent" {
                Resolution::Sent
            } else {
                Resolution::Resend
            };
            let done = resolve(&common, bill, &channel, r).await?;
            match (r, done.letter) {
                (Resolution::Sent, _) => println!("bill {bill}: {channel} marked sent"),
                (Resolution::Resend, Some(id)) => println!(
                    "bill {bill}: {channel} reopened at {} attempts; letter {id} replayed",
                    done.attempts
                ),
                (Resolution::Resend, None) => println!("bill {bill}: {channel} reopened"),
            }
        }
        Command::Replay {
            group,
            topic,
            to_earliest,
            to_offset,
            to_time,
            dry_run,
        } => {
            use billing_ops::replay::Target;
            let target = match (to_earliest, to_offset, to_time) {
                (true, _, _) => Target::Earliest,
                (_, Some(o), _) => Target::Offset(o),
                (_, _, Some(t)) => Target::Time(t.with_timezone(&chrono::Utc)),
                _ => anyhow::bail!("one of --to-earliest, --to-offset, --to-time"),
            };
            let r = billing_ops::replay::replay(&common, &group, &topic, target, dry_run).await?;
            println!(
                "{}group {} on {}:",
                if r.dry_run { "(dry run) " } else { "" },
                r.group,
                r.topic
            );
            for m in &r.moves {
                let from = m.from.map_or("-".to_string(), |o| o.to_string());
                println!("  partition {:>3}: {:>10} -> {}", m.partition, from, m.to);
            }
            if !r.dry_run {
                println!(
                    "  committed; {} database offset rows moved",
                    r.database_rows
                );
            }
        }
        Command::Demo {
            members,
            month,
            seed,
            speed,
            gateway_latency_ms,
            gateway_failure_rate,
            gateway_seed,
            timeout_min,
            quiet,
            console,
            no_console,
        } => {
            if !(speed.is_finite() && speed > 0.0 && (0.0..=1.0).contains(&gateway_failure_rate)) {
                eprintln!(
                    "billing: --speed must be positive and --gateway-failure-rate between 0 and 1"
                );
                return Ok(ExitCode::from(2));
            }
            let options = billing_ops::demo::DemoOptions {
                month,
                members,
                seed,
                speed,
                gateway_latency_ms,
                gateway_failure_rate,
                gateway_seed,
                timeout: std::time::Duration::from_secs(timeout_min * 60),
                progress: !quiet,
                console: (!no_console).then_some(console),
            };
            let r = billing_ops::demo::demo(&common, options).await?;
            let t = &r.totals;
            println!(
                "\nbilling month {} (delivered on the clock {})",
                r.month, r.clock
            );
            println!("  bills:        {:>10}   items {:>10}", t.bills, t.items);
            println!("  total:        {:>16} won", t.total_amount);
            println!("  discount:     {:>16} won", t.discount_amount);
            println!("  VAT:          {:>16} won", t.vat_amount);
            println!("  final:        {:>16} won", t.final_amount);
            println!("  deliveries:");
            for d in &r.deliveries {
                println!(
                    "    {:6} {:7} {:>10} ({} attempts)",
                    d.channel, d.status, d.deliveries, d.attempts
                );
            }
            println!(
                "  bills sent:   {:>10}   dead: {}   dead letters recorded: {}",
                r.sent, r.dead, r.dead_letters
            );
            println!("  stages:");
            for s in &r.stages {
                match s.elapsed {
                    Some(e) => println!(
                        "    {:8} {:>9.2} s  {:>10} records  {:>9.0} records/s",
                        s.name,
                        e.as_secs_f64(),
                        s.records,
                        s.records as f64 / e.as_secs_f64().max(1e-9)
                    ),
                    None => println!("    {:8} already done, skipped", s.name),
                }
            }
        }
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

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

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
