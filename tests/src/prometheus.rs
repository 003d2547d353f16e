//! A real Prometheus server on loopback that scrapes an agent every second (over plain HTTP, or
//! with TLS and basic auth) and evaluates rule files every second, and its query API.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::http::{free_loopback_addr, http_get};

/// The scrape job's name, which the mixin's default selector (`job="connprobe"`) expects.
pub const JOB: &str = "connprobe";

pub struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrometheusServer {
    /// Scrapes `target` over plain HTTP.
    pub fn start(target: SocketAddr) -> anyhow::Result<Self> {
        Self::launch(target, "", &[])
    }

    /// Scrapes `target` with `job_settings`: YAML lines of the scrape job (each indented by
    /// four spaces), e.g. `scheme: https` and a `tls_config`.
    pub fn start_with(target: SocketAddr, job_settings: &str) -> anyhow::Result<Self> {
        Self::launch(target, job_settings, &[])
    }

    /// Scrapes `target` over plain HTTP and evaluates `rule_files`.
    pub fn start_with_rules(target: SocketAddr, rule_files: &[&Path]) -> anyhow::Result<Self> {
        Self::launch(target, "", rule_files)
    }

    /// Starts Prometheus scraping `target` as job [`JOB`], loading `rule_files`.
    fn launch(
        target: SocketAddr,
        job_settings: &str,
        rule_files: &[&Path],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let rules: String = rule_files
            .iter()
            .map(|f| format!("  - '{}'\n", f.display()))
            .collect();
        let rules = if rules.is_empty() {
            String::new()
        } else {
            format!("rule_files:\n{rules}")
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 {rules}\
                 scrape_configs:\n  - job_name: {JOB}\n{job_settings}    static_configs:\n      \
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
        let json = self.api(&format!("/api/v1/query?query={}", encode(promql)))?;
        let result = json["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected answer {json}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            _ => bail!("more than one series: {json}"),
        }
    }

    /// The last scrape error of the target (`lastError` of `/api/v1/targets`), empty if none.
    pub fn last_scrape_error(&self) -> anyhow::Result<String> {
        let json = self.api("/api/v1/targets")?;
        Ok(json["data"]["activeTargets"][0]["lastError"]
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// How many series an instant query returns (asked as `count(...)`, so the answer stays
    /// small whatever the query).
    pub fn series_count(&self, promql: &str) -> anyhow::Result<u64> {
        let json = self.api(&format!(
            "/api/v1/query?query={}",
            encode(&format!("count({promql})"))
        ))?;
        let result = json["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected answer {json}"))?;
        Ok(match result.as_slice() {
            [] => 0,
            [one] => one["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64),
            _ => bail!("count() returned more than one sample: {json}"),
        })
    }

    /// The health of every rule group's rules: (rule name, health, last error).
    pub fn rule_health(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let json = self.api("/api/v1/rules")?;
        let groups = json["data"]["groups"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected answer {json}"))?;
        Ok(groups
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (s("name"), s("health"), s("lastError"))
            })
            .collect())
    }

    fn api(&self, target: &str) -> anyhow::Result<Value> {
        let (status, body) = http_get(self.addr, target)?;
        if status != 200 {
            bail!("prometheus answered {status} to {target}: {body}");
        }
        let body = if body.starts_with('{') {
            body
        } else {
            dechunk(&body).ok_or_else(|| anyhow!("neither JSON nor chunked: {body}"))?
        };
        serde_json::from_str(&body).with_context(|| format!("not JSON from {target}: {body}"))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The body of a `Transfer-Encoding: chunked` response (Prometheus chunks the larger answers).
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}
