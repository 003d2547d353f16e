//! The ring buffer reader: drains the kernel's records, decodes them in place, counts them in
//! the tally and hands each batch to the consumer the pipeline gives it (which numbers them,
//! `seq`).
use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use strum::EnumCount;
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};

use crate::{
    backend::Backends,
    decode::{Decoder, Record},
    event::{Event, EventKind},
    tally::Tally,
    workload::Workloads,
};

/// Events the reader decodes before handing them on as one batch (one lock per consumer).
pub const BATCH: usize = 1024;
/// The kernel wakes the reader only when a batch has built up (see probe-ebpf `emit`); between
/// wakeups the reader looks this often.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where batches go: the consumer takes what it keeps and may leave the batch empty.
pub trait Consume: Send + 'static {
    fn consume(&mut self, batch: &mut Vec<Event>);
}

impl<F: FnMut(&mut Vec<Event>) + Send + 'static> Consume for F {
    fn consume(&mut self, batch: &mut Vec<Event>) {
        self(batch)
    }
}

/// The reader's state between drains.
struct Reader<C> {
    decoder: Decoder,
    /// Resolves owners' cgroup ids as their events are read (`None` without cgroup v2).
    workloads: Option<Workloads>,
    backends: Backends,
    tally: Arc<Tally>,
    consumer: C,
    batch: Vec<Event>,
    /// Events of the batch by kind, added to the tally when it is handed on.
    kinds: [u64; EventKind::COUNT],
}

impl<C: Consume> Reader<C> {
    /// Drains everything in the ring buffer, in batches. Records are decoded straight from
    /// the ring's memory and released at once.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match self.decoder.decode_record(&item) {
                Ok(Record::Event {
                    mut event,
                    cgroup_id,
                }) => {
                    self.kinds[event.kind() as usize] += 1;
                    if let Some(workloads) = &mut self.workloads {
                        let pid = event.process.as_ref().map_or(0, |p| p.pid);
                        event.workload = workloads.resolve(cgroup_id, pid);
                    }
                    self.backends.annotate(&mut event);
                    self.batch.push(event);
                }
                Ok(Record::Translation {
                    src,
                    original,
                    backend,
                }) => self.backends.translated(src, original, backend),
                Err(e) => {
                    if self.tally.add_undecodable() {
                        tracing::warn!("undecodable event from the kernel: {e}");
                    }
                }
            }
            drop(item);
            if self.batch.len() >= BATCH {
                self.hand_on();
            }
        }
        if !self.batch.is_empty() {
            self.hand_on();
        }
    }

    fn hand_on(&mut self) {
        for (kind, n) in self.kinds.iter_mut().enumerate() {
            if *n > 0 {
                let kind = <EventKind as strum::VariantArray>::VARIANTS[kind];
                self.tally.add_delivered(kind, *n);
                *n = 0;
            }
        }
        self.consumer.consume(&mut self.batch);
        self.batch.clear();
    }
}

/// Reads the ring buffer until told to stop, then drains what is left.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    decoder: Decoder,
    workloads: Option<Workloads>,
    tally: Arc<Tally>,
    consumer: impl Consume,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        // SAFETY: the RingBuf owns its map fd and keeps it open and unchanged while the
        // AsyncFd holds it.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .context("cannot poll the ring buffer")?;
        let mut reader = Reader {
            decoder,
            workloads,
            backends: Backends::default(),
            tally,
            consumer,
            batch: Vec::with_capacity(BATCH),
            kinds: [0; EventKind::COUNT],
        };
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard.context("polling the ring buffer failed")?;
                    reader.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = poll.tick() => reader.drain(fd.get_mut()),
                _ = stop.changed() => break,
            }
        }
        reader.drain(fd.get_mut());
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
