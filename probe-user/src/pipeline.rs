//! Wiring and shutdown. Everything that can fail on bad input (log path, metrics port,
//! privileges, kernel support) fails before the first event; after that the agent runs until a
//! signal or `--duration`, then detaches, drains, flushes and prints its tally.
use std::{
    io::{self, IsTerminal},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::{SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray};
use probe_common::Counter;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    aggregate::{Aggregator, AggregatorConfig},
    cli::{HookMode, RunArgs},
    decode::{Clock, Decoder},
    diagnose::{EvidenceWriter, FlightRecorder, TriggerConfig, diagnose_handler},
    dns::{self, DnsConfig, DnsState, SharedDns},
    event::{Event, EventDetail, Side},
    export::{
        http::{self, DestinationsFn, DiagnoseFn, HttpState, MetricsFn},
        json_log::{self, LogBatch},
        prometheus::{PrometheusExporter, Sources},
        view::{View, ViewRequest, ViewSources},
        web_config::WebSecurity,
    },
    loader::{self, KernelMaps, LoaderConfig, ProgramRuns, read_counter},
    logging,
    own_traffic::OwnTraffic,
    privileges,
    reader::{BATCH, spawn_program_log, spawn_reader},
    samplers::Samplers,
    tally::{KernelCounts, LossStage, Tally},
    top::{Console, screen},
    workload::Workloads,
};

/// How often idle destinations are expired and the kernel's counters read.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The kernel programs' cumulative counters, summed over CPUs.
fn kernel_counts(counters: &PerCpuArray<MapData, u64>, runs: &ProgramRuns) -> KernelCounts {
    KernelCounts {
        produced: [
            Counter::ProducedConnect,
            Counter::ProducedRetransmit,
            Counter::ProducedReset,
            Counter::ProducedClose,
            Counter::ProducedDrop,
        ]
        .map(|c| read_counter(counters, c))
        .iter()
        .sum(),
        lost_ringbuf: read_counter(counters, Counter::LostRingbuf),
        lost_map: read_counter(counters, Counter::LostMap),
        read_errors: read_counter(counters, Counter::ReadError),
        missed_runs: runs.missed(),
    }
}

/// The DNS programs' counters (packets handed over, lost in their ring) into the DNS state.
fn dns_kernel_counts(dns: &SharedDns, counters: &PerCpuArray<MapData, u64>) {
    let produced = read_counter(counters, Counter::ProducedDns);
    let lost = read_counter(counters, Counter::LostDnsRingbuf);
    let mut dns = dns.lock().unwrap_or_else(|e| e.into_inner());
    dns.counts.kernel_produced = produced;
    dns.counts.lost_ringbuf = dns.counts.lost_ringbuf.max(lost);
}

/// Reads `--web-config-file` again (SIGHUP): new certificates and users apply to the
/// connections accepted from then on. A file that no longer loads keeps the old settings.
fn reload_web_config(path: Option<&std::path::Path>, http: &HttpState) {
    let Some(path) = path else { return };
    match tokio::task::block_in_place(|| WebSecurity::load(path)) {
        Ok(web) => {
            http.set_web_security(web);
            tracing::info!("read the web config {} again", path.display());
        }
        Err(e) => tracing::error!("{e}; the metrics endpoint keeps its previous settings"),
    }
}

/// Size rotation of the JSON log, from `--json-log-max-size` and `--json-log-max-files`.
fn log_rotation(args: &RunArgs) -> anyhow::Result<Option<json_log::Rotation>> {
    let Some(max_size) = args.json_log_max_size else {
        return Ok(None);
    };
    if args.json_log.as_deref() == Some(std::path::Path::new("-")) {
        anyhow::bail!("--json-log-max-size rotates a file: give --json-log a path, not -");
    }
    Ok(Some(json_log::Rotation {
        max_size,
        max_files: args.json_log_max_files,
    }))
}

/// The evidence triggers' settings from `connprobe run` flags; `None` without `--evidence-dir`.
fn trigger_config(args: &RunArgs) -> Option<TriggerConfig> {
    Some(TriggerConfig {
        failure_ratio: args.trigger_failure_ratio,
        latency: args.trigger_latency,
        min_attempts: args.trigger_min_attempts,
        ..TriggerConfig::new(args.evidence_dir.clone()?)
    })
}

/// Client connects to an address a recent DNS answer gave get that answer's name.
fn name_destinations(batch: &mut [Event], dns: &SharedDns) {
    let mut wanted = batch
        .iter_mut()
        .filter(|e| e.side == Some(Side::Client))
        .filter_map(|e| match &mut e.detail {
            EventDetail::Connect(c) => Some((e.dst.ip(), c)),
            _ => None,
        })
        .peekable();
    if wanted.peek().is_none() {
        return;
    }
    // Answers the DNS reader has not read yet (it is not woken for each) are read first.
    dns::drain(dns);
    let now = std::time::Instant::now();
    let dns = dns.lock().unwrap_or_else(|e| e.into_inner());
    if dns.names.is_empty() {
        return;
    }
    for (ip, connect) in wanted {
        connect.dst_name = dns.names.name_of(ip, now);
    }
}

/// Every batch the reader decodes (and every one the samplers make) goes to the aggregator, the
/// flight recorder and the JSON log's queue (losses at the queue or past a failed writer are
/// counted in the tally), after the agent's own traffic (`own`) is taken out and counted, and
/// connects are named from DNS.
/// What is left is numbered (`seq`) here, so a gap in the log's numbers is a loss counted at
/// `queue` or `log`, nothing else.
fn consumer(
    aggregator: Arc<Mutex<Aggregator>>,
    recorder: Arc<Mutex<FlightRecorder>>,
    log: Option<SyncSender<LogBatch>>,
    tally: Arc<Tally>,
    own: Option<OwnTraffic>,
    dns: Option<SharedDns>,
) -> impl FnMut(&mut Vec<Event>) + Send + 'static {
    move |batch| {
        if let Some(own) = &own {
            let before = batch.len();
            batch.retain(|e| !own.matches(e));
            let skipped = before - batch.len();
            if skipped > 0 {
                tally.add_own_traffic(skipped as u64);
            }
        }
        if let Some(dns) = &dns {
            name_destinations(batch, dns);
        }
        for event in batch.iter_mut() {
            event.seq = tally.next_seq();
        }
        {
            let mut aggregator = aggregator.lock().unwrap_or_else(|e| e.into_inner());
            for event in batch.iter() {
                aggregator.record(event);
            }
        }
        recorder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(batch.iter());
        if let Some(log) = &log {
            let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
            match log.try_send(LogBatch::Events(full)) {
                Ok(()) => {}
                Err(TrySendError::Full(lost)) => {
                    tally.add_lost(LossStage::Queue, lost.len() as u64)
                }
                Err(TrySendError::Disconnected(lost)) => {
                    tally.add_lost(LossStage::Log, lost.len() as u64)
                }
            }
        }
    }
}

/// The agent's runtime: two worker threads, none of which holds a capability (only the main
/// thread, which loads and attaches, ever does).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("connprobe")
        .on_thread_start(privileges::drop_in_this_thread)
        .enable_all()
        .build()
}

/// Why the agent stopped.
enum Stop {
    Signal(&'static str),
    Duration,
    Told,
    ReaderFailed(anyhow::Error),
}

/// Hands the heap that loading freed back to the kernel: loading (the kernel's BTF, the
/// programs' object) leaves some 11 MiB free in glibc's heap, which glibc keeps resident
/// (`malloc_trim` called from gdb on an idle agent: 32.9 -> 21.3 MiB resident; in the bench's
/// destination spread, 34.8 -> 21.2 MiB before the first destination). Later allocations fault
/// the pages back in only as they use them.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How another command (`connprobe watch`) runs the agent inside itself: no live view and no
/// tally printed, word once the programs are attached, and a stop when the caller says.
pub struct Embedding {
    /// Called once the programs are attached and the agent traces (dropped uncalled when the
    /// agent fails before).
    pub attached: Box<dyn FnOnce() + Send>,
    /// The agent stops (detaches, drains, flushes) when this resolves.
    pub stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// What an embedded run leaves for its caller: the DNS state (its recent exchanges) and the
/// tally (what was lost).
pub struct Embedded {
    pub dns: Option<SharedDns>,
    pub tally: Arc<Tally>,
}

/// `connprobe run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    run_embedded(args, None).await.map(drop)
}

/// The agent, run on its own (`embedding: None`) or inside another command.
pub async fn run_embedded(args: RunArgs, embedding: Option<Embedding>) -> anyhow::Result<Embedded> {
    let embedded = embedding.is_some();
    let (mut attached, mut told) = match embedding {
        Some(e) => (Some(e.attached), Some(e.stop)),
        None => (None, None),
    };
    let clock = Clock::now();
    let started = SystemTime::now();
    let tally = Arc::new(Tally::default());
    let aggregator = Arc::new(Mutex::new(Aggregator::new(AggregatorConfig {
        max_destinations: args.max_destinations,
        destination_idle: args.destination_idle,
        by_comm: args.by_comm(),
        by_container: args.by_container(),
    })));
    if args.by_comm {
        tracing::warn!("--by-comm is deprecated and will go; use --by comm");
    }
    let recorder = Arc::new(Mutex::new(FlightRecorder::new(args.recorder_events)));

    // Bad input fails here, before anything is loaded.
    let dns_config = match args.no_dns {
        true => None,
        false => Some(DnsConfig::new(
            &args.dns_port,
            args.dns_timeout,
            args.dns_max_pending,
            args.dns_max_names,
            args.dns_max_resolvers,
        )?),
    };
    let dns_state = dns_config
        .as_ref()
        .map(|config| DnsState::shared(config, clock));
    let log_out = args
        .json_log
        .as_deref()
        .map(|path| json_log::open(path, log_rotation(&args)?))
        .transpose()?;
    let listener = match args.no_metrics {
        true => None,
        false => Some(http::bind(args.metrics_addr).await?),
    };
    let web_security = args
        .web_config_file
        .as_deref()
        .map(|path| tokio::task::block_in_place(|| WebSecurity::load(path)))
        .transpose()?;
    let evidence = trigger_config(&args)
        .map(|config| EvidenceWriter::new(config).map(|w| w.with_dns(dns_state.clone())))
        .transpose()?;
    let prometheus = Arc::new(PrometheusExporter::new(Sources {
        aggregator: aggregator.clone(),
        tally: tally.clone(),
        bundles_written: evidence
            .as_ref()
            .map(EvidenceWriter::bundles_written_counter),
    }));
    if let Some(dns) = &dns_state {
        prometheus.register(Box::new(dns::metrics::DnsCollector::new(dns.clone())));
    }
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

    let (log_tx, log_thread, log_reopen) = match log_out {
        Some(out) => {
            let writer = json_log::spawn_writer(out, args.log_encoder, tally.clone())
                .context("cannot start the JSON log writer")?;
            (Some(writer.queue), Some(writer.thread), Some(writer.reopen))
        }
        None => (None, None, None),
    };
    let (stop_http, http_stopped) = watch::channel(false);
    let diagnose: Arc<DiagnoseFn> = Arc::new(diagnose_handler(
        recorder.clone(),
        tally.clone(),
        started,
        dns_state.clone(),
    ));
    let metrics: Arc<MetricsFn> = Arc::new(move || prometheus.encode());
    let view_sources = ViewSources {
        aggregator: aggregator.clone(),
        recorder: recorder.clone(),
        tally: tally.clone(),
        started,
    };
    let destinations: Arc<DestinationsFn> = Arc::new(view_sources.clone().handler());
    let http_state =
        Arc::new(HttpState::new(metrics, Some(diagnose)).with_destinations(destinations));
    let scheme = web_security.as_ref().map_or("http", WebSecurity::scheme);
    if let Some(web) = web_security {
        http_state.set_web_security(web);
    }
    let own_traffic =
        (!args.no_metrics && !args.include_own_traffic).then(|| OwnTraffic::new(args.metrics_addr));
    let http_task =
        listener.map(|l| tokio::spawn(http::serve(l, http_state.clone(), http_stopped)));

    let config = LoaderConfig {
        hooks: args.hooks,
        ring_buffer_bytes: args.ring_buffer_bytes,
        max_sockets: args.max_sockets,
        socket_records: args.socket_records,
        drops: !args.no_drops,
        dns_ports: dns_config.as_ref().map(DnsConfig::kernel_ports),
    };
    let cgroup_root = match Workloads::for_this_host() {
        Ok(w) => Some(w.root().to_owned()),
        Err(why) => {
            tracing::warn!("{why}: cgroup, container_id and pod_uid stay null");
            None
        }
    };
    let mut readers = Vec::new();
    let mut dns_readers = Vec::new();
    let mut counters = None;
    let mut samplers = None;
    // One consumer for the reader and the samplers, behind a lock: numbering a batch (`seq`)
    // and handing it to the log happen together, so the log's numbers stay in order.
    let shared = Arc::new(Mutex::new(consumer(
        aggregator.clone(),
        recorder.clone(),
        log_tx.clone(),
        tally.clone(),
        own_traffic,
        dns_state.clone(),
    )));
    let shared_consumer = || {
        let shared = shared.clone();
        move |batch: &mut Vec<Event>| (shared.lock().unwrap_or_else(|e| e.into_inner()))(batch)
    };
    let probes = tokio::task::block_in_place(|| {
        loader::load_and_attach(&config, |maps: KernelMaps| {
            let (stop_tx, stop_rx) = watch::channel(false);
            spawn_program_log(maps.logger, stop_rx.clone());
            let consume = shared_consumer();
            if let Some(dns) = &dns_state {
                dns_readers.push((
                    stop_tx.clone(),
                    dns::spawn_reader(
                        maps.dns_events,
                        dns.clone(),
                        log_tx.clone(),
                        tally.clone(),
                        stop_rx.clone(),
                    ),
                ));
            }
            readers.push((
                stop_tx,
                spawn_reader(
                    maps.events,
                    Decoder {
                        clock,
                        reset_reasons: maps.reset_reasons,
                        drop_reasons: maps.drop_reasons.clone(),
                    },
                    cgroup_root
                        .clone()
                        .map(|root| Workloads::new(root, "/proc".into())),
                    tally.clone(),
                    consume,
                    stop_rx,
                ),
            ));
            counters = Some(maps.counters);
            samplers = Some(Samplers::new(
                maps.drop_counts,
                maps.listeners,
                maps.drop_reasons,
            ));
        })
    })?;
    // The samplers' events go the same way as the reader's; the empty programs of the
    // benchmark's floor count nothing.
    let mut sampled = samplers
        .filter(|_| args.hooks != HookMode::Empty)
        .map(|s| (s, shared_consumer()));
    drop(shared);
    drop(log_tx);
    // Readers of a failed first attempt (before a fallback) watch maps nothing writes to.
    let (stop_reader, mut reader) = readers.pop().context("the loader started no reader")?;
    for (stop, handle) in readers {
        let _ = stop.send(true);
        let _ = handle.await;
    }
    let dns_reader = dns_readers.pop().map(|(_, handle)| handle);
    for (stop, handle) in dns_readers {
        let _ = stop.send(true);
        let _ = handle.await;
    }
    let counters = counters.context("the loader handed over no counters")?;
    privileges::drop_after_attach(|| loader::counters_readable(&counters))?;
    release_freed_heap();
    let program_runs = ProgramRuns::find();
    tracing::debug!(
        "reading the skipped runs of {} programs from their fdinfo",
        program_runs.programs()
    );
    let plan = probes
        .plan
        .iter()
        .map(|(hook, how)| format!("{}={}", hook.tracepoint().1, how.as_str()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        "connprobe is tracing ({} programs attached: {plan})",
        probes.plan.len()
    );
    if args.hooks != HookMode::Empty {
        for missing in &probes.missing {
            tracing::info!("{missing}");
        }
    }
    if let Some(how) = &probes.dns {
        tracing::info!("watching DNS ({how})");
    }
    http_state.set_ready(true);
    if let Some(attached) = attached.take() {
        attached();
    }
    if !args.no_metrics {
        tracing::info!("metrics on {scheme}://{}/metrics", args.metrics_addr);
    }

    let stop_evidence = Arc::new(AtomicBool::new(false));
    let evidence_thread = match evidence {
        Some(writer) => Some(
            writer
                .spawn(aggregator.clone(), recorder.clone(), stop_evidence.clone())
                .context("cannot start the evidence writer")?,
        ),
        None => None,
    };

    // The live view: on a terminal, when the events are not going to the terminal too.
    let mut live = (!embedded
        && io::stdout().is_terminal()
        && args.json_log.as_deref() != Some(std::path::Path::new("-")))
    .then(|| LiveView::new(view_sources, args.metrics_addr, args.no_metrics))
    .transpose()?;
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let told = async {
        match told.as_mut() {
            Some(stop) => stop.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(told);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut stats = tokio::time::interval(args.stats_interval.max(Duration::from_millis(100)));
    stats.tick().await;
    let stop = loop {
        tokio::select! {
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sighup.recv() => {
                // logrotate's convention: it has renamed the log; open the path anew.
                tracing::info!("SIGHUP received; reopening the JSON log, reading the web config");
                if let Some(reopen) = &log_reopen {
                    reopen.request();
                }
                reload_web_config(args.web_config_file.as_deref(), &http_state);
            }
            _ = &mut deadline => break Stop::Duration,
            _ = &mut told => break Stop::Told,
            result = &mut reader => {
                let err = match result {
                    Ok(Ok(())) => anyhow::anyhow!("the ring buffer reader stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::Error::new(e).context("the ring buffer reader panicked"),
                };
                break Stop::ReaderFailed(err);
            }
            _ = housekeeping.tick() => {
                if let Some((samplers, consume)) = &mut sampled {
                    let mut batch = samplers.sample(SystemTime::now());
                    tally.add_sampled(batch.len() as u64);
                    consume(&mut batch);
                }
                tally.set_kernel(kernel_counts(&counters, &program_runs));
                if let Some(dns) = &dns_state {
                    dns_kernel_counts(dns, &counters);
                }
                aggregator
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expire_idle(SystemTime::now());
            }
            _ = stats.tick() => {
                if args.verbose > 0 {
                    eprintln!("connprobe: {}", tally.line());
                }
                if let Some(live) = &mut live {
                    live.draw();
                }
            }
        }
    };
    if let Some(live) = live {
        live.leave();
    }
    match &stop {
        Stop::Signal(name) => tracing::info!("{name} received; detaching and flushing"),
        Stop::Duration => tracing::info!("--duration elapsed; detaching and flushing"),
        Stop::Told | Stop::ReaderFailed(_) => {}
    }

    // The programs' skipped runs are read before detaching closes their descriptors. Detach
    // first so that nothing new arrives, then drain what the kernel already wrote, and take the
    // counts one last time.
    tally.set_kernel(kernel_counts(&counters, &program_runs));
    drop(probes);
    let _ = stop_reader.send(true);
    let reader_result = match stop {
        Stop::ReaderFailed(e) => Err(e),
        _ => reader.await.context("the ring buffer reader panicked")?,
    };
    if let Some((mut samplers, consume)) = sampled.take() {
        let mut batch = samplers.sample(SystemTime::now());
        tally.add_sampled(batch.len() as u64);
        consume(&mut batch);
    }
    if let Some(handle) = dns_reader {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the DNS reader failed: {e:#}"),
            Err(e) => tracing::warn!("the DNS reader panicked: {e}"),
        }
    }
    if let Some(handle) = log_thread {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    stop_evidence.store(true, Relaxed);
    if let Some(handle) = evidence_thread {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    let _ = stop_http.send(true);
    if let Some(task) = http_task {
        let _ = task.await;
    }
    tally.set_kernel(kernel_counts(&counters, &ProgramRuns::default()));
    if !embedded {
        eprintln!("connprobe: {}", tally.line());
    }
    if let Some(dns) = &dns_state {
        dns_kernel_counts(dns, &counters);
        if !embedded {
            eprintln!("connprobe: {}", dns::summary(dns));
        }
    }
    reader_result.map(|()| Embedded {
        dns: dns_state,
        tally,
    })
}

/// The foreground agent's view of its destinations: `connprobe top`'s screen, drawn on the
/// terminal every `--stats-interval` (no keys: the terminal stays as it is, so Ctrl-C stops the
/// agent; `connprobe top` on the same agent has them).
struct LiveView {
    sources: ViewSources,
    console: Console,
    terminal: ratatui::Terminal<ratatui::backend::CrosstermBackend<io::Stdout>>,
    last: Option<View>,
}

impl LiveView {
    fn new(sources: ViewSources, addr: SocketAddr, no_metrics: bool) -> anyhow::Result<Self> {
        let source = match no_metrics {
            true => "run".to_string(),
            false => format!("run, top on {addr}"),
        };
        let terminal =
            ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
                .context("cannot draw on the terminal")?;
        Ok(LiveView {
            sources,
            console: Console::new(source, Default::default(), !logging::no_color()),
            terminal,
            last: None,
        })
    }

    fn draw(&mut self) {
        let view = self
            .sources
            .view(&ViewRequest::default(), SystemTime::now());
        self.console.update(self.last.as_ref(), &view);
        let console = &self.console;
        // Log lines share the terminal: draw every cell each time.
        let _ = self.terminal.clear();
        let _ = self.terminal.draw(|frame| {
            let area = frame.area();
            screen::draw(Some(&view), console, area, frame.buffer_mut())
        });
        self.last = Some(view);
    }

    /// Leaves the last view on screen, with the cursor below it for what follows.
    fn leave(mut self) {
        if let Ok(size) = self.terminal.size() {
            let _ = self
                .terminal
                .set_cursor_position((0, size.height.saturating_sub(1)));
        }
        let _ = self.terminal.show_cursor();
        println!();
    }
}
