//! `chaos`: a billing month played under faults, then checked against what a calm run gives.
//!
//! On a broker of its own (durable: PostgreSQL storage, in database `billing_chaos_broker`)
//! and a schema of its own (`chaos`) beside the stack's registry and PostgreSQL:
//! 1. seeds the month, and adds hostile records to every input topic (members, products,
//!    usage, bills; later the request, retry and dead-letter topics) and honest duplicates;
//! 2. settles it with two `settlement` and two `bill-sink` instances (`dlq` too, two);
//! 3. delivers it with two `dispatch`, `email` and `sms` instances on a simulated clock that
//!    starts on the delivery month's last day at 20:30, half an hour before the system quiet
//!    hours, so holds are exercised;
//! 4. throughout, SIGKILLs a random processor every `--kill-every-ms` and starts it again at
//!    once, for `--kill-seconds` of the delivery phase (and the whole settlement phase);
//!    restarts the broker with SIGKILL once and PostgreSQL (fast shutdown) once;
//! 5. checks and prints: every member billed once to the rules; every bill sent exactly once or
//!    dead, counted at the provider; submissions after the provider had accepted; no SMS
//!    without a recorded email give-up; one `undeliverable` letter per dead bill; no send in
//!    quiet hours or a member's window; every hostile record a dead letter; and each bill's
//!    delivery history equal to the one the provider's seeded draws give without kills.
//!
//! Exits non-zero when a check fails. Run by `scripts/chaos` (small in CI, larger by flag).

mod fleet;
mod hostile;
mod verify;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use billing_domain::{BillingMonth, generator::Generator};
use billing_messaging::{SimulatedGateway, SimulationArgs};
use billing_runtime::{Clock, CommonArgs};
use billing_schema::Registry;
use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use clap::Parser;
use diesel_async::SimpleAsyncConnection;

use fleet::{Broker, Fleet};

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Play a billing month under faults and check it"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Members seeded.
    #[arg(long, default_value_t = 1_000)]
    members: i64,
    #[arg(long, default_value = "2026-11")]
    month: BillingMonth,
    /// Seeds the month, the provider's draws and the kills.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// One SIGKILL every so often.
    #[arg(long, default_value_t = 1_500)]
    kill_every_ms: u64,
    /// How long into delivery the kills go on.
    #[arg(long, default_value_t = 40)]
    kill_seconds: u64,
    /// When, into delivery, the broker is SIGKILLed and started again.
    #[arg(long, default_value_t = 8)]
    broker_restart_at: u64,
    /// When, into delivery, PostgreSQL restarts.
    #[arg(long, default_value_t = 20)]
    postgres_restart_at: u64,
    /// The run's own broker.
    #[arg(long, default_value = "127.0.0.1:19092")]
    broker: String,
    /// Simulated seconds per real second during delivery.
    #[arg(long, default_value_t = 1_200.0)]
    speed: f64,
    /// The provider's transient failure rate: high, so retries, SMS and dead bills all happen.
    #[arg(long, default_value_t = 0.5)]
    failure_rate: f64,
    /// Attempts per channel.
    #[arg(long, default_value_t = 3)]
    attempts: i32,
    /// Give up waiting for the month after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

const SCHEMA: &str = "chaos";
const PREFIX: &str = "chaos.";

#[global_allocator]
static ALLOCATOR: billing_runtime::MiMalloc = billing_runtime::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    billing_runtime::telemetry::init();
    let cli = Cli::parse();
    let started = Instant::now();
    let common = prepare_database(&cli).await?;
    let log_dir = std::env::temp_dir().join(format!("billing-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir)?;
    let storage = billing_ops::stack::fresh_broker_database(
        &cli.common.database_url,
        "billing_chaos_broker",
    )?;
    let mut broker = Broker::start(&cli.broker, &storage, &log_dir)?;
    let result = play(&cli, &common, &mut broker, &log_dir).await;
    broker.stop();
    let (verdict, faults) = result?;
    report(&cli, &verdict, &faults, started.elapsed(), &log_dir)
}

/// A fresh schema for the run's tables, migrated; the common settings pointing at it and at
/// the run's broker.
async fn prepare_database(cli: &Cli) -> anyhow::Result<CommonArgs> {
    let mut conn = billing_db::connect(&cli.common.database_url).await?;
    conn.batch_execute(&format!(
        "drop schema if exists {SCHEMA} cascade; create schema {SCHEMA}"
    ))
    .await?;
    let mut common = cli.common.clone();
    common.database_url = billing_db::with_search_path(&cli.common.database_url, SCHEMA);
    billing_db::migrate(&common.database_url).await?;
    common.kafka_brokers.clone_from(&cli.broker);
    common.topic_prefix = PREFIX.to_string();
    Ok(common)
}

/// Faults injected, for the report.
#[derive(Debug, Default)]
struct Faults {
    kills: u32,
    exits: u32,
    broker_restarts: u32,
    postgres_restarts: u32,
    hostile: usize,
    repeats: usize,
}

async fn play(
    cli: &Cli,
    common: &CommonArgs,
    broker: &mut Broker,
    log_dir: &std::path::Path,
) -> anyhow::Result<(verify::Verdict, Faults)> {
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    wait_until("the broker", deadline, || {
        billing_ops::stack::broker_answers(&common.kafka_brokers)
    })
    .await?;
    // The broker as `billing stack up` runs it (see `tune_broker_storage`).
    billing_ops::stack::tune_broker_storage(broker.storage())?;
    billing_ops::topics::ensure(common).await?;
    let options = billing_ops::seed::SeedOptions {
        month: cli.month,
        members: u64::try_from(cli.members)?,
        seed: cli.seed,
    };
    billing_ops::seed::seed(common, options, None).await?;
    let g = Generator::new(cli.seed, cli.month, common.billing_tz);
    let draws = SimulationArgs {
        mailbox: "memory".into(),
        ..simulation(cli)
    };
    let gateway = SimulatedGateway::new("email", &draws, None).map_err(|e| anyhow::anyhow!(e))?;
    let expected = verify::expected(
        &g,
        cli.month,
        cli.members,
        common.billing_tz,
        &gateway,
        cli.attempts,
    )?;
    let registry = Registry::new(&common.schema_registry_url)?;
    let mut injector = hostile::Injector::new(common, &registry)?;
    injector
        .settlement_inputs(&g, cli.members, cli.month)
        .await?;

    let bin_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .context("no binary directory")?;
    let mut fleet = Fleet::new(bin_dir, log_dir.to_path_buf(), env(cli, common), cli.seed);
    let mut faults = Faults::default();
    settle(cli, common, &mut fleet, broker, &expected, deadline).await?;
    injector.delivery_inputs(cli.month, cli.members).await?;
    faults.hostile = injector.injected.len();
    faults.repeats = injector.repeats;
    let clock = Clock::simulated(delivery_start(cli.month, common.billing_tz)?, cli.speed);
    let parts = (&expected, injector.injected.as_slice(), &clock);
    deliver(
        cli,
        common,
        &mut fleet,
        broker,
        &mut faults,
        parts,
        deadline,
    )
    .await?;
    fleet.stop(Duration::from_secs(15));
    faults.kills = fleet.kills;
    faults.exits = fleet.exits + broker.exits;
    let mut conn = connect(&common.database_url, deadline).await?;
    let verdict = verify::verify(
        &mut conn,
        &expected,
        &injector.injected,
        common.billing_tz,
        &clock,
    )
    .await?;
    Ok((verdict, faults))
}

fn simulation(cli: &Cli) -> SimulationArgs {
    SimulationArgs {
        latency_ms: 20,
        failure_rate: cli.failure_rate,
        seed: cli.seed,
        mailbox: "postgres".into(),
    }
}

/// Every processor's variables: the run's stack, short consumer sessions (rebalances within
/// seconds of a kill), a provider recording what it accepts, short backoffs and leases.
fn env(cli: &Cli, common: &CommonArgs) -> Vec<(String, String)> {
    let sim = simulation(cli);
    let attempts = cli.attempts.to_string();
    let props: Vec<String> = common
        .kafka_properties
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain([
            "session.timeout.ms=6000".into(),
            "heartbeat.interval.ms=1000".into(),
        ])
        .collect();
    [
        ("DATABASE_URL", common.database_url.clone()),
        ("KAFKA_BROKERS", common.kafka_brokers.clone()),
        ("SCHEMA_REGISTRY_URL", common.schema_registry_url.clone()),
        ("BILLING_TZ", common.billing_tz.name().to_string()),
        ("BILLING_TOPIC_PREFIX", common.topic_prefix.clone()),
        ("BILLING_PARTITIONS", common.partitions.to_string()),
        ("KAFKA_PROPERTIES", props.join(",")),
        ("METRICS_ADDR", "127.0.0.1:0".into()),
        ("RUST_LOG", "warn".into()),
        ("GATEWAY_LATENCY_MS", sim.latency_ms.to_string()),
        ("GATEWAY_FAILURE_RATE", sim.failure_rate.to_string()),
        ("GATEWAY_SEED", sim.seed.to_string()),
        ("GATEWAY_MAILBOX", sim.mailbox),
        ("EMAIL_ATTEMPTS", attempts.clone()),
        ("SMS_ATTEMPTS", attempts),
        ("EMAIL_BACKOFF_MS", "300".into()),
        ("SMS_BACKOFF_MS", "300".into()),
        ("EMAIL_CLAIM_LEASE_MS", "2000".into()),
        ("SMS_CLAIM_LEASE_MS", "2000".into()),
        ("DISPATCH_INTERVAL_SECS", "3600".into()),
        ("DISPATCH_POLL_MS", "200".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Settlement and the sink, two instances each, killed throughout, until every bill is in.
async fn settle(
    cli: &Cli,
    common: &CommonArgs,
    fleet: &mut Fleet,
    broker: &mut Broker,
    expected: &verify::Expected,
    deadline: Instant,
) -> anyhow::Result<()> {
    let run_id = format!("chaos-{}", std::process::id());
    fleet.start("dlq", 2, &[])?;
    fleet.start(
        "settlement",
        2,
        &[
            ("SETTLEMENT_MONTH", cli.month.to_string()),
            ("SETTLEMENT_RUN_ID", run_id),
        ],
    )?;
    fleet.start("bill-sink", 2, &[])?;
    let bills = i64::try_from(expected.bills.len())?;
    let mut next_kill = Instant::now();
    loop {
        fleet.tend()?;
        broker.tend().await?;
        if Instant::now() >= next_kill {
            fleet.kill_one()?;
            next_kill = Instant::now() + Duration::from_millis(cli.kill_every_ms);
        }
        let loaded = count(
            &common.database_url,
            "select count(*)::bigint as n from bill",
        )
        .await;
        if fleet.finished("settlement") && loaded.is_some_and(|n| n >= bills) {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("settlement did not finish: {loaded:?} of {bills} bills loaded");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The delivery month's last day at 20:30, local time.
fn delivery_start(month: BillingMonth, tz: chrono_tz::Tz) -> anyhow::Result<DateTime<Utc>> {
    let last_day = month
        .next()
        .next()
        .first_day()
        .pred_opt()
        .context("no day")?;
    let at = last_day.and_time(NaiveTime::from_hms_opt(20, 30, 0).context("time")?);
    tz.from_local_datetime(&at)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .context("no such local time")
}

/// Delivery on the simulated `clock`, with the kills and the two restarts, until every bill
/// is finished (or the deadline passes).
async fn deliver(
    cli: &Cli,
    common: &CommonArgs,
    fleet: &mut Fleet,
    broker: &mut Broker,
    faults: &mut Faults,
    (expected, injected, clock): (&verify::Expected, &[hostile::Injected], &Clock),
    deadline: Instant,
) -> anyhow::Result<()> {
    let with_clock = [("BILLING_CLOCK", clock.to_string())];
    for name in ["dispatch", "email", "sms"] {
        fleet.start(name, 2, &with_clock)?;
    }
    let began = Instant::now();
    let at = |s: u64| began + Duration::from_secs(s);
    let (kill_until, broker_at, pg_at) = (
        at(cli.kill_seconds),
        at(cli.broker_restart_at),
        at(cli.postgres_restart_at),
    );
    let mut next_kill = Instant::now();
    let url = &common.database_url;
    loop {
        fleet.tend()?;
        broker.tend().await?;
        let now = Instant::now();
        if now < kill_until && now >= next_kill {
            fleet.kill_one()?;
            next_kill = now + Duration::from_millis(cli.kill_every_ms);
        }
        if faults.broker_restarts == 0 && now >= broker_at {
            tracing::warn!("restarting the broker");
            broker.restart()?;
            faults.broker_restarts += 1;
        }
        if faults.postgres_restarts == 0 && now >= pg_at {
            tracing::warn!("restarting PostgreSQL");
            tokio::task::spawn_blocking(billing_ops::stack::restart_local_postgres).await??;
            faults.postgres_restarts += 1;
        }
        if now >= kill_until && finished(url, expected, injected).await {
            // Let the last offsets and rows settle before the processes stop.
            tokio::time::sleep(Duration::from_secs(3)).await;
            return Ok(());
        }
        if now > deadline {
            tracing::error!(
                timeout_secs = cli.timeout_secs,
                "the month did not finish; checking what there is"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every bill sent or dead, every dead bill's letter recorded, every hostile record lettered.
async fn finished(url: &str, expected: &verify::Expected, injected: &[hostile::Injected]) -> bool {
    let bills = i64::try_from(expected.bills.len()).unwrap_or(i64::MAX);
    let done = count(
        url,
        "select count(distinct bill_id)::bigint as n from delivery where status in ('sent', 'dead')",
    )
    .await;
    let dead = count(
        url,
        "select count(*)::bigint as n from delivery where status = 'dead'",
    )
    .await;
    let letters = count(
        url,
        "select count(*)::bigint as n from dead_letter where stage = 'undeliverable'",
    )
    .await;
    let hostile_letters = count(
        url,
        "select count(distinct (source_topic, source_partition, source_offset))::bigint as n
         from dead_letter where stage <> 'undeliverable'",
    )
    .await;
    done == Some(bills)
        && dead.is_some()
        && letters >= dead
        && hostile_letters.is_some_and(|n| n >= i64::try_from(injected.len()).unwrap_or(0))
}

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// A count, or `None` while PostgreSQL is away (it restarts during the run).
async fn count(url: &str, sql: &str) -> Option<i64> {
    use diesel_async::RunQueryDsl;
    let mut conn = billing_db::connect(url).await.ok()?;
    diesel::sql_query(sql)
        .get_result::<N>(&mut conn)
        .await
        .ok()
        .map(|r| r.n)
}

async fn connect(url: &str, deadline: Instant) -> anyhow::Result<diesel_async::AsyncPgConnection> {
    loop {
        match billing_db::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn wait_until<F, Fut>(what: &str, deadline: Instant, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    while !ready().await {
        if Instant::now() > deadline {
            anyhow::bail!("{what} never answered");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

fn report(
    cli: &Cli,
    v: &verify::Verdict,
    f: &Faults,
    elapsed: Duration,
    log_dir: &std::path::Path,
) -> anyhow::Result<()> {
    println!(
        "chaos: {} members, seed {}, {:.0} s\n  faults: {} kills, {} crashes restarted, {} broker restart, {} PostgreSQL restart, {} hostile records, {} usage records sent twice\n  outcome: {} bills, {} sent by email, {} by SMS, {} dead; hostile records lettered {}/{}\n  duplicates {}, lost {}, submissions after acceptance {}; sent_at to acceptance at most {} simulated s",
        cli.members,
        cli.seed,
        elapsed.as_secs_f64(),
        f.kills,
        f.exits,
        f.broker_restarts,
        f.postgres_restarts,
        f.hostile,
        f.repeats,
        v.bills,
        v.sent_email,
        v.sent_sms,
        v.dead,
        v.hostile_lettered,
        f.hostile,
        v.duplicates,
        v.lost,
        v.resubmissions,
        v.acceptance_lag_max,
    );
    if v.failures.is_empty() && v.duplicates == 0 && v.lost == 0 {
        println!("  every check passed (logs: {})", log_dir.display());
        return Ok(());
    }
    for failure in &v.failures {
        println!("  FAILED: {failure}");
    }
    anyhow::bail!(
        "{} checks failed, {} duplicates, {} lost; logs in {}",
        v.failures.len(),
        v.duplicates,
        v.lost,
        log_dir.display()
    )
}
