//! `--web-config-file` (exporter-toolkit's format) with real TLS clients: curl, and a real
//! Prometheus scraping over TLS with a client certificate and basic auth. Certificates are made
//! here with the openssl command (a CA, the agent's certificate for 127.0.0.1, a client's, and
//! a client signed by another CA).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use tests::{
    Agent,
    agent::Launch,
    http::{free_loopback_addr, http_get},
    prometheus::PrometheusServer,
};

/// bcrypt (cost 10) of `scrape-me`, as `htpasswd -nbBC 10 prometheus scrape-me` writes it.
const SCRAPE_ME: &str = "$2y$10$W07sZl/wZ0HjJV/wZ0yfGO92HAOEf6OV7SAqLGRKEapZ4.X2qeyn2";
/// bcrypt (cost 4) of `secret`.
const SECRET: &str = "$2y$04$W07sZl/wZ0HjJVPja1OfGOuxAk8FpsdCIVZLMjaayb/OdZfiogrsC";

/// A directory of certificates, removed on drop.
struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run openssl (Debian package openssl)")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = Pki { dir };
        for ca in ["ca", "other-ca"] {
            openssl(
                &pki.dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=connprobe test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            )?;
        }
        std::fs::write(
            pki.dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        std::fs::write(pki.dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("stranger", "other-ca", "client.ext"),
        ] {
            openssl(
                &pki.dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    &format!("/CN={name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            )?;
            openssl(
                &pki.dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.crt"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                    "-out",
                    &format!("{name}.crt"),
                ],
            )?;
        }
        Ok(pki)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `curl` with `args` against `url`: the HTTP status (0 when no answer) and curl's exit code.
fn curl(args: &[&str], url: &str) -> anyhow::Result<(u16, i32)> {
    let output = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("cannot run curl")?;
    let status = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    Ok((status, output.status.code().unwrap_or(-1)))
}

/// The agent serving metrics on a free port with `web_config`; `/healthz` is not waited for
/// (the harness speaks plain HTTP).
fn agent_with(web_config: &Path) -> anyhow::Result<(Agent, SocketAddr)> {
    let addr = free_loopback_addr()?;
    let agent = Agent::launch(Launch::from_env(&[
        "--metrics-addr",
        &addr.to_string(),
        "--web-config-file",
        &web_config.display().to_string(),
    ])?)?;
    Ok((agent, addr))
}

#[test]
fn curl_and_prometheus_scrape_over_tls_with_a_client_certificate_and_basic_auth()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    let web = pki.dir.join("web.yml");
    let write_config = |users: &str| {
        std::fs::write(
            &web,
            format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
                 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
                 http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=3600\n\
                 basic_auth_users:\n{users}"
            ),
        )
    };
    write_config(&format!("  prometheus: {SCRAPE_ME}\n"))?;
    let (mut agent, addr) = agent_with(&web)?;
    let url = format!("https://{addr}/metrics");
    let (ca, cert, key) = (
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let tls = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let with = |extra: &[&str]| -> Vec<String> {
        tls.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let call = |args: Vec<String>| -> anyhow::Result<(u16, i32)> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args, &url)
    };

    let ok = call(with(&["-u", "prometheus:scrape-me"]))?;
    ensure!(ok == (200, 0), "curl with certificate and password: {ok:?}");
    let (status, _) = call(with(&["-u", "prometheus:wrong"]))?;
    ensure!(status == 401, "a wrong password: {status}");
    let (status, _) = call(with(&[]))?;
    ensure!(status == 401, "no password: {status}");
    let (status, _) = call(with(&["-u", "nobody:scrape-me"]))?;
    ensure!(status == 401, "an unknown user: {status}");
    let no_cert = curl(&["--cacert", &ca, "-u", "prometheus:scrape-me"], &url)?;
    ensure!(
        no_cert.0 == 0 && no_cert.1 != 0,
        "no client certificate: {no_cert:?}"
    );
    let stranger = curl(
        &[
            "--cacert",
            &ca,
            "--cert",
            &pki.path("stranger.crt"),
            "--key",
            &pki.path("stranger.key"),
            "-u",
            "prometheus:scrape-me",
        ],
        &url,
    )?;
    ensure!(
        stranger.0 == 0 && stranger.1 != 0,
        "a certificate of another CA: {stranger:?}"
    );
    let untrusted = curl(
        &["--cert", &cert, "--key", &key, "-u", "prometheus:scrape-me"],
        &url,
    )?;
    ensure!(
        untrusted.1 == 60,
        "curl must not trust the agent without the CA: {untrusted:?}"
    );
    let plain = http_get(addr, "/metrics");
    ensure!(
        !matches!(plain, Ok((200, _))),
        "plain HTTP was answered: {plain:?}"
    );
    // The response carries the configured header.
    let output = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "-u",
            "prometheus:scrape-me",
        ])
        .args(tls)
        .arg(&url)
        .output()?;
    let headers = String::from_utf8_lossy(&output.stdout).to_lowercase();
    ensure!(
        headers.contains("strict-transport-security: max-age=3600"),
        "{headers}"
    );

    // A real Prometheus scraping over TLS with its client certificate and basic auth.
    let prometheus = PrometheusServer::start_with(
        addr,
        &format!(
            "    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      \
             key_file: {key}\n    basic_auth:\n      username: prometheus\n      password: scrape-me\n"
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus.query("up{job=\"connprobe\"}")?;
        let built = prometheus.query("connprobe_build_info")?;
        if up == Some(1.0) && built == Some(1.0) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "prometheus did not scrape the agent over TLS: up={up:?}, last error {:?}",
                prometheus.last_scrape_error()?
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(prometheus);

    // SIGHUP reads the file again: the new password works, the old one no longer.
    write_config(&format!("  prometheus: {SECRET}\n"))?;
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(with(&["-u", "prometheus:secret"]))?.0 != 200 {
        ensure!(
            Instant::now() < deadline,
            "the new password was not taken on SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = call(with(&["-u", "prometheus:scrape-me"]))?;
    ensure!(status == 401, "the old password after SIGHUP: {status}");
    // A file that no longer loads keeps the settings in force.
    std::fs::write(&web, "tls_server_config:\n  cert_file: missing.crt\n")?;
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = call(with(&["-u", "prometheus:secret"]))?;
    ensure!(status == 200, "after a broken reload: {status}");
    let exit = agent.shutdown()?;
    ensure!(
        exit.stderr
            .contains("the metrics endpoint keeps its previous settings"),
        "{}",
        exit.stderr
    );
    eprintln!(
        "figure: TLS + client certificate + basic auth: curl 200 with both, 401 without or \
         with a wrong password or user, no TLS session without a client certificate or with \
         one of another CA; Prometheus {} scraped up=1 over TLS; SIGHUP swapped the password",
        Command::new("prometheus")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .unwrap_or("?")
                .to_string())
            .unwrap_or_default()
    );
    Ok(())
}

#[test]
fn basic_auth_without_tls_and_a_bad_file_stops_the_start() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let web = pki.dir.join("web.yml");
    std::fs::write(&web, format!("basic_auth_users:\n  prometheus: {SECRET}\n"))?;
    let (agent, addr) = agent_with(&web)?;
    let url = format!("http://{addr}/metrics");
    ensure!(curl(&["-u", "prometheus:secret"], &url)?.0 == 200);
    ensure!(curl(&["-u", "prometheus:nope"], &url)?.0 == 401);
    ensure!(curl(&[], &url)?.0 == 401);
    drop(agent);

    for (yaml, says) in [
        (
            "tls_server_config:\n  cert_file: server.crt\n".to_string(),
            "tls_server_config needs key_file",
        ),
        (
            "basic_auth_users:\n  prometheus: hunter2\n".to_string(),
            "the password of \"prometheus\" is not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: [\n".to_string(),
            "is not valid",
        ),
        (
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_auth_type: RequireAnyClientCert\n"
                .to_string(),
            "RequireAnyClientCert",
        ),
    ] {
        let bad = pki.dir.join("bad.yml");
        std::fs::write(&bad, yaml)?;
        let addr = free_loopback_addr()?.to_string();
        let (status, stderr) = Agent::run_until_exit(
            &[],
            &[
                "--metrics-addr",
                &addr,
                "--web-config-file",
                &bad.display().to_string(),
            ],
        )?;
        ensure!(status.code() == Some(1), "{status}: {stderr}");
        ensure!(
            stderr.contains("the web config") && stderr.contains(says),
            "expected {says:?} in:\n{stderr}"
        );
    }
    Ok(())
}
