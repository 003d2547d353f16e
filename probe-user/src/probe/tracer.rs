//! The kernel's view of the probe's own sockets: the agent's programs loaded and attached in
//! this process, its reader and decoder as `connprobe run` has them, and a consumer that keeps
//! only the events of the sockets the probe registered (its local port and the remote address)
//! and drops the rest of the host's traffic unlooked at.
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cli::HookMode,
    decode::{Clock, Decoder},
    event::{Event, Side},
    loader::{self, KernelMaps, LoaderConfig, Probes, SocketRecords},
    privileges,
    reader::{spawn_program_log, spawn_reader},
    tally::Tally,
};

/// The sockets whose events are kept: (local port, remote address).
#[derive(Clone, Default)]
pub struct OwnSockets(Arc<Mutex<HashSet<(u16, SocketAddr)>>>);

impl OwnSockets {
    /// Registers a socket before its connect starts, so that none of its events is missed.
    pub fn add(&self, local_port: u16, remote: SocketAddr) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((local_port, remote));
    }

    /// Whether `event` is about one of the registered sockets, from the client's end.
    pub fn owns(&self, event: &Event) -> bool {
        if event.side == Some(Side::Server) {
            return false;
        }
        let key = (event.src.port(), event.dst.socket_addr());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
    }
}

/// Programs attached and a reader collecting the events of [`OwnSockets`].
pub struct Tracer {
    probes: Probes,
    stop: watch::Sender<bool>,
    reader: JoinHandle<anyhow::Result<()>>,
    events: Arc<Mutex<Vec<Event>>>,
    /// The maps the probe does not read; the programs use them, and dropping one closes it.
    _unread_maps: Vec<Box<dyn std::any::Any + Send>>,
}

impl Tracer {
    /// Loads and attaches the programs (privileged: call it on the thread that holds the
    /// capabilities), then drops every capability but the one that reads maps.
    pub fn start(own: OwnSockets) -> anyhow::Result<Self> {
        let config = LoaderConfig {
            hooks: HookMode::Auto,
            ring_buffer_bytes: probe_common::DEFAULT_RING_BYTES,
            max_sockets: probe_common::DEFAULT_MAX_SOCKETS,
            socket_records: SocketRecords::Auto,
            drops: true,
            dns_ports: None,
        };
        let clock = Clock::now();
        let tally = Arc::new(Tally::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let mut counters = None;
        let mut unread_maps: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        let probes = loader::load_and_attach(&config, |maps: KernelMaps| {
            let (stop_tx, stop_rx) = watch::channel(false);
            spawn_program_log(maps.logger, stop_rx.clone());
            let (own, kept) = (own.clone(), events.clone());
            let consume = move |batch: &mut Vec<Event>| {
                batch.retain(|e| own.owns(e));
                kept.lock().unwrap_or_else(|e| e.into_inner()).append(batch);
            };
            let decoder = Decoder {
                clock,
                reset_reasons: maps.reset_reasons,
                drop_reasons: maps.drop_reasons,
            };
            let reader = spawn_reader(maps.events, decoder, None, tally.clone(), consume, stop_rx);
            readers.push((stop_tx, reader));
            counters = Some(maps.counters);
            unread_maps.push(Box::new(maps.drop_counts));
            unread_maps.push(Box::new(maps.listeners));
            unread_maps.push(Box::new(maps.dns_events));
        })?;
        // Readers of a failed first attempt (before a fallback) watch maps nothing writes to.
        let (stop, reader) = readers.pop().context("the loader started no reader")?;
        for (stop, _) in readers {
            let _ = stop.send(true);
        }
        let counters = counters.context("the loader handed over no counters")?;
        privileges::drop_after_attach(|| loader::counters_readable(&counters))?;
        Ok(Tracer {
            probes,
            stop,
            reader,
            events,
            _unread_maps: unread_maps,
        })
    }

    /// Detaches the programs, drains what the kernel already wrote, and hands over the events
    /// kept, in the order they were read.
    pub async fn finish(self) -> anyhow::Result<Vec<Event>> {
        drop(self.probes);
        drop(self._unread_maps);
        let _ = self.stop.send(true);
        self.reader
            .await
            .context("the ring buffer reader panicked")??;
        let events = std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(events)
    }
}
