//! `billing demo`: a whole billing month on the local stack, end to end.
//!
//! 1. The stack comes up, migrations and topics are in place.
//! 2. The month is seeded (skipped when its members are already on the topics: the generator is
//!    deterministic, so a second seed would only repeat the changelog and the usage).
//! 3. The month is settled (skipped when all its bills are already in PostgreSQL).
//! 4. The following month's delivery days are played on a simulated clock that every process
//!    reads (`BILLING_CLOCK`): the real `dispatch`, `email`, `sms` and `dlq` binaries run as
//!    separate processes, dispatch passes every simulated hour, quiet hours and
//!    do-not-disturb windows hold messages by that clock, and the gateways keep their real
//!    latency. The demo ends when every bill of the month is sent or dead.
//! 5. A report, read back from PostgreSQL: bills and their sums, deliveries by channel and
//!    outcome, dead letters, and time and throughput per stage.
//!
//! A second run on the same stack finds everything done and changes nothing.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use billing_domain::BillingMonth;
use billing_runtime::{Clock, CommonArgs};
use billing_schema::catalogue::MEMBERS;
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text},
};
use diesel_async::RunQueryDsl;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rdkafka::consumer::BaseConsumer;
use tokio::process::{Child, Command};

use crate::{OpsError, settle::MonthTotals};

/// How to play the month.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub month: BillingMonth,
    pub members: u64,
    pub seed: u64,
    /// Simulated seconds per real second.
    pub speed: f64,
    pub gateway_latency_ms: u64,
    pub gateway_failure_rate: f64,
    pub gateway_seed: u64,
    /// Give up when the month has not finished after this long (real time).
    pub timeout: Duration,
    /// Progress bars on the terminal.
    pub progress: bool,
    /// Where the console listens during the delivery, with a one-time login (none: no console).
    pub console: Option<std::net::SocketAddr>,
}

/// How long nothing may move, once the delivery month is over, before the demo says it
/// stalled.
const STALL: Duration = Duration::from_secs(60);

/// One stage's time.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    /// `None` when the stage was already done and skipped.
    pub elapsed: Option<Duration>,
    pub records: u64,
}

/// Deliveries of one channel in one state.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct DeliveryCount {
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = BigInt)]
    pub deliveries: i64,
    #[diesel(sql_type = BigInt)]
    pub attempts: i64,
}

/// The final report, read from PostgreSQL.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub month: BillingMonth,
    pub totals: MonthTotals,
    pub deliveries: Vec<DeliveryCount>,
    /// Bills of the month that ended sent / dead.
    pub sent: i64,
    pub dead: i64,
    /// Every dead letter recorded (they carry no month: quarantined records of any stage too).
    pub dead_letters: i64,
    pub stages: Vec<Stage>,
    pub clock: String,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(url: &str, sql: &str, month: &str) -> Result<i64, OpsError> {
    let mut conn = billing_db::connect(url).await?;
    let rows: Vec<N> = diesel::sql_query(sql)
        .bind::<Text, _>(month)
        .load(&mut conn)
        .await?;
    Ok(rows.as_slice().first().map_or(0, |r| r.n))
}

const BILLS: &str = "select count(*)::bigint as n from bill where billing_month = $1";
/// The delivery's progress, in one statement on one connection. Bills of month M have ids
/// `bill_id(M, 0)..=bill_id(M, MAX_MEMBER_ID)` (`$1`, `$2`), so no join with `bill`; a bill
/// is finished when it is sent (one `sent` row at most: `delivery_sent_once`) or dead and never
/// sent. At a million bills this is about 0.4 s of PostgreSQL; the four joined counts it
/// replaced took 2.2 s, run back to back every half second (a core taken from the processors
/// being shown).
const PROGRESS: &str = "
    select (select count(*) from dispatch where bill_id between $1 and $2)::bigint as dispatched,
           count(*) filter (where status = 'sent' and channel = 'email')::bigint as email,
           count(*) filter (where status = 'sent' and channel = 'sms')::bigint as sms,
           (count(*) filter (where status = 'sent')
            + (select count(distinct d.bill_id) from delivery d
               where d.bill_id between $1 and $2 and d.status = 'dead'
                 and not exists (select 1 from delivery s
                                 where s.bill_id = d.bill_id and s.status = 'sent')))::bigint as finished
    from delivery where bill_id between $1 and $2";

/// Bills of the month finished, dispatched, and sent by email and by SMS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, QueryableByName)]
struct Progress {
    #[diesel(sql_type = BigInt)]
    finished: i64,
    #[diesel(sql_type = BigInt)]
    dispatched: i64,
    #[diesel(sql_type = BigInt)]
    email: i64,
    #[diesel(sql_type = BigInt)]
    sms: i64,
}

async fn progress(
    conn: &mut diesel_async::AsyncPgConnection,
    month: BillingMonth,
) -> Result<Progress, OpsError> {
    use billing_domain::{rules::bill_id, validate::MAX_MEMBER_ID};
    let rows: Vec<Progress> = diesel::sql_query(PROGRESS)
        .bind::<BigInt, _>(bill_id(month, 0))
        .bind::<BigInt, _>(bill_id(month, MAX_MEMBER_ID))
        .load(conn)
        .await?;
    Ok(rows.as_slice().first().copied().unwrap_or_default())
}

/// Records on the members topic (a seeded month's members are all there).
fn members_on_topic(common: &CommonArgs) -> Result<i64, OpsError> {
    let consumer: BaseConsumer = common
        .kafka()
        .consumer_config("billing-demo-probe")
        .create()?;
    let topic = common.catalogue().name(&MEMBERS.spec);
    let ends = billing_runtime::consumer::end_offsets(&consumer, &[topic])?;
    Ok(ends.values().map(|(low, high)| high - low).sum())
}

fn bar(multi: &MultiProgress, len: u64, label: &str, show: bool) -> ProgressBar {
    let b = if show {
        multi.add(ProgressBar::new(len))
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{label:>12} [{{bar:40}}] {{pos:>9}}/{{len}} {{msg}}"
    )) {
        b.set_style(style.progress_chars("=> "));
    }
    b
}

/// The processor binaries sit next to the `billing` executable.
fn binary(name: &str) -> Result<PathBuf, OpsError> {
    let exe = std::env::current_exe().map_err(|e| OpsError::Stack(e.to_string()))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(OpsError::Stack(format!(
            "{} not found next to {}: build the workspace's binaries",
            name,
            exe.display()
        )))
    }
}

fn spawn(
    name: &str,
    common: &CommonArgs,
    clock: &Clock,
    options: &DemoOptions,
    log_dir: &std::path::Path,
) -> Result<Child, OpsError> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))
        .map_err(|e| OpsError::Stack(e.to_string()))?;
    let err = log
        .try_clone()
        .map_err(|e| OpsError::Stack(e.to_string()))?;
    Command::new(binary(name)?)
        .env("DATABASE_URL", &common.database_url)
        .env("KAFKA_BROKERS", &common.kafka_brokers)
        .env("SCHEMA_REGISTRY_URL", &common.schema_registry_url)
        .env("BILLING_TZ", common.billing_tz.name())
        .env("BILLING_TOPIC_PREFIX", &common.topic_prefix)
        .env("BILLING_PARTITIONS", common.partitions.to_string())
        .env("BILLING_CLOCK", clock.to_string())
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("GATEWAY_LATENCY_MS", options.gateway_latency_ms.to_string())
        .env(
            "GATEWAY_FAILURE_RATE",
            options.gateway_failure_rate.to_string(),
        )
        .env("GATEWAY_SEED", options.gateway_seed.to_string())
        .env("DISPATCH_INTERVAL_SECS", "3600")
        .env("DISPATCH_POLL_MS", "200")
        .env(
            "CONSOLE_LISTEN",
            options
                .console
                .map_or_else(|| "127.0.0.1:8090".to_string(), |a| a.to_string()),
        )
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| OpsError::Stack(format!("cannot start {name}: {e}")))
}

/// Plays the month; see the module docs.
pub async fn demo(common: &CommonArgs, options: DemoOptions) -> Result<DemoReport, OpsError> {
    let month = options.month;
    let month_s = month.to_string();
    let url = common.database_url.clone();
    let mut stages = Vec::new();
    crate::stack::up(common).await?;
    crate::topics::migrate(common).await?;

    // Seed, unless the members are already there.
    let members = i64::try_from(options.members).unwrap_or(i64::MAX);
    if members_on_topic(common)? >= members {
        stages.push(Stage {
            name: "seed",
            elapsed: None,
            records: 0,
        });
    } else {
        let bar = options
            .progress
            .then(|| crate::seed::progress_bar(options.members));
        let r = crate::seed::seed(
            common,
            crate::seed::SeedOptions {
                month,
                members: options.members,
                seed: options.seed,
            },
            bar,
        )
        .await?;
        stages.push(Stage {
            name: "seed",
            elapsed: Some(r.elapsed),
            records: r.members + r.products + r.usage_records,
        });
    }

    // Settle, unless every bill is in.
    if count(&url, BILLS, &month_s).await? >= members {
        stages.push(Stage {
            name: "settle",
            elapsed: None,
            records: 0,
        });
    } else {
        if options.progress {
            eprintln!("settling {month} ...");
        }
        let started = Instant::now();
        let r = crate::settle::settle(common, month).await?;
        stages.push(Stage {
            name: "settle",
            elapsed: Some(started.elapsed()),
            records: u64::try_from(r.totals.bills).unwrap_or(0),
        });
    }
    let bills = count(&url, BILLS, &month_s).await?;

    // Deliver, on a simulated clock from the first day of the following month.
    let (start, _) = month.next().bounds(common.billing_tz);
    let clock = Clock::simulated(start, options.speed);
    let mut watch = billing_db::connect(&url).await?;
    let finished_before = progress(&mut watch, month).await?.finished;
    let delivery_started = Instant::now();
    if finished_before < bills {
        let log_dir = std::env::temp_dir().join(format!("billing-demo-{}", std::process::id()));
        std::fs::create_dir_all(&log_dir).map_err(|e| OpsError::Stack(e.to_string()))?;
        let mut children = Vec::new();
        for name in ["dlq", "sms", "email", "dispatch"] {
            children.push((name, spawn(name, common, &clock, &options, &log_dir)?));
        }
        // The console on the same clock, with an account that lives as long as this demo.
        let login = match options.console {
            Some(addr) => {
                let login = crate::operators::one_time(common).await?;
                children.push((
                    "console",
                    spawn("console", common, &clock, &options, &log_dir)?,
                ));
                eprintln!(
                    "console: http://{addr}/ (log in as {} with password {}; the account is disabled when the demo ends)",
                    login.0, login.1
                );
                Some(login.0)
            }
            None => None,
        };
        let multi = MultiProgress::new();
        let len = u64::try_from(bills).unwrap_or(0);
        let dispatched = bar(&multi, len, "dispatched", options.progress);
        let email = bar(&multi, len, "email sent", options.progress);
        let sms = bar(&multi, len, "sms sent", options.progress);
        let done = bar(&multi, len, "finished", options.progress);
        let (_, delivery_end) = month.next().bounds(common.billing_tz);
        let mut last_progress = Progress::default();
        let mut last_change = Instant::now();
        let outcome = loop {
            let asked = Instant::now();
            // A connection lost (PostgreSQL restarted under the demo) is opened again once.
            let seen = match progress(&mut watch, month).await {
                Ok(seen) => seen,
                Err(_) => {
                    watch = billing_db::connect(&url).await?;
                    progress(&mut watch, month).await?
                }
            };
            let took = asked.elapsed();
            let finished = seen.finished;
            dispatched.set_position(u64::try_from(seen.dispatched).unwrap_or(0));
            email.set_position(u64::try_from(seen.email).unwrap_or(0));
            sms.set_position(u64::try_from(seen.sms).unwrap_or(0));
            if seen != last_progress {
                last_progress = seen;
                last_change = Instant::now();
            }
            done.set_position(u64::try_from(finished).unwrap_or(0));
            done.set_message(
                clock
                    .now()
                    .with_timezone(&common.billing_tz)
                    .format("clock %m-%d %H:%M")
                    .to_string(),
            );
            if finished >= bills {
                break Ok(());
            }
            // Past the delivery month every bill is due: nothing moving then is a stall
            // (requests on topics that are gone, a processor wedged), not a quiet hour.
            if finished < bills && clock.now() > delivery_end && last_change.elapsed() > STALL {
                break Err(OpsError::Stack(format!(
                    "stalled: nothing moved for {STALL:?} after the delivery month ended ({finished} of {bills} bills finished, {} dispatched, {} sent by email, {} by SMS); if the stack was purged or its topics deleted while the database kept its rows, run `billing stack down --purge` and start again; logs in {}",
                    seen.dispatched,
                    seen.email,
                    seen.sms,
                    log_dir.display()
                )));
            }
            if delivery_started.elapsed() > options.timeout {
                break Err(OpsError::Stack(format!(
                    "{finished} of {bills} bills finished after {:?}; logs in {}",
                    options.timeout,
                    log_dir.display()
                )));
            }
            // A processor that exits early fails the demo (the others are stopped below). The
            // console is not a processor: if it cannot run (its port taken), the month goes on.
            let exited = children.iter_mut().find_map(|(name, child)| {
                let status = child.try_wait().ok().flatten()?;
                (*name != "console").then_some((*name, status))
            });
            if let Some((name, status)) = exited {
                break Err(OpsError::Stack(format!(
                    "{name} exited ({status}); its log: {}",
                    log_dir.join(format!("{name}.log")).display()
                )));
            }
            // Watching takes at most a fifth of one core from what it watches.
            tokio::time::sleep((took * 4).max(Duration::from_millis(500))).await;
        };
        for b in [&dispatched, &email, &sms, &done] {
            b.finish();
        }
        for (_, child) in &mut children {
            if let Some(pid) = child.id() {
                // SIGTERM: each processor drains and commits before it exits.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
        }
        for (_, child) in &mut children {
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
        if let Some(name) = login {
            crate::operators::disable(common, &name).await?;
        }
        outcome?;
    }
    let finished_now = progress(&mut watch, month).await?.finished;
    stages.push(Stage {
        name: "deliver",
        elapsed: (finished_before < bills).then(|| delivery_started.elapsed()),
        records: u64::try_from(finished_now - finished_before).unwrap_or(0),
    });

    let mut conn = billing_db::connect(&url).await?;
    let deliveries: Vec<DeliveryCount> = diesel::sql_query(
        "select d.channel, d.status, count(*)::bigint as deliveries, sum(d.attempts)::bigint as attempts
         from delivery d join bill b on b.id = d.bill_id where b.billing_month = $1
         group by 1, 2 order by 1, 2",
    )
    .bind::<Text, _>(&month_s)
    .load(&mut conn)
    .await?;
    Ok(DemoReport {
        month,
        totals: crate::settle::month_totals(&url, month).await?,
        deliveries,
        sent: count(&url, "select count(distinct d.bill_id)::bigint as n from delivery d join bill b on b.id = d.bill_id where b.billing_month = $1 and d.status = 'sent'", &month_s).await?,
        dead: count(&url, "select count(distinct d.bill_id)::bigint as n from delivery d join bill b on b.id = d.bill_id where b.billing_month = $1 and d.status = 'dead'", &month_s).await?,
        dead_letters: {
            use diesel::QueryDsl;
            billing_db::schema::dead_letter::table
                .count()
                .get_result(&mut conn)
                .await?
        },
        stages,
        clock: clock.to_string(),
    })
}
