//! A real Prometheus server on loopback, scraping an agent every second, and its query API.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::http::{free_loopback_addr, http_get};

pub struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrometheusServer {
    /// Scrapes `target` over plain HTTP.
    pub fn start(target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(target, "")
    }

    /// Scrapes `target` with `job_settings`: YAML lines of the scrape job (each indented by
    /// four spaces), e.g. `scheme: https` and a `tls_config`.
    pub fn start_with(target: SocketAddr, job_settings: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: connprobe\n{job_settings}    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )?;
        let addr = free_loopback_addr()?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start prometheus (Debian package `prometheus`)")?;
        let server = PrometheusServer { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
            if Instant::now() > deadline {
                bail!("prometheus was not ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(server)
    }

    /// The value of an instant query that returns one sample, or `None` for no sample.
    pub fn query(&self, promql: &str) -> anyhow::Result<Option<f64>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"))?;
        if status != 200 {
            bail!("prometheus answered {status}: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let result = json["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected answer {body}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            _ => bail!("more than one series: {body}"),
        }
    }

    /// The last scrape error of the target (`lastError` of `/api/v1/targets`), empty if none.
    pub fn last_scrape_error(&self) -> anyhow::Result<String> {
        let (status, body) = http_get(self.addr, "/api/v1/targets")?;
        if status != 200 {
            bail!("prometheus answered {status}: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        Ok(json["data"]["activeTargets"][0]["lastError"]
            .as_str()
            .unwrap_or("")
            .to_string())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
