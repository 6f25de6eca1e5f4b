//! The Sluice a benchmark measures: a `sluice up` of its own on fresh topics, as its own
//! process (so its CPU and memory are its own), and more edges beside it.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{config::Config, setup};

/// A port free right now on the loopback address.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of a process (Linux: `VmRSS` in `/proc/<pid>/status`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A `sluice` process started from a config file, terminated (SIGTERM, then SIGKILL after
/// 30 s) when dropped.
pub struct SluiceProcess {
    child: Child,
    /// Its HTTP API.
    pub edge_url: String,
    log: PathBuf,
}

impl SluiceProcess {
    fn spawn(
        config_path: &PathBuf,
        args: &[&str],
        edge: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--config")
            .arg(config_path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        // Its settings are all in the file; the caller's SLUICE_* overrides would undo them.
        for (name, _) in std::env::vars() {
            if name.starts_with("SLUICE_") {
                command.env_remove(name);
            }
        }
        Ok(Self {
            child: command.spawn().context("starting sluice")?,
            edge_url: format!("http://{edge}"),
            log,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 90 s) until its `/readyz` answers 200.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let url = format!("{}/readyz", self.edge_url);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "sluice exited ({status}) before it was ready; log: {}",
                    self.log.display()
                );
            }
            if let Ok(response) = http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "sluice was not ready within 90 s; log: {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Asks it to stop (SIGTERM: it drains and commits) and waits up to 30 s, then kills it.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `sluice up` of its own, on fresh topics `<id>.*`.
pub struct SluiceUnderTest {
    up: SluiceProcess,
    id: String,
    config_path: PathBuf,
    /// Its HTTP API.
    pub edge_url: String,
}

impl SluiceUnderTest {
    /// Creates the topics and starts `sluice up` with `config` on them; waits until it is ready.
    pub async fn start(config: &Config, id: &str) -> anyhow::Result<Self> {
        let mut child_config = config.clone();
        child_config.kafka.topic_prefix = id.to_owned();
        let edge = format!("127.0.0.1:{}", free_port()?);
        let registry = format!("127.0.0.1:{}", free_port()?);
        child_config.edge.listen = edge.clone();
        child_config.registry.url = format!("http://{registry}");
        child_config.registry.listen = registry;
        child_config.ops.listen = format!("127.0.0.1:{}", free_port()?);
        setup::create_topics(&child_config).await?;
        let dir = std::env::temp_dir();
        let config_path = dir.join(format!("{id}.toml"));
        std::fs::write(&config_path, toml::to_string(&child_config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut up =
            SluiceProcess::spawn(&config_path, &["up"], &edge, dir.join(format!("{id}.log")))?;
        up.wait_ready().await?;
        Ok(Self {
            edge_url: up.edge_url.clone(),
            up,
            id: id.to_owned(),
            config_path,
        })
    }

    /// The `sluice up` process id.
    pub fn pid(&self) -> u32 {
        self.up.pid()
    }

    /// Starts another edge (`sluice edge`) on the same topics and stores, on a free port.
    pub async fn start_edge(&self) -> anyhow::Result<SluiceProcess> {
        let edge = format!("127.0.0.1:{}", free_port()?);
        let log = std::env::temp_dir().join(format!("{}-edge.log", self.id));
        // The file's listen address is the first edge's; this one gets its own.
        let path = std::env::temp_dir().join(format!("{}-edge.toml", self.id));
        let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&self.config_path)?)?;
        if let Some(toml::Value::Table(section)) = config.get_mut("edge") {
            section.insert("listen".into(), toml::Value::String(edge.clone()));
        }
        if let Some(toml::Value::Table(section)) = config.get_mut("ops") {
            section.insert(
                "listen".into(),
                toml::Value::String(format!("127.0.0.1:{}", free_port()?)),
            );
        }
        std::fs::write(&path, toml::to_string(&config)?)?;
        let mut process = SluiceProcess::spawn(&path, &["edge"], &edge, log)?;
        process.wait_ready().await?;
        Ok(process)
    }
}
