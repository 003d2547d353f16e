//! Faults the agent survives, each with its figure (README "Reliability"): a reader stopped
//! under a storm; SIGTERM in the middle of a storm and `kill -9`; a full disk under the JSON log; log reopening on SIGHUP and size
//! rotation with no event lost or repeated (proved by `seq`); hostile process names; the HTTP
//! endpoint under abuse and `/diagnose` with junk windows; half-open connects past the kernel's
//! socket map. The 200,000-connect versions of the last run in `cargo xtask soak`
//! (`tests/tests/soak.rs`).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use tests::{
    Agent, Lab,
    agent::{Exit, Launch},
    bpf::{self, BpfObjects},
    http::http_get,
    seqlog::{self, SeqAccount},
    socket,
    storm::{self, Storm},
    traffic::{self, serve},
};

/// Events delivered, by the tally (every kind).
fn delivered(exit: &Exit) -> anyhow::Result<u64> {
    let tally = exit.tally.as_ref().context("the agent printed no tally")?;
    Ok(["connect", "retransmit", "reset", "close", "drop"]
        .iter()
        .map(|k| tally.get(*k).copied().unwrap_or(0))
        .sum())
}

/// Events the agent made from counters it read (dropped data segments, listen overflows,
/// conntrack): numbered like the kernel's.
fn sampled(exit: &Exit) -> u64 {
    tally(exit, "sampled")
}

/// Events reported, each with a `seq`: delivered, less the agent's own traffic (its HTTP
/// endpoint's connections, left out and counted).
fn reported(exit: &Exit) -> anyhow::Result<u64> {
    let own = exit
        .tally
        .as_ref()
        .and_then(|t| t.get("own_traffic").copied())
        .context("the tally has no own_traffic")?;
    Ok(delivered(exit)? + sampled(exit) - own)
}

fn tally(exit: &Exit, key: &str) -> u64 {
    exit.tally
        .as_ref()
        .and_then(|t| t.get(key).copied())
        .unwrap_or(0)
}

/// The log's sequence numbers account for every delivered event: each is in the log once, in
/// order, or was counted lost after delivery (stages queue and log).
fn assert_accounted(events: &[Value], exit: &Exit) -> anyhow::Result<SeqAccount> {
    let reported = reported(exit)?;
    let account = seqlog::account(events, reported)?;
    let lost_after_delivery = tally(exit, "queue") + tally(exit, "log");
    ensure!(
        account.repeated == 0 && account.out_of_order == 0 && account.beyond == 0,
        "the log repeats or reorders events: {account:?}"
    );
    ensure!(
        account.missing == lost_after_delivery,
        "{} events reported, {} in the log, {} counted lost after delivery: {account:?}",
        reported,
        account.lines,
        lost_after_delivery
    );
    Ok(account)
}

/// Waits until nothing of `objects` is left in the kernel (at most 5 s); what is left.
fn left_in_kernel(objects: &BpfObjects, pid: u32) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = objects.still_in_kernel(pid)?;
        if left.is_empty() || Instant::now() > deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stalled_reader_loses_only_what_it_counts() -> anyhow::Result<()> {
    const STALL: Duration = Duration::from_secs(2);
    let lab = Lab::new(70)?;
    let mut agent = Agent::start_with_args(&["--no-metrics", "--ring-buffer-bytes", "65536"])?;
    let storm = Storm::start(&lab, 8080, 2, 1_000_000);
    ensure!(
        storm.wait_for(500, Duration::from_secs(30)),
        "the storm made only {} connections",
        storm.made()
    );
    // The reader stops; the kernel programs go on producing into a 64 KiB ring.
    agent.signal(libc::SIGSTOP);
    let before = storm.made();
    std::thread::sleep(STALL);
    let during = storm.made() - before;
    agent.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(500));
    let made = storm.stop();
    lab.settle(Duration::from_secs(10))?;
    let exit = agent.shutdown()?;
    let (produced, ringbuf) = (tally(&exit, "kernel"), tally(&exit, "ringbuf"));
    let (delivered, undecodable) = (delivered(&exit)?, tally(&exit, "undecodable"));
    ensure!(
        produced == delivered + ringbuf + undecodable,
        "produced {produced} != delivered {delivered} + lost in the ring buffer {ringbuf} + \
         undecodable {undecodable}: {:?}",
        exit.tally
    );
    ensure!(
        ringbuf > 0,
        "{during} connections during a {STALL:?} stall did not overflow a 64 KiB ring: {:?}",
        exit.tally
    );
    ensure!(undecodable == 0, "{:?}", exit.tally);
    // What was delivered is in the log, each event once.
    let bytes = std::fs::read(agent.log_path().context("a log")?)?;
    let events = seqlog::whole_lines(&bytes, "the log")?;
    let account = assert_accounted(&events, &exit)?;
    eprintln!(
        "figure: reader stopped {STALL:?} under a storm ({made} connections, {during} during the \
         stall), 64 KiB ring: produced {produced} = delivered {delivered} + lost in the ring \
         buffer {ringbuf} (+ undecodable {undecodable}); map {}, queue {}, log {}; {} lines \
         in the log, seq without gap",
        tally(&exit, "map"),
        tally(&exit, "queue"),
        tally(&exit, "log"),
        account.lines
    );
    Ok(())
}

#[test]
fn sigterm_mid_storm_flushes_the_log_and_detaches() -> anyhow::Result<()> {
    let lab = Lab::new(71)?;
    let mut agent = Agent::start()?;
    let pid = agent.pid().context("the agent runs")?;
    let objects = BpfObjects::of(pid)?;
    ensure!(
        !objects.programs.is_empty() && !objects.links.is_empty(),
        "the agent holds no programs or links: {objects:?}"
    );
    let storm = Storm::start(&lab, 8080, 2, 1_000_000);
    ensure!(
        storm.wait_for(2_000, Duration::from_secs(60)),
        "the storm made only {} connections",
        storm.made()
    );
    let exit = agent.shutdown_with(libc::SIGTERM)?;
    let made = storm.stop();
    let log = agent.log_path().context("a log")?;
    let bytes = std::fs::read(log)?;
    let events = seqlog::whole_lines(&bytes, "the log")?;
    let account = assert_accounted(&events, &exit)?;
    ensure!(tally(&exit, "log") == 0, "{:?}", exit.tally);
    let left = left_in_kernel(&objects, pid)?;
    ensure!(
        left.is_empty(),
        "left in the kernel after SIGTERM: {left:#?}"
    );
    eprintln!(
        "figure: SIGTERM after {made} connections of a storm: exit 0; {} events logged, every \
         line whole, seq without gap or repeat (queue loss {}); {} programs and {} links gone",
        account.lines,
        tally(&exit, "queue"),
        objects.programs.len(),
        objects.links.len()
    );
    Ok(())
}

#[test]
fn kill_9_leaves_nothing_attached_and_a_restart_attaches_cleanly() -> anyhow::Result<()> {
    let lab = Lab::new(72)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let client_ip = IpAddr::from(lab.client_v4());
    for hooks in ["btf", "classic"] {
        let mut agent = Agent::start_with_args(&["--no-metrics", "--hooks", hooks])?;
        let pid = agent.pid().context("the agent runs")?;
        let objects = BpfObjects::of(pid)?;
        let attached = objects.still_in_kernel(pid)?;
        ensure!(
            attached
                .iter()
                .any(|l| l.starts_with("link") || l.starts_with("perf")),
            "{hooks}: bpftool shows nothing attached for the running agent: {attached:#?}"
        );
        let status = agent.end_with(libc::SIGKILL)?;
        ensure!(status.signal() == Some(libc::SIGKILL), "{status}");
        let left = left_in_kernel(&objects, pid)?;
        ensure!(
            left.is_empty(),
            "{hooks}: left in the kernel after kill -9: {left:#?}"
        );

        let again = Agent::start_with_args(&["--no-metrics", "--hooks", hooks])?;
        let listener = serve(&lab, server, 1, traffic::echo);
        let local = lab
            .client("lab-client", move || {
                let attempt = socket::connect(client_ip, server, None);
                let stream = attempt.result.expect("connect");
                traffic::exchange(stream, b"again").expect("echo");
                attempt.local
            })
            .join()
            .expect("client");
        listener.join().expect("server");
        lab.settle(Duration::from_secs(10))?;
        let events = again.stop()?;
        let seen = events.iter().any(|e| {
            e["type"] == "connect"
                && e["outcome"] == "established"
                && e["src_port"] == local.port()
                && e["dst_port"] == server.port()
        });
        ensure!(seen, "{hooks}: the restarted agent did not log the connect");
        eprintln!(
            "figure: kill -9 ({hooks}): {} programs, {} links and their perf events gone; the \
             restart traced a connect",
            objects.programs.len(),
            objects.links.len()
        );
    }
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted and removed on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-full-{}", std::process::id()));
        let _ = Command::new("umount")
            .arg(&dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .context("cannot run mount")?;
        ensure!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.display()
        );
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.dir).status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One scrape: its status, the `stage="log"` loss it shows, and how long it took.
fn scrape_log_loss(addr: SocketAddr) -> anyhow::Result<(f64, Duration)> {
    let started = Instant::now();
    let (status, body) = http_get(addr, "/metrics")?;
    let took = started.elapsed();
    ensure!(status == 200, "/metrics answered {status}");
    let lost = body
        .lines()
        .find_map(|l| l.strip_prefix("connprobe_events_lost_total{stage=\"log\"} "))
        .and_then(|v| v.parse().ok())
        .context("no connprobe_events_lost_total{stage=\"log\"}")?;
    Ok((lost, took))
}

/// The file holds whole lines; while the agent may be writing, a partial tail is given a few
/// moments to be completed or cut back.
fn whole_while_running(path: &Path) -> anyhow::Result<Vec<Value>> {
    let mut last = None;
    for _ in 0..10 {
        let bytes = std::fs::read(path)?;
        match seqlog::whole_lines(&bytes, &path.display().to_string()) {
            Ok(events) => return Ok(events),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last.expect("tried"))
}

#[test]
fn a_full_disk_costs_counted_events_and_never_a_partial_line() -> anyhow::Result<()> {
    let lab = Lab::new(73)?;
    let tmpfs = Tmpfs::mount("1m")?;
    // Room to free later: a quarter of the disk.
    let filler = tmpfs.dir.join("filler");
    std::fs::write(&filler, vec![b'.'; 256 << 10])?;
    let log = tmpfs.dir.join("events.jsonl");
    let mut agent = Agent::launch(Launch {
        json_log: Some(log.clone()),
        metrics: true,
        remove_log: false,
        ..Launch::from_env(&[])?
    })?;
    let addr = agent.metrics_addr().context("metrics")?;

    // Fill the disk: the storm runs until writes fail, while /metrics keeps being scraped.
    let storm = Storm::start(&lab, 8080, 2, 40_000);
    let mut scrapes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let lost_when_full = loop {
        let (lost, took) = scrape_log_loss(addr)?;
        scrapes.push(took);
        if lost > 0.0 {
            break lost;
        }
        ensure!(Instant::now() < deadline, "the disk never filled");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Scrapes go on while writes fail.
    for _ in 0..10 {
        scrapes.push(scrape_log_loss(addr)?.1);
        std::thread::sleep(Duration::from_millis(100));
    }
    let made_full = storm.stop();
    std::thread::sleep(Duration::from_millis(500));
    let when_full = whole_while_running(&log)?;
    let last_seq_full = when_full
        .last()
        .and_then(|e| e["seq"].as_u64())
        .context("nothing was logged before the disk filled")?;
    let size_full = std::fs::metadata(&log)?.len();

    // Free space: writing resumes.
    std::fs::remove_file(&filler)?;
    let storm = Storm::start(&lab, 8080, 1, 200);
    ensure!(storm.wait_for(200, Duration::from_secs(30)));
    let made_after = storm.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let resumed = loop {
        let events = whole_while_running(&log)?;
        if events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .is_some_and(|s| s > last_seq_full)
        {
            break events;
        }
        ensure!(
            Instant::now() < deadline,
            "writing did not resume after space was freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (lost_end, _) = scrape_log_loss(addr)?;
    let exit = agent.shutdown()?;
    let bytes = std::fs::read(&log)?;
    let events = seqlog::whole_lines(&bytes, "the log on the full disk")?;
    let account = assert_accounted(&events, &exit)?;
    ensure!(tally(&exit, "log") > 0, "{:?}", exit.tally);
    ensure!(resumed.len() > when_full.len());
    scrapes.sort();
    eprintln!(
        "figure: disk full (1 MiB tmpfs, {made_full} connections): the log stopped at {size_full} \
         bytes with {} whole lines; /metrics answered all {} scrapes (max {:?}); {} events \
         counted lost at stage log ({lost_when_full} at the first failing scrape, {lost_end} \
         before stopping); after 256 KiB were freed writing resumed ({made_after} more \
         connections); the final log: {} lines, every line whole, missing seq = lost log + \
         queue = {}",
        when_full.len(),
        scrapes.len(),
        scrapes.last().copied().unwrap_or_default(),
        tally(&exit, "log"),
        account.lines,
        account.missing
    );
    drop(tmpfs);
    Ok(())
}

/// A fresh directory for a test's logs, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("connprobe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn sighup_reopens_the_log_and_no_event_is_lost_or_repeated() -> anyhow::Result<()> {
    let lab = Lab::new(74)?;
    let dir = TempDir::new("sighup")?;
    let log = dir.0.join("events.jsonl");
    let mut agent = Agent::launch(Launch {
        json_log: Some(log.clone()),
        remove_log: false,
        ..Launch::from_env(&["--no-metrics"])?
    })?;
    let storm = Storm::start(&lab, 8080, 2, 1_000_000);
    ensure!(storm.wait_for(200, Duration::from_secs(30)));
    // logrotate without copytruncate: rename, then SIGHUP; five times under the storm.
    let mut files = Vec::new();
    for n in 1..=5 {
        std::thread::sleep(Duration::from_millis(300));
        // The agent opened the path anew after the last SIGHUP, and the storm's events go there.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&log).map_or(0, |m| m.len()) == 0 {
            ensure!(
                Instant::now() < deadline,
                "the log was not reopened, or nothing was written to it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let moved = dir.0.join(format!("events.jsonl.moved{n}"));
        std::fs::rename(&log, &moved)?;
        agent.signal(libc::SIGHUP);
        files.push(moved);
    }
    std::thread::sleep(Duration::from_millis(400));
    let made = storm.stop();
    let exit = agent.shutdown()?;
    files.push(log);
    let events = seqlog::read_log(&files)?;
    let account = assert_accounted(&events, &exit)?;
    ensure!(account.missing == 0, "{account:?} {:?}", exit.tally);
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .collect();
    ensure!(
        sizes.iter().all(|s| *s > 0),
        "a file got no events: {sizes:?}"
    );
    ensure!(exit.stderr.contains("reopened the JSON log"));
    eprintln!(
        "figure: SIGHUP x5 under a storm of {made} connections: {} events in 6 files, seq \
         0..={} without gap, repeat or reordering",
        account.lines,
        account.lines.saturating_sub(1)
    );
    Ok(())
}

#[test]
fn size_rotation_keeps_every_event_once() -> anyhow::Result<()> {
    let lab = Lab::new(75)?;
    let dir = TempDir::new("rotation")?;
    let log = dir.0.join("events.jsonl");
    let agent = Agent::launch(Launch {
        json_log: Some(log.clone()),
        remove_log: false,
        ..Launch::from_env(&[
            "--no-metrics",
            "--json-log-max-size",
            "64K",
            "--json-log-max-files",
            "1000",
        ])?
    })?;
    let storm = Storm::start(&lab, 8080, 2, 3_000);
    ensure!(storm.wait_for(3_000, Duration::from_secs(60)));
    let made = storm.stop();
    let mut agent = agent;
    let exit = agent.shutdown()?;
    let files = seqlog::log_files(&log, 1000);
    let events = seqlog::read_log(&files)?;
    let account = assert_accounted(&events, &exit)?;
    ensure!(account.missing == 0, "{account:?} {:?}", exit.tally);
    let largest = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .max()
        .unwrap_or(0);
    ensure!(files.len() > 10, "only {} files", files.len());
    ensure!(largest <= 64 << 10, "a file of {largest} bytes");
    eprintln!(
        "figure: rotation at 64 KiB under a storm of {made} connections: {} files (largest \
         {largest} bytes), {} events, seq without gap, repeat or reordering",
        files.len(),
        account.lines
    );
    Ok(())
}

/// Sets the calling thread's name (the comm the kernel reports) to raw bytes.
fn set_comm(raw: &[u8]) {
    let mut name = [0u8; 16];
    name[..raw.len()].copy_from_slice(raw);
    // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl: {}", std::io::Error::last_os_error());
}

#[test]
fn hostile_process_names_stay_one_valid_line_and_valid_metrics() -> anyhow::Result<()> {
    const HOSTILE: &[u8] = b"a\"b\\c\nd\xff}\x01{\r";
    let lab = Lab::new(76)?;
    let server = SocketAddr::new(lab.server_v4().into(), 8080);
    let client_ip = IpAddr::from(lab.client_v4());
    let agent = Agent::start_with_metrics(&["--by-comm"])?;
    let listener = serve(&lab, server, 1, traffic::echo);
    let local = lab
        .client("lab-hostile", move || {
            set_comm(HOSTILE);
            let attempt = socket::connect(client_ip, server, None);
            traffic::exchange(attempt.result.expect("connect"), b"x").expect("echo");
            attempt.local
        })
        .join()
        .expect("client");
    listener.join().expect("server");
    lab.settle(Duration::from_secs(10))?;
    let addr = agent.metrics_addr().context("metrics")?;
    let expected = String::from_utf8_lossy(HOSTILE).into_owned();
    let escaped = expected
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = http_get(addr, "/metrics")?;
        ensure!(status == 200);
        if body.contains(&format!("comm=\"{escaped}\"")) {
            break body;
        }
        ensure!(
            Instant::now() < deadline,
            "no series with comm=\"{escaped}\":\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run promtool (Debian package prometheus)")?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(body.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    ensure!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Every log line parsed as one JSON object (Agent::stop checks that).
    let events = agent.stop()?;
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| e["src_port"] == local.port() && e["side"] == "client")
        .collect();
    ensure!(!ours.is_empty(), "the hostile client's events are missing");
    for event in &ours {
        ensure!(event["comm"] == expected.as_str(), "{event}");
    }
    eprintln!(
        "figure: comm bytes {HOSTILE:?}: {} events, each one valid JSON line with comm \
         {expected:?}; /metrics label comm=\"{escaped}\" passes promtool check metrics",
        ours.len()
    );
    Ok(())
}

/// One GET on a fresh connection: how long until the whole answer was read.
fn timed_scrape(addr: SocketAddr) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (status, _) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The answer to one raw request (status line, or what happened).
fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return "no connection".into();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let written = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    match (text.lines().next(), written) {
        (Some(line), _) if !line.is_empty() => line.to_string(),
        (_, Err(e)) => format!("closed while writing ({e})"),
        _ => "closed".into(),
    }
}

/// `count` scrapes, a fresh connection each, every 20 ms: their times, sorted.
fn scrapes(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        times.push(timed_scrape(addr)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    times.sort();
    Ok(times)
}

fn summary(times: &[Duration]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(times, 0.50).as_secs_f64() * 1e3,
        percentile(times, 0.99).as_secs_f64() * 1e3,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    )
}

/// Slowloris: `count` connections that send a request line, then one header byte every
/// 100 ms and never finish; each reconnects when the agent cuts it. Returns the (re)connects.
fn slowloris(
    addr: SocketAddr,
    count: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut connects = 0u64;
        let mut streams: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            for slot in streams.iter_mut() {
                let alive = match slot {
                    Some(s) => s.write_all(b"X").is_ok(),
                    None => false,
                };
                if !alive {
                    *slot = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                        .ok()
                        .and_then(|mut s| {
                            s.set_nonblocking(true).ok()?;
                            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").ok()?;
                            Some(s)
                        });
                    connects += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        connects
    })
}

/// A request with 1 MB of headers, sent every `every` by each of `threads` threads; what
/// came back, counted ("431", "closed", or the status line).
fn header_bombs(
    addr: SocketAddr,
    threads: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<BTreeMap<String, u64>>> {
    (0..threads)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
                while request.len() < 1 << 20 {
                    request.extend_from_slice(b"X-Junk: ");
                    request.extend_from_slice(&[b'a'; 1000]);
                    request.extend_from_slice(b"\r\n");
                }
                request.extend_from_slice(b"\r\n");
                let mut seen = BTreeMap::new();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                    let answer = raw_request(addr, &request);
                    let key = if answer.starts_with("HTTP/1.1 431") {
                        "431".to_string()
                    } else if answer.starts_with("closed") {
                        "closed".to_string()
                    } else {
                        answer
                    };
                    *seen.entry(key).or_default() += 1;
                    std::thread::sleep(every);
                }
                seen
            })
        })
        .collect()
}

#[test]
fn the_metrics_endpoint_answers_a_scraper_under_abuse() -> anyhow::Result<()> {
    // The lab only serializes this with the other kernel tests; the abuse is on loopback.
    let _lab = Lab::new(77)?;
    let fds = storm::raise_fd_limit();
    ensure!(fds >= 2_000, "the open file limit is {fds}");
    let mut agent = Agent::start_with_metrics(&[])?;
    let addr = agent.metrics_addr().context("metrics")?;
    let quiet = scrapes(addr, 100)?;

    // 1,000 connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        idle.push(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?);
    }
    std::thread::sleep(Duration::from_millis(200));
    let with_idle = scrapes(addr, 100)?;

    // Slowloris on top.
    let stop = Arc::new(AtomicBool::new(false));
    let slow = slowloris(addr, 100, Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let with_slow = scrapes(addr, 100)?;

    // And requests with 1 MB of headers: four senders, each ten a second (40 MB/s of junk).
    let bombers = header_bombs(addr, 4, Duration::from_millis(100), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(500));
    let with_all = scrapes(addr, 200)?;

    // /diagnose with junk windows: clear 400s; a huge but valid one is answered.
    let mut windows = Vec::new();
    for (window, expected) in [
        ("soon", 400),
        ("-5m", 400),
        ("1e300", 400),
        ("99999999999999999999999h", 400),
        ("%ff%fe", 400),
        ("5m%00", 400),
        ("NaN", 400),
        ("1e19", 200),
        ("100y", 200),
    ] {
        let (status, body) = http_get(addr, &format!("/diagnose?window={window}"))?;
        ensure!(
            status == expected,
            "/diagnose?window={window}: {status} {body}"
        );
        windows.push(format!(
            "{window}: {status} {}",
            body.trim().chars().take(60).collect::<String>()
        ));
    }
    let long = "9".repeat(6_000);
    let (status, _) = http_get(addr, &format!("/diagnose?window={long}"))?;
    ensure!(status == 400, "a 6,000-digit window: {status}");

    stop.store(true, Ordering::Release);
    let reconnects = slow.join().expect("slowloris");
    let mut bombs: BTreeMap<String, u64> = BTreeMap::new();
    for b in bombers {
        for (k, v) in b.join().expect("header bomber") {
            *bombs.entry(k).or_default() += v;
        }
    }
    drop(idle);
    let (status, body) = http_get(addr, "/healthz")?;
    ensure!(status == 200, "{status} {body}");
    agent.shutdown()?;

    ensure!(
        bombs.keys().all(|k| k == "431" || k == "closed"),
        "1 MB of headers got: {bombs:?}"
    );
    eprintln!(
        "figure: /metrics, a fresh connection every 20 ms: quiet {}; with 1,000 idle \
         connections {}; plus 100 slowloris connections {}; plus 1 MB header requests at \
         40/s {} ({reconnects} slowloris (re)connects; header requests answered {bombs:?})",
        summary(&quiet),
        summary(&with_idle),
        summary(&with_slow),
        summary(&with_all),
    );
    for w in &windows {
        eprintln!("figure: /diagnose?window={w}");
    }
    for (phase, times) in [
        ("1,000 idle connections", &with_idle),
        ("slowloris", &with_slow),
        ("1 MB headers", &with_all),
    ] {
        let p99 = percentile(times, 0.99);
        ensure!(
            p99 <= Duration::from_millis(50),
            "p99 {p99:?} with {phase} (quiet: {})",
            summary(&quiet)
        );
    }
    Ok(())
}

#[test]
fn half_open_connects_past_the_socket_map_are_counted() -> anyhow::Result<()> {
    const CONNECTS: u64 = 20_000;
    const WINDOW: usize = 4_096;
    const MAX_SOCKETS: u32 = 1_024;
    let mut lab = Lab::new(78)?;
    lab.server_rule("tcp dport 9100-9115 drop")?;
    let fds = storm::raise_fd_limit();
    ensure!(fds as usize > WINDOW + 100, "the open file limit is {fds}");
    let mut agent = Agent::start_with_args(&[
        "--no-metrics",
        "--hooks",
        "classic",
        "--max-sockets",
        &MAX_SOCKETS.to_string(),
    ])?;
    let objects = BpfObjects::of(agent.pid().context("runs")?)?;
    // The per-socket records: the LRU map of --max-sockets, named as probe-common names it.
    let map = objects
        .map_named("SOCKETS")?
        .with_context(|| format!("the agent holds no SOCKETS map: {objects:?}"))?;
    ensure!(
        map.map_type == bpf::LRU_HASH && map.max_entries == MAX_SOCKETS,
        "the SOCKETS map is not an LRU hash of {MAX_SOCKETS} entries: {map:?}"
    );
    let samples = Arc::new(Mutex::new(Vec::new()));
    let made = {
        let samples = Arc::clone(&samples);
        storm::half_open(&lab, 9100..=9115, CONNECTS, WINDOW, 2_000, move |n| {
            let entries = bpf::map_entries(map.id).unwrap_or(usize::MAX);
            samples.lock().unwrap().push((n, entries));
        })
    };
    ensure!(made == CONNECTS, "made {made}");
    std::thread::sleep(Duration::from_secs(1));
    let exit = agent.shutdown()?;
    let logged = storm::half_open_logged(agent.log_path().context("log")?, lab.server_v4().into())?;
    let samples = samples.lock().unwrap().clone();
    let most = samples.iter().map(|(_, e)| *e).max().unwrap_or(0);
    let (lost_map, ringbuf) = (tally(&exit, "map"), tally(&exit, "ringbuf"));
    eprintln!(
        "figure: {CONNECTS} half-open connects ({WINDOW} open at once) through --max-sockets \
         {MAX_SOCKETS} (classic): the map held at most {most} entries (samples {samples:?}); \
         {} cancelled connects logged, {} of them without their start record; map loss \
         {lost_map}; ring buffer loss {ringbuf}",
        logged.cancelled, logged.without_start
    );
    assert_half_open(&logged, most, MAX_SOCKETS, lost_map, ringbuf, CONNECTS)
}

/// What a half-open storm through a socket map too small for it must show: the map never
/// past its size; every connect reported (or counted lost in the ring buffer); every connect
/// that lost its start record counted under `map` (which also counts the host's other
/// traffic); and most connects did lose it (the storm did overflow the map).
fn assert_half_open(
    logged: &storm::HalfOpenLogged,
    most_entries: usize,
    max_sockets: u32,
    lost_map: u64,
    ringbuf: u64,
    connects: u64,
) -> anyhow::Result<()> {
    ensure!(
        most_entries <= max_sockets as usize,
        "the socket map held {most_entries} entries"
    );
    ensure!(
        logged.cancelled + ringbuf >= connects && logged.cancelled <= connects,
        "{} cancelled connects logged, {ringbuf} lost in the ring buffer, of {connects}",
        logged.cancelled
    );
    ensure!(
        logged.without_start <= lost_map,
        "{} connects ended without their record, only {lost_map} counted under map",
        logged.without_start
    );
    ensure!(
        logged.without_start >= connects / 2,
        "only {} of {connects} connects lost their record: the map did not overflow",
        logged.without_start
    );
    Ok(())
}

/// `connprobe analyze FILE`: exit status and stderr.
fn analyze(file: &Path) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let binary = std::env::var_os("CONNPROBE_BIN").context("CONNPROBE_BIN is not set")?;
    let output = Command::new(binary)
        .arg("analyze")
        .arg(file)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `connprobe analyze -` fed a 100 MB line through a pipe, generated as it is written: its
/// exit status, stderr, and the most memory it held (`VmHWM`, read before the line ends).
fn analyze_a_100_mb_line(first: &str) -> anyhow::Result<(std::process::ExitStatus, String, u64)> {
    let binary = std::env::var_os("CONNPROBE_BIN").context("CONNPROBE_BIN is not set")?;
    let mut child = Command::new(binary)
        .args(["analyze", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdin = child.stdin.take().context("stdin")?;
    writeln!(stdin, "{first}")?;
    stdin.write_all(b"{\"type\":\"connect\",\"comm\":\"")?;
    let chunk = vec![b'A'; 1 << 20];
    for _ in 0..100 {
        stdin.write_all(&chunk)?;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    // Whatever happens to the rest (the reader may have stopped at the first byte past the
    // limit), the line ends.
    let _ = stdin.write_all(b"\"}\n");
    drop(stdin);
    let output = child.wait_with_output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        hwm_kib * 1024,
    ))
}

#[test]
fn analyze_answers_hostile_logs_with_a_sentence_never_a_panic() -> anyhow::Result<()> {
    let dir = TempDir::new("hostile-logs")?;
    let good = r#"{"type":"connect","seq":0,"time":"2026-12-03T11:03:24.782613Z","pid":1,"comm":"curl","side":"client","src_ip":"127.0.0.1","src_port":47476,"dst_ip":"127.0.0.1","dst_port":1,"outcome":"failed","reason":"refused","errno":"ECONNREFUSED","latency_us":48,"syn_retransmits":0}"#;
    let cut = format!("{good}\n{}", &good[..90]);
    let mut junk = format!("{good}\n").into_bytes();
    junk.extend((0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8));
    let cases: [(&str, Vec<u8>, i32, &str); 3] = [
        (
            "cut.jsonl",
            cut.into_bytes(),
            0,
            "ends in an incomplete line (line 2",
        ),
        ("junk.jsonl", junk, 1, "line 2 is not a connprobe event"),
        (
            "half.jsonl",
            format!("{}\n{good}\n", &good[..100]).into_bytes(),
            1,
            "line 1 is not a connprobe event",
        ),
    ];
    let mut figures = Vec::new();
    for (name, bytes, code, says) in cases {
        let (file, size) = (dir.0.join(name), bytes.len());
        std::fs::write(&file, &bytes)?;
        let (status, stderr) = analyze(&file)?;
        ensure!(
            status.code() == Some(code) && stderr.contains(says),
            "{name}: exit {status}, expected {code} and {says:?}:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked"), "{name}: {stderr}");
        figures.push(format!(
            "{name} ({size} bytes): exit {code}, {:?}",
            stderr.lines().last().unwrap_or("").trim()
        ));
    }
    let (status, stderr, held) = analyze_a_100_mb_line(good)?;
    ensure!(
        status.code() == Some(1)
            && stderr.contains("- line 2 is not a connprobe event: it is longer than 1 MiB"),
        "a 100 MB line: exit {status}:\n{stderr}"
    );
    ensure!(
        held < 64 << 20,
        "analyze held {} MiB while reading a 100 MB line",
        held >> 20
    );
    figures.push(format!(
        "a 100 MB line on stdin: exit 1, at most {} MiB resident, {:?}",
        held >> 20,
        stderr.lines().last().unwrap_or("").trim()
    ));
    for f in figures {
        eprintln!("figure: analyze {f}");
    }
    Ok(())
}
