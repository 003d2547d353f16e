//! The ring buffer reader: drains the kernel's records, decodes them in place and hands each
//! batch to the consumers (aggregator, flight recorder, JSON log queue).
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{SyncSender, TrySendError},
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

use crate::{
    aggregate::Aggregator,
    decode::Decoder,
    diagnose::FlightRecorder,
    event::Event,
    export::prometheus::{LossStage, Metrics},
};

/// Events the reader decodes before handing them on as one batch (one lock per consumer).
const BATCH: usize = 1024;
/// The kernel wakes the reader only when a batch has built up (see probe-ebpf `emit`); between
/// wakeups the reader looks this often.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Everything a batch of events goes to.
pub struct Consumers {
    pub metrics: Arc<Metrics>,
    pub aggregator: Arc<Mutex<Aggregator>>,
    pub recorder: Arc<Mutex<FlightRecorder>>,
    /// The JSON log writer's queue of batches, when there is a log.
    pub log: Option<SyncSender<Vec<Event>>>,
    /// Records the decoder rejected (a kernel/agent mismatch; should stay 0).
    pub undecodable: Arc<AtomicU64>,
}

impl Consumers {
    fn consume(&mut self, batch: &mut Vec<Event>) {
        {
            let mut aggregator = self.aggregator.lock().unwrap_or_else(|e| e.into_inner());
            for event in batch.iter() {
                aggregator.record(event);
            }
        }
        self.recorder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(batch.iter());
        match &self.log {
            Some(log) => {
                let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
                match log.try_send(full) {
                    Ok(()) => {}
                    Err(TrySendError::Full(lost)) => {
                        self.metrics.add_lost(LossStage::Queue, lost.len() as u64)
                    }
                    Err(TrySendError::Disconnected(lost)) => {
                        self.metrics.add_lost(LossStage::Log, lost.len() as u64)
                    }
                }
            }
            None => batch.clear(),
        }
    }
}

/// Drains everything in the ring buffer into `consumers`, in batches. Records are decoded
/// straight from the ring's memory and released at once.
fn drain(
    ring: &mut RingBuf<MapData>,
    decoder: &Decoder,
    batch: &mut Vec<Event>,
    consumers: &mut Consumers,
) {
    while let Some(item) = ring.next() {
        match decoder.decode(&item) {
            Ok(event) => batch.push(event),
            Err(e) => {
                if consumers.undecodable.fetch_add(1, Relaxed) == 0 {
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
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    decoder: Decoder,
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
                    drain(guard.get_inner_mut(), &decoder, &mut batch, &mut consumers);
                    guard.clear_ready();
                }
                _ = poll.tick() => drain(fd.get_mut(), &decoder, &mut batch, &mut consumers),
                _ = stop.changed() => break,
            }
        }
        drain(fd.get_mut(), &decoder, &mut batch, &mut consumers);
        Ok(())
    })
}

/// Forwards what the eBPF programs log (through aya-log, to `tracing`) until told to stop.
pub fn spawn_program_log(
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
