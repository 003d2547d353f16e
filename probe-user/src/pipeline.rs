//! Wiring and shutdown: kernel programs -> ring buffer reader -> decoder -> consumers (JSON log
//! writer thread, aggregator, flight recorder) and the periodic tasks around them.
use std::{
    fs::OpenOptions,
    io::{self, IsTerminal, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use probe_common::Counter;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    cli::RunArgs,
    decode::{Clock, decode},
    event::{Event, EventType},
    export::json_log,
    loader::{self, KernelMaps, LoaderConfig, read_counter},
};

/// Events waiting for the log writer; past this the newest are dropped and counted (stage queue).
const LOG_QUEUE: usize = 65_536;
/// Events the reader decodes before handing them on as one batch.
const BATCH: usize = 1024;
/// The kernel wakes the reader only when a batch has built up (see probe-ebpf `emit`); between
/// wakeups the reader looks this often.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where events were lost, as `connprobe_events_lost_total{stage}` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossStage {
    /// The kernel could not reserve room in the ring buffer: the reader fell behind.
    Ringbuf,
    /// A connect's start record was evicted from the kernel's socket map.
    Map,
    /// The log writer's queue was full.
    Queue,
    /// Writing the JSON log failed.
    Log,
}

impl LossStage {
    pub const ALL: [LossStage; 4] = [
        LossStage::Ringbuf,
        LossStage::Map,
        LossStage::Queue,
        LossStage::Log,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossStage::Ringbuf => "ringbuf",
            LossStage::Map => "map",
            LossStage::Queue => "queue",
            LossStage::Log => "log",
        }
    }
}

/// Counts of everything that went through, or was lost on the way.
#[derive(Default)]
pub struct Tally {
    delivered: [AtomicU64; 4],
    lost: [AtomicU64; 4],
    /// Produced by the kernel programs, all kinds (delivered + lost in the ring buffer).
    produced: AtomicU64,
    decode_errors: AtomicU64,
    kernel_read_errors: AtomicU64,
}

impl Tally {
    fn type_index(kind: EventType) -> usize {
        match kind {
            EventType::Connect => 0,
            EventType::Retransmit => 1,
            EventType::Reset => 2,
            EventType::Close => 3,
        }
    }

    fn stage_index(stage: LossStage) -> usize {
        match stage {
            LossStage::Ringbuf => 0,
            LossStage::Map => 1,
            LossStage::Queue => 2,
            LossStage::Log => 3,
        }
    }

    pub fn delivered(&self, kind: EventType) -> u64 {
        self.delivered[Self::type_index(kind)].load(Relaxed)
    }

    pub fn lost(&self, stage: LossStage) -> u64 {
        self.lost[Self::stage_index(stage)].load(Relaxed)
    }

    fn add_lost(&self, stage: LossStage, n: u64) {
        self.lost[Self::stage_index(stage)].fetch_add(n, Relaxed);
    }

    /// Copies the kernel's cumulative counters in; returns the increase of each lost stage.
    fn update_from_kernel(&self, counters: &PerCpuArray<MapData, u64>) -> [(LossStage, u64); 2] {
        let produced = [
            Counter::ProducedConnect,
            Counter::ProducedRetransmit,
            Counter::ProducedReset,
            Counter::ProducedClose,
        ]
        .map(|c| read_counter(counters, c))
        .iter()
        .sum();
        self.produced.store(produced, Relaxed);
        self.kernel_read_errors
            .store(read_counter(counters, Counter::ReadError), Relaxed);
        [
            (LossStage::Ringbuf, Counter::LostRingbuf),
            (LossStage::Map, Counter::LostMap),
        ]
        .map(|(stage, counter)| {
            let now = read_counter(counters, counter);
            let before = self.lost[Self::stage_index(stage)].swap(now, Relaxed);
            (stage, now.saturating_sub(before))
        })
    }

    /// One line: events by kind, lost by stage.
    pub fn line(&self) -> String {
        let kinds = EventType::ALL
            .map(|k| format!("{}={}", k.as_str(), self.delivered(k)))
            .join(" ");
        let lost = LossStage::ALL
            .map(|s| format!("{}={}", s.as_str(), self.lost(s)))
            .join(" ");
        format!(
            "events: {kinds}; produced in kernel={}; lost: {lost}; undecodable={} kernel_read_errors={}",
            self.produced.load(Relaxed),
            self.decode_errors.load(Relaxed),
            self.kernel_read_errors.load(Relaxed),
        )
    }
}

/// What the reader hands each batch of events to.
struct Consumers {
    tally: Arc<Tally>,
    log: Option<SyncSender<Event>>,
}

impl Consumers {
    fn consume(&mut self, batch: &mut Vec<Event>) {
        for event in batch.drain(..) {
            self.tally.delivered[Tally::type_index(event.kind())].fetch_add(1, Relaxed);
            if let Some(log) = &self.log {
                match log.try_send(event) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => self.tally.add_lost(LossStage::Queue, 1),
                    Err(TrySendError::Disconnected(_)) => self.tally.add_lost(LossStage::Log, 1),
                }
            }
        }
    }
}

/// Drains everything in the ring buffer into `consumers`, in batches.
fn drain(
    ring: &mut RingBuf<MapData>,
    clock: &Clock,
    batch: &mut Vec<Event>,
    consumers: &mut Consumers,
) {
    while let Some(item) = ring.next() {
        match decode(&item, clock) {
            Ok(event) => batch.push(event),
            Err(e) => {
                if consumers.tally.decode_errors.fetch_add(1, Relaxed) == 0 {
                    tracing::warn!("undecodable event from the kernel: {e}");
                }
            }
        }
        drop(item);
        if batch.len() >= BATCH {
            consumers.consume(batch);
        }
    }
    if !batch.is_empty() {
        consumers.consume(batch);
    }
}

/// Reads the ring buffer until told to stop, then drains what is left.
fn spawn_reader(
    ring: RingBuf<MapData>,
    clock: Clock,
    mut consumers: Consumers,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged while the
        // AsyncFd holds it.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .context("cannot poll the ring buffer")?;
        let mut batch = Vec::with_capacity(BATCH);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard.context("polling the ring buffer failed")?;
                    drain(guard.get_inner_mut(), &clock, &mut batch, &mut consumers);
                    guard.clear_ready();
                }
                _ = poll.tick() => drain(fd.get_mut(), &clock, &mut batch, &mut consumers),
                _ = stop.changed() => break,
            }
        }
        drain(fd.get_mut(), &clock, &mut batch, &mut consumers);
        Ok(())
    })
}

/// Forwards what the eBPF programs log (through aya-log, to `tracing`) until told to stop.
fn spawn_program_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer fd and keeps it open while the AsyncFd holds it.
        let Ok(mut fd) =
            (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
        else {
            tracing::warn!("cannot poll the eBPF programs' log; their warnings will not be shown");
            return;
        };
        loop {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let Ok(mut guard) = guard else { return };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                _ = stop.changed() => {
                    fd.get_mut().flush();
                    return;
                }
            }
        }
    });
}

/// Opens the log before anything is loaded, so a bad path fails at once.
fn open_log(path: &Path) -> anyhow::Result<Box<dyn Write + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdout()));
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write the JSON log to {}", path.display()))?;
    Ok(Box::new(file))
}

/// Writes queued events as JSON lines; flushes whenever the queue runs dry for a moment.
fn spawn_log_writer(
    out: Box<dyn Write + Send>,
    tally: Arc<Tally>,
) -> (SyncSender<Event>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::sync_channel::<Event>(LOG_QUEUE);
    let handle = thread::Builder::new()
        .name("json-log".into())
        .spawn(move || {
            let mut out = io::BufWriter::with_capacity(256 * 1024, out);
            let mut failing = false;
            let report = |e: io::Error, failing: &mut bool| {
                if !*failing {
                    tracing::error!(
                        "writing the JSON log failed: {e}; events are counted as lost (stage log)"
                    );
                    *failing = true;
                }
            };
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(event) => {
                        if let Err(e) = json_log::write_line(&mut out, &event) {
                            tally.add_lost(LossStage::Log, 1);
                            report(e, &mut failing);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = out.flush() {
                            report(e, &mut failing);
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if let Err(e) = out.flush() {
                report(e, &mut failing);
            }
        })
        .expect("spawning a thread");
    (tx, handle)
}

/// Why the agent stopped.
enum Stop {
    Signal(&'static str),
    Duration,
    ReaderFailed(anyhow::Error),
}

/// `connprobe run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let clock = Clock::now();
    let tally = Arc::new(Tally::default());
    let log_out = args.json_log.as_deref().map(open_log).transpose()?;
    let (log_tx, log_thread) = match log_out {
        Some(out) => {
            let (tx, handle) = spawn_log_writer(out, tally.clone());
            (Some(tx), Some(handle))
        }
        None => (None, None),
    };

    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;

    let config = LoaderConfig {
        hooks: args.hooks,
        ring_buffer_bytes: args.ring_buffer_bytes,
        max_sockets: args.max_sockets,
    };
    let mut readers = Vec::new();
    let mut counters = None;
    let probes = tokio::task::block_in_place(|| {
        loader::load_and_attach(
            &config,
            |KernelMaps {
                 events,
                 counters: c,
                 logger,
             }| {
                let (stop_tx, stop_rx) = watch::channel(false);
                spawn_program_log(logger, stop_rx.clone());
                let consumers = Consumers {
                    tally: tally.clone(),
                    log: log_tx.clone(),
                };
                readers.push((stop_tx, spawn_reader(events, clock, consumers, stop_rx)));
                counters = Some(c);
            },
        )
    })?;
    drop(log_tx);
    // Readers of a failed first attempt (before a fallback) watch maps nothing writes to.
    let (stop_reader, mut reader) = readers.pop().context("the loader started no reader")?;
    for (stop, handle) in readers {
        let _ = stop.send(true);
        let _ = handle.await;
    }
    let counters = counters.context("the loader handed over no counters")?;
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

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut stats = tokio::time::interval(args.stats_interval.max(Duration::from_millis(100)));
    stats.tick().await;
    let stop = loop {
        tokio::select! {
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = &mut deadline => break Stop::Duration,
            result = &mut reader => {
                let err = match result {
                    Ok(Ok(())) => anyhow::anyhow!("the ring buffer reader stopped"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::Error::new(e).context("the ring buffer reader panicked"),
                };
                break Stop::ReaderFailed(err);
            }
            _ = stats.tick() => {
                tally.update_from_kernel(&counters);
                if args.verbose > 0 {
                    eprintln!("connprobe: {}", tally.line());
                }
            }
        }
    };
    match &stop {
        Stop::Signal(name) => tracing::info!("{name} received; detaching and flushing"),
        Stop::Duration => tracing::info!("--duration elapsed; detaching and flushing"),
        Stop::ReaderFailed(_) => {}
    }

    // Detach first so that nothing new arrives, then drain what the kernel already wrote.
    drop(probes);
    let _ = stop_reader.send(true);
    let reader_result = match stop {
        Stop::ReaderFailed(e) => Err(e),
        _ => reader.await.context("the ring buffer reader panicked")?,
    };
    if let Some(handle) = log_thread {
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
    tally.update_from_kernel(&counters);
    eprintln!("connprobe: {}", tally.line());
    reader_result
}

/// Whether standard output is a terminal (for the live table).
pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_line_names_every_kind_and_stage() {
        let tally = Tally::default();
        tally.delivered[0].store(3, Relaxed);
        tally.add_lost(LossStage::Queue, 2);
        let line = tally.line();
        assert!(
            line.contains("connect=3 retransmit=0 reset=0 close=0"),
            "{line}"
        );
        assert!(
            line.contains("lost: ringbuf=0 map=0 queue=2 log=0"),
            "{line}"
        );
    }
}
