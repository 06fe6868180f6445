//! The local stack: PostgreSQL, the nisshi Kafka-API broker and the schema registry.
//!
//! `up` is idempotent: whatever already answers at the configured address is used as it is;
//! anything missing is installed (PostgreSQL from Debian's packages, nisshi built once with
//! the machine's nightly toolchain and cached), started in the background with its log and
//! pid file under `$BILLING_HOME/stack` (default `~/.cache/billing`), and waited for. Then the
//! migrations run, the catalogue's topics are created and its schemas registered.

use std::{
    fs::{self, File},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use billing_runtime::CommonArgs;
use diesel_async::SimpleAsyncConnection;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};

use crate::OpsError;

/// The nisshi release the stack runs (needs rustc >= 1.96: built with nightly).
pub const NISSHI_VERSION: &str = "0.8.1";
/// The fallback broker where no nightly toolchain exists.
pub const TANSU_VERSION: &str = "0.6.0";
const WAIT: Duration = Duration::from_secs(90);

fn err(msg: impl Into<String>) -> OpsError {
    OpsError::Stack(msg.into())
}

/// Where the stack keeps binaries, data, logs and pid files.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("BILLING_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    base.join(".cache").join("billing")
}

fn stack_dir() -> Result<PathBuf, OpsError> {
    let dir = home().join("stack");
    fs::create_dir_all(&dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The parts of a `postgres://user:password@host:port/db` URL the stack needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUrl {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl PgUrl {
    /// Parses the URL forms `billing` documents.
    pub fn parse(url: &str) -> Result<Self, OpsError> {
        let bad = || {
            err(format!(
                "DATABASE_URL is not postgres://user:password@host[:port]/database: {}",
                mask(url)
            ))
        };
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(bad)?;
        let rest = rest.split('?').next().unwrap_or(rest);
        let (userinfo, hostpath) = rest.rsplit_once('@').ok_or_else(bad)?;
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (hostport, database) = hostpath.split_once('/').ok_or_else(bad)?;
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
            None => (hostport, 5432),
        };
        let plain =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain(user) || !plain(database) || password.contains('\'') {
            return Err(err(
                "DATABASE_URL user and database must be plain identifiers for the local stack",
            ));
        }
        Ok(PgUrl {
            user: user.into(),
            password: password.into(),
            host: host.into(),
            port,
            database: database.into(),
        })
    }
}

/// The URL with any password replaced by `***`, for printing.
pub fn mask(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((u, _)) => format!("{}{}:***{}", &url[..s + 3], u, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn host_port(url: &str) -> Result<(String, u16), OpsError> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split(['/', ',']).next().unwrap_or(rest);
    let (h, p) = hostport
        .rsplit_once(':')
        .ok_or_else(|| err(format!("no port in {url}")))?;
    let port = p.parse().map_err(|_| err(format!("bad port in {url}")))?;
    Ok((
        h.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
    ))
}

fn is_local(host: &str) -> bool {
    matches!(host, "127.0.0.1" | "localhost" | "::1" | "0.0.0.0")
}

fn run(cmd: &mut Command) -> Result<String, OpsError> {
    let out = cmd
        .output()
        .map_err(|e| err(format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn wait_for<F, Fut>(
    what: &str,
    process: Option<(&str, u32)>,
    mut check: F,
) -> Result<(), OpsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if check().await {
            return Ok(());
        }
        if let Some((name, pid)) = process
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            let log = stack_dir()?.join(format!("{name}.log"));
            let last = fs::read_to_string(&log)
                .ok()
                .and_then(|t| t.lines().last().map(str::to_string));
            return Err(err(format!(
                "{what} exited at start: {} (log: {})",
                last.unwrap_or_default(),
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(err(format!(
        "{what} did not answer within {}s (see {})",
        WAIT.as_secs(),
        stack_dir()?.display()
    )))
}

/// Whether PostgreSQL answers at `url`.
pub async fn postgres_answers(url: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(3), billing_db::connect(url)).await,
        Ok(Ok(_))
    )
}

/// Whether a Kafka-API broker answers at `brokers`.
pub async fn broker_answers(brokers: &str) -> bool {
    let brokers = brokers.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: Result<BaseConsumer, _> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("log_level", "0")
            .create();
        consumer.is_ok_and(|c| c.fetch_metadata(None, Duration::from_secs(2)).is_ok())
    })
    .await
    .unwrap_or(false)
}

/// Whether the schema registry answers at `url`.
pub async fn registry_answers(url: &str) -> bool {
    let client = reqwest::Client::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(3), client.get(format!("{}/subjects", url.trim_end_matches('/'))).send()).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

fn as_postgres(args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).args(args);
    c
}

/// Installs (if missing) and starts the machine's PostgreSQL cluster, and creates the role
/// and database of `url`.
fn start_local_postgres(url: &PgUrl) -> Result<(), OpsError> {
    if !have("pg_lsclusters") {
        tracing::info!("installing postgresql from Debian's packages");
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    match first_cluster()? {
        Some(c) => {
            if c.status != "online" {
                run(Command::new("pg_ctlcluster").args([&c.version, &c.name, "start"]))?;
            }
        }
        None => {
            let versions = run(Command::new("ls").arg("/usr/lib/postgresql"))?;
            let version = versions
                .split_whitespace()
                .last()
                .ok_or_else(|| err("no PostgreSQL version installed"))?
                .to_string();
            run(Command::new("pg_createcluster").args([version.as_str(), "main", "--start"]))?;
        }
    }
    wait_for_local_postgres("local PostgreSQL did not start")?;
    // The bill sink's writers skip the per-row check of `bill_item`'s foreign key (they insert
    // items only with their bills): see billing_bill_sink's writer connections.
    let role = format!(
        "do $$ begin if not exists (select from pg_roles where rolname = '{u}') then \
         create role {u} login password '{p}'; else alter role {u} login password '{p}'; end if; \
         if current_setting('server_version_num')::int >= 150000 then \
         execute 'grant set on parameter session_replication_role to {u}'; end if; end $$;",
        u = url.user,
        p = url.password
    );
    run(&mut as_postgres(&[
        "psql",
        "-v",
        "ON_ERROR_STOP=1",
        "-qc",
        &role,
    ]))?;
    let exists = run(&mut as_postgres(&[
        "psql",
        "-qAtc",
        &format!(
            "select 1 from pg_database where datname = '{}'",
            url.database
        ),
    ]))?;
    if exists.trim() != "1" {
        run(&mut as_postgres(&[
            "createdb",
            "-O",
            &url.user,
            &url.database,
        ]))?;
    }
    Ok(())
}

/// The broker's storage engine URL, from `BILLING_BROKER_STORAGE`: `postgres` (default:
/// durable, in database `<database>_broker` on the same server), `sqlite` (durable, a file
/// in the stack dir) or `memory` (fastest, lost on stop: for tests and benchmarks).
fn broker_storage(database_url: &str) -> Result<String, OpsError> {
    let choice = std::env::var("BILLING_BROKER_STORAGE").unwrap_or_else(|_| "postgres".to_string());
    match choice.as_str() {
        "memory" => Ok("memory://nisshi/".to_string()),
        // nisshi reads the sqlite path relative to its working directory, the stack dir.
        "sqlite" => Ok("sqlite://broker.db".to_string()),
        "postgres" => {
            let url = PgUrl::parse(database_url)?;
            let db = format!("{}_broker", url.database);
            if is_local(&url.host) {
                let exists = run(&mut as_postgres(&[
                    "psql",
                    "-p",
                    &url.port.to_string(),
                    "-qAtc",
                    &format!("select 1 from pg_database where datname = '{db}'"),
                ]))?;
                if exists.trim() != "1" {
                    run(&mut as_postgres(&[
                        "createdb",
                        "-p",
                        &url.port.to_string(),
                        "-O",
                        &url.user,
                        &db,
                    ]))?;
                }
            }
            Ok(storage_url(&url, &db))
        }
        other => Err(err(format!(
            "BILLING_BROKER_STORAGE must be postgres, sqlite or memory, not {other:?}"
        ))),
    }
}

/// The broker's storage URL for database `db` on `url`'s server. The broker's client
/// verifies TLS strictly; the local server's certificate is self-signed, and the connection
/// never leaves the machine.
fn storage_url(url: &PgUrl, db: &str) -> String {
    format!(
        "postgres://{}:{}@{}:{}/{db}?sslmode=disable",
        url.user, url.password, url.host, url.port
    )
}

/// Tunes the broker's `record` table on the local server that holds the broker database of
/// `storage` (the broker's storage URL); does nothing for other storage, a remote server or a
/// broker that has not created its tables yet. Run by the PostgreSQL superuser, since the
/// trigger is the constraint's own. Neither change costs durability.
///
/// Record values are kept uncompressed and in the row (`storage external`, a tuple target of
/// a whole page): a bill event is about 1.8 kB, so most went through `pglz` on the way in and
/// were decompressed again on every fetch, whose size check reads each candidate's length.
/// 200,000 members, `billing settle`, alternated: 22.29 s and 25.34 s with this, 25.90 s and
/// 26.63 s without; the bills topic's rows take about a third more disk.
///
/// The per-row foreign-key check is skipped. nisshi stores one row per Kafka record in
/// `record`, whose `topition` column references
/// `topition (id)`. The check costs a lookup and a row lock per record: about half of
/// PostgreSQL's work while producing (200,000 members seeded: 13.39 s and 15.63 s with it,
/// 8.60 s and 8.01 s without, alternated; docs/benchmarks.md). The broker inserts a record
/// only under the partition id it has just read in the same transaction, so the check adds
/// nothing to acknowledged records. What it costs: a record produced while its topic is being
/// deleted can outlive the topic as a row no fetch can reach (the topic's new partitions get
/// new ids). The constraint stays declared, so deleting a topic still deletes its records
/// (the cascade is the referenced side's trigger, left on), and the check still runs for
/// updates.
pub fn tune_broker_storage(storage: &str) -> Result<(), OpsError> {
    let Ok(url) = PgUrl::parse(storage) else {
        return Ok(());
    };
    if !is_local(&url.host) {
        return Ok(());
    }
    let sql = "do $$ declare t record; begin \
        for t in select g.tgrelid::regclass as rel, g.tgname from pg_trigger g \
            join pg_constraint c on c.oid = g.tgconstraint \
            where c.conname = 'record_topition_fkey' and g.tgenabled <> 'D' \
            and g.tgfoid = '\"RI_FKey_check_ins\"'::regproc \
        loop execute format('alter table %s disable trigger %I', t.rel, t.tgname); end loop; \
        if to_regclass('record_default') is not null then \
            alter table record alter column v set storage external; \
            alter table record_default set (toast_tuple_target = 8160); \
        end if; end $$;";
    let port = url.port.to_string();
    run(&mut as_postgres(&[
        "psql",
        "-p",
        &port,
        "-d",
        &url.database,
        "-qAtc",
        sql,
    ]))?;
    Ok(())
}

/// A new, empty broker database `db` on the local server of `database_url` (dropped first if
/// it exists), owned by its user; returns the broker's storage URL for it. For fault
/// injection runs, which need a durable broker of their own.
pub fn fresh_broker_database(database_url: &str, db: &str) -> Result<String, OpsError> {
    let url = PgUrl::parse(database_url)?;
    if !is_local(&url.host) {
        return Err(err("a fresh broker database needs the local PostgreSQL"));
    }
    let port = url.port.to_string();
    run(&mut as_postgres(&[
        "dropdb",
        "-p",
        &port,
        "--if-exists",
        "--force",
        db,
    ]))?;
    run(&mut as_postgres(&[
        "createdb", "-p", &port, "-O", &url.user, db,
    ]))?;
    Ok(storage_url(&url, db))
}

/// The broker serving `listen` (`host:port`) from `storage`, ready to spawn (the caller owns
/// the process). The stack's own broker is started the same way by `up`.
pub fn broker_command(listen: &str, storage: &str) -> Result<Command, OpsError> {
    let (bin, _) = broker_binary()?;
    let listener = format!("tcp://{listen}");
    let mut c = Command::new(bin);
    c.args(broker_args(&listener, storage))
        .current_dir(stack_dir()?);
    Ok(c)
}

fn broker_args(listener: &str, storage: &str) -> Vec<String> {
    [
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        storage,
        "--group-initial-rebalance-delay",
        "0s",
    ]
    .map(String::from)
    .to_vec()
}

/// Restarts the machine's PostgreSQL cluster with a fast shutdown (every connection is cut),
/// and waits until it answers again. For fault injection.
pub fn restart_local_postgres() -> Result<(), OpsError> {
    let c = first_cluster()?.ok_or_else(|| err("no PostgreSQL cluster to restart"))?;
    run(Command::new("pg_ctlcluster").args([&c.version, &c.name, "restart", "-m", "fast"]))?;
    wait_for_local_postgres("local PostgreSQL did not come back")
}

/// The machine's first PostgreSQL cluster, as `pg_lsclusters` lists it.
struct Cluster {
    version: String,
    name: String,
    status: String,
}

fn first_cluster() -> Result<Option<Cluster>, OpsError> {
    let clusters = run(Command::new("pg_lsclusters").arg("--no-header"))?;
    let first: Vec<&str> = clusters
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    Ok(match first.as_slice() {
        [version, name, _port, status, ..] => Some(Cluster {
            version: (*version).to_string(),
            name: (*name).to_string(),
            status: (*status).to_string(),
        }),
        _ => None,
    })
}

/// Waits until the local server answers its superuser, or fails with `failure` after [`WAIT`].
fn wait_for_local_postgres(failure: &str) -> Result<(), OpsError> {
    let start = Instant::now();
    while run(&mut as_postgres(&["psql", "-qAtc", "select 1"])).is_err() {
        if start.elapsed() > WAIT {
            return Err(err(failure.to_string()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// The broker binary: cached under `$BILLING_HOME`, on PATH, or built now.
fn broker_binary() -> Result<(PathBuf, &'static str), OpsError> {
    let nisshi = home().join("nisshi").join("bin").join("nisshi");
    if nisshi.exists() {
        return Ok((nisshi, "nisshi"));
    }
    let tansu = home().join("tansu").join("bin").join("tansu");
    if tansu.exists() {
        return Ok((tansu, "tansu"));
    }
    let nightly = run(Command::new("rustup").args(["toolchain", "list"]))
        .is_ok_and(|l| l.contains("nightly"));
    if nightly {
        tracing::info!(
            version = NISSHI_VERSION,
            "building the nisshi broker with the nightly toolchain (about 10 minutes, once)"
        );
        let status = Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "nisshi",
                "--version",
                NISSHI_VERSION,
                "--locked",
                "--root",
            ])
            .arg(home().join("nisshi"))
            .stdout(Stdio::null())
            .status()
            .map_err(|e| err(format!("cannot run cargo: {e}")))?;
        if status.success() && nisshi.exists() {
            return Ok((nisshi, "nisshi"));
        }
        return Err(err("building nisshi failed"));
    }
    tracing::warn!(
        version = TANSU_VERSION,
        "no nightly toolchain: building the tansu broker instead (sqlite storage)"
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "tansu",
            "--version",
            TANSU_VERSION,
            "--locked",
            "--features",
            "dynostore,postgres,libsql",
            "--root",
        ])
        .arg(home().join("tansu"))
        .stdout(Stdio::null())
        .status()
        .map_err(|e| err(format!("cannot run cargo: {e}")))?;
    if status.success() && tansu.exists() {
        Ok((tansu, "tansu"))
    } else {
        Err(err("building tansu failed"))
    }
}

fn spawn_detached(
    name: &str,
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
) -> Result<u32, OpsError> {
    let dir = stack_dir()?;
    let log = File::create(dir.join(format!("{name}.log")))
        .map_err(|e| err(format!("cannot create log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| err(format!("cannot create log: {e}")))?;
    let child = Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a ctrl-c at the terminal that ran `up` does not stop it.
        .process_group(0)
        .spawn()
        .map_err(|e| err(format!("cannot start {}: {e}", program.display())))?;
    fs::write(dir.join(format!("{name}.pid")), child.id().to_string())
        .map_err(|e| err(format!("cannot write pid file: {e}")))?;
    Ok(child.id())
}

fn registry_binary() -> Result<PathBuf, OpsError> {
    if let Some(p) = std::env::var_os("BILLING_REGISTRY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| err(format!("cannot locate own binary: {e}")))?;
    let sibling = exe.with_file_name("schema-registry");
    if sibling.exists() {
        Ok(sibling)
    } else {
        Err(err(format!(
            "schema-registry binary not found beside {}: build the workspace (cargo build --release)",
            exe.display()
        )))
    }
}

/// What `up` found or started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Up {
    pub started: Vec<String>,
    pub exports: String,
}

/// Brings the local stack up (idempotent) and returns the `export` lines to print.
pub async fn up(common: &CommonArgs) -> Result<Up, OpsError> {
    let mut started = Vec::new();

    if !postgres_answers(&common.database_url).await {
        let url = PgUrl::parse(&common.database_url)?;
        if !is_local(&url.host) {
            return Err(err(format!(
                "PostgreSQL at {} does not answer",
                mask(&common.database_url)
            )));
        }
        tokio::task::spawn_blocking(move || start_local_postgres(&url))
            .await
            .map_err(|e| err(e.to_string()))??;
        let db = common.database_url.clone();
        wait_for("PostgreSQL", None, || postgres_answers(&db)).await?;
        started.push("postgres".to_string());
    }
    billing_db::migrate(&common.database_url).await?;

    if !broker_answers(&common.kafka_brokers).await {
        let (host, port) = host_port(&common.kafka_brokers)?;
        if !is_local(&host) {
            return Err(err(format!(
                "no broker answers at {}",
                common.kafka_brokers
            )));
        }
        let (bin, kind) = tokio::task::spawn_blocking(broker_binary)
            .await
            .map_err(|e| err(e.to_string()))??;
        let listener = format!("tcp://{host}:{port}");
        let storage = broker_storage(&common.database_url)?;
        let args = broker_args(&listener, &storage);
        let pid = spawn_detached("broker", &bin, &args, &[])?;
        tracing::info!(pid, kind, "broker started");
        let brokers = common.kafka_brokers.clone();
        wait_for("the broker", Some(("broker", pid)), || {
            broker_answers(&brokers)
        })
        .await?;
        tune_broker_storage(&storage)?;
        started.push(kind.to_string());
    }

    if !registry_answers(&common.schema_registry_url).await {
        let (host, port) = host_port(&common.schema_registry_url)?;
        if !is_local(&host) {
            return Err(err(format!(
                "no schema registry answers at {}",
                common.schema_registry_url
            )));
        }
        let bin = registry_binary()?;
        let pid = spawn_detached(
            "registry",
            &bin,
            &[],
            &[
                ("REGISTRY_LISTEN", format!("{host}:{port}")),
                ("DATABASE_URL", common.database_url.clone()),
                ("RUST_LOG", "info".to_string()),
            ],
        )?;
        tracing::info!(pid, "schema registry started");
        let url = common.schema_registry_url.clone();
        wait_for("the schema registry", Some(("registry", pid)), || {
            registry_answers(&url)
        })
        .await?;
        started.push("schema-registry".to_string());
    }

    crate::topics::ensure(common).await?;
    Ok(Up {
        started,
        exports: exports(common),
    })
}

/// The `export` lines for the stack's variables.
pub fn exports(common: &CommonArgs) -> String {
    format!(
        "export DATABASE_URL={}\nexport KAFKA_BROKERS={}\nexport SCHEMA_REGISTRY_URL={}\nexport BILLING_TZ={}\n",
        common.database_url, common.kafka_brokers, common.schema_registry_url, common.billing_tz
    )
}

fn stop_pid_file(name: &str) -> Result<bool, OpsError> {
    let file = stack_dir()?.join(format!("{name}.pid"));
    let Ok(text) = fs::read_to_string(&file) else {
        return Ok(false);
    };
    let pid = text.trim().to_string();
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if alive(&pid) {
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while alive(&pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(&pid) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
    let _ = fs::remove_file(file);
    Ok(true)
}

/// Deletes everything the stack's role owns in the database at `url`: its schemas, and its
/// tables, sequences, types and functions in schemas it does not own (on PostgreSQL 15,
/// `public` belongs to `pg_database_owner`, so dropping the role's schemas alone leaves every
/// table there). `public` is made again, empty, if it went.
pub async fn purge_database(url: &str) -> Result<(), OpsError> {
    let mut conn = billing_db::connect(url).await?;
    conn.batch_execute(
        "do $$ declare s text; begin
           for s in select nspname from pg_namespace
                    where nspowner = (select oid from pg_roles where rolname = current_user)
                      and nspname not like 'pg\\_%' and nspname <> 'information_schema'
           loop execute format('drop schema %I cascade', s); end loop;
         end $$;
         drop owned by current_user cascade;
         create schema if not exists public;",
    )
    .await
    .map_err(billing_db::DbError::Query)?;
    Ok(())
}

/// Stops the broker and registry this stack started. With `purge`, first deletes the
/// database contents (every table and the registry's schemas) and the broker's data.
/// PostgreSQL itself is the machine's service and keeps running.
pub async fn down(common: &CommonArgs, purge: bool) -> Result<Vec<String>, OpsError> {
    let mut done = Vec::new();
    if purge && postgres_answers(&common.database_url).await {
        purge_database(&common.database_url).await?;
        done.push("database contents deleted".to_string());
    }
    for name in ["registry", "broker"] {
        if tokio::task::spawn_blocking(move || stop_pid_file(name))
            .await
            .map_err(|e| err(e.to_string()))??
        {
            done.push(format!("{name} stopped"));
        }
    }
    if purge {
        let dir = stack_dir()?;
        for f in ["broker.db", "broker.db-wal", "broker.db-shm"] {
            let _ = fs::remove_file(dir.join(f));
        }
        if let Ok(url) = PgUrl::parse(&common.database_url)
            && is_local(&url.host)
        {
            let db = format!("{}_broker", url.database);
            let port = url.port.to_string();
            tokio::task::spawn_blocking(move || {
                run(&mut as_postgres(&[
                    "dropdb",
                    "-p",
                    &port,
                    "--if-exists",
                    &db,
                ]))
            })
            .await
            .map_err(|e| err(e.to_string()))??;
        }
        done.push("broker data deleted (topics and their records)".to_string());
    }
    Ok(done)
}

/// Which components answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub postgres: bool,
    pub broker: bool,
    pub registry: bool,
}

impl Status {
    pub fn all_up(&self) -> bool {
        self.postgres && self.broker && self.registry
    }
}

/// Asks each component whether it answers.
pub async fn status(common: &CommonArgs) -> Status {
    let (postgres, broker, registry) = tokio::join!(
        postgres_answers(&common.database_url),
        broker_answers(&common.kafka_brokers),
        registry_answers(&common.schema_registry_url)
    );
    Status {
        postgres,
        broker,
        registry,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_database_urls() {
        let u = PgUrl::parse("postgres://billing:secret@127.0.0.1:5433/billing?sslmode=disable")
            .unwrap();
        assert_eq!(
            (
                u.user.as_str(),
                u.password.as_str(),
                u.port,
                u.database.as_str()
            ),
            ("billing", "secret", 5433, "billing")
        );
        assert_eq!(
            PgUrl::parse("postgresql://a@localhost/b").unwrap().port,
            5432
        );
        assert!(PgUrl::parse("mysql://a@b/c").is_err());
        assert!(PgUrl::parse("postgres://a;drop@h/c").is_err());
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(mask("postgres://u:pw@h:1/d"), "postgres://u:***@h:1/d");
        assert_eq!(mask("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn finds_host_and_port() {
        assert_eq!(
            host_port("http://127.0.0.1:8081").unwrap(),
            ("127.0.0.1".to_string(), 8081)
        );
        assert_eq!(
            host_port("127.0.0.1:9092,127.0.0.1:9093").unwrap(),
            ("127.0.0.1".to_string(), 9092)
        );
    }
}
