//! The processes of a chaos run: every processor in instances, and a broker of the run's own,
//! each killed with SIGKILL and started again on demand, like a supervisor (Kubernetes,
//! systemd) restarts what dies.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use rand::Rng;
use rand_pcg::Pcg64;

/// One processor instance.
struct Proc {
    name: &'static str,
    instance: usize,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Exited successfully on its own (a bounded run that finished): not started again.
    done: bool,
}

/// The run's processors.
pub struct Fleet {
    bin_dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    procs: Vec<Proc>,
    rng: Pcg64,
    /// SIGKILLs sent.
    pub kills: u32,
    /// Processes that exited on their own with a failure and were started again.
    pub exits: u32,
}

impl Fleet {
    /// Processors from `bin_dir` with `env`, logging under `log_dir`; kills drawn from `seed`.
    pub fn new(bin_dir: PathBuf, log_dir: PathBuf, env: Vec<(String, String)>, seed: u64) -> Self {
        Fleet {
            bin_dir,
            log_dir,
            env,
            procs: Vec::new(),
            rng: rand::SeedableRng::seed_from_u64(seed),
            kills: 0,
            exits: 0,
        }
    }

    /// Starts `instances` of processor `name` with `extra` variables.
    pub fn start(
        &mut self,
        name: &'static str,
        instances: usize,
        extra: &[(&str, String)],
    ) -> anyhow::Result<()> {
        for instance in 0..instances {
            let env: Vec<(String, String)> = extra
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone()))
                .collect();
            let mut p = Proc {
                name,
                instance,
                env,
                child: None,
                done: false,
            };
            p.child = Some(self.spawn(&p)?);
            self.procs.push(p);
        }
        Ok(())
    }

    fn spawn(&self, p: &Proc) -> anyhow::Result<Child> {
        let log = log_file(&self.log_dir, &format!("{}-{}", p.name, p.instance))?;
        Command::new(self.bin_dir.join(p.name))
            .envs(self.env.iter().chain(&p.env).map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", p.name))
    }

    /// SIGKILLs one running processor drawn at random and starts it again at once; returns
    /// its name.
    pub fn kill_one(&mut self) -> anyhow::Result<Option<&'static str>> {
        let running: Vec<usize> = (0..self.procs.len())
            .filter(|i| self.procs[*i].child.is_some())
            .collect();
        if running.is_empty() {
            return Ok(None);
        }
        let i = running[self.rng.random_range(0..running.len())];
        if let Some(mut c) = self.procs[i].child.take() {
            // Already gone is fine: `tend` sees how it ended.
            let _ = c.kill();
            let status = c.wait()?;
            if status.success() {
                self.procs[i].done = true;
                return Ok(Some(self.procs[i].name));
            }
        }
        self.kills += 1;
        self.procs[i].child = Some(self.spawn(&self.procs[i])?);
        Ok(Some(self.procs[i].name))
    }

    /// Reaps processes that ended on their own: a success is done, a failure is started again
    /// (and counted).
    pub fn tend(&mut self) -> anyhow::Result<()> {
        for i in 0..self.procs.len() {
            let Some(c) = self.procs[i].child.as_mut() else {
                continue;
            };
            match c.try_wait()? {
                None => {}
                Some(s) if s.success() => {
                    self.procs[i].child = None;
                    self.procs[i].done = true;
                }
                Some(s) => {
                    tracing::warn!(name = self.procs[i].name, status = %s, "exited; starting it again");
                    self.exits += 1;
                    self.procs[i].child = Some(self.spawn(&self.procs[i])?);
                }
            }
        }
        Ok(())
    }

    /// Whether every instance of `name` finished on its own.
    pub fn finished(&self, name: &str) -> bool {
        self.procs.iter().filter(|p| p.name == name).all(|p| p.done)
    }

    /// SIGTERM to every processor, then SIGKILL to any still running after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        for p in &self.procs {
            if let Some(c) = &p.child {
                let _ = Command::new("kill").arg(c.id().to_string()).status();
            }
        }
        let deadline = std::time::Instant::now() + grace;
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                while std::time::Instant::now() < deadline {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A run that fails part-way leaves no processor behind (they would go on consuming).
impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The run's broker, on durable storage, restartable.
pub struct Broker {
    listen: String,
    storage: String,
    log_dir: PathBuf,
    child: Child,
    /// Restarts after a crash of its own, or after it stopped answering (not the planned one).
    pub exits: u32,
    /// Since when it has not answered, if it does not.
    silent_since: Option<std::time::Instant>,
    last_probe: std::time::Instant,
}

/// How long the broker may not answer before it is restarted, as a liveness probe would.
const LIVENESS: Duration = Duration::from_secs(15);

impl Broker {
    /// The broker's storage URL.
    pub fn storage(&self) -> &str {
        &self.storage
    }

    /// Starts the broker at `listen` on `storage`.
    pub fn start(listen: &str, storage: &str, log_dir: &Path) -> anyhow::Result<Broker> {
        let child = spawn_broker(listen, storage, log_dir)?;
        Ok(Broker {
            listen: listen.to_string(),
            storage: storage.to_string(),
            log_dir: log_dir.to_path_buf(),
            child,
            exits: 0,
            silent_since: None,
            last_probe: std::time::Instant::now(),
        })
    }

    /// SIGKILL and start again: everything it acknowledged must be in its storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        self.child = spawn_broker(&self.listen, &self.storage, &self.log_dir)?;
        Ok(())
    }

    /// Starts it again if it died on its own, or if it has not answered for [`LIVENESS`]
    /// (nisshi stops listening when its storage's database restarts under it).
    pub async fn tend(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            tracing::warn!("broker exited; starting it again");
            self.exits += 1;
            self.child = spawn_broker(&self.listen, &self.storage, &self.log_dir)?;
            self.silent_since = None;
            return Ok(());
        }
        if self.last_probe.elapsed() < Duration::from_secs(2) {
            return Ok(());
        }
        self.last_probe = std::time::Instant::now();
        if billing_ops::stack::broker_answers(&self.listen).await {
            self.silent_since = None;
        } else if self
            .silent_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            > LIVENESS
        {
            tracing::warn!("broker stopped answering; starting it again");
            self.exits += 1;
            self.restart()?;
            self.silent_since = None;
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_broker(listen: &str, storage: &str, log_dir: &Path) -> anyhow::Result<Child> {
    let log = log_file(log_dir, "broker")?;
    let mut cmd = billing_ops::stack::broker_command(listen, storage)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the broker")
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .with_context(|| format!("cannot open {name}.log"))
}
