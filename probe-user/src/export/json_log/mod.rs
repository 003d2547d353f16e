//! The JSON event log: one object per line (NDJSON) in the format of [`crate::schema`],
//! written on a thread of its own.
use std::{
    fs::OpenOptions,
    io::{self, Write},
    path::Path,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, SyncSender},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    dns::exchange::{DnsExchange, DnsLine},
    event::Event,
    tally::{LossStage, Tally},
};

mod line;

pub use line::LineFormatter;

/// How lines are made: the fast formatter, or `serde_json` on the schema type (the same bytes;
/// for the bench, which measures what the fast one buys).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoder {
    #[default]
    Fast,
    Serde,
}

/// What the writer is sent: a batch of TCP events from the ring buffer reader, or of DNS
/// exchanges from the DNS reader.
pub enum LogBatch {
    Events(Vec<Event>),
    Dns(Vec<DnsExchange>),
}

impl LogBatch {
    pub fn len(&self) -> usize {
        match self {
            LogBatch::Events(b) => b.len(),
            LogBatch::Dns(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Batches waiting for the writer (each up to the reader's batch size); past this, the newest
/// batch is dropped and its events counted (stage queue).
pub const QUEUE_BATCHES: usize = 64;
/// The writer writes out and flushes whenever no batch came for this long, and at least this
/// often while batches keep coming.
const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Bytes of lines gathered before one write to the log.
const WRITE_CHUNK: usize = 256 * 1024;

/// The log writer thread's state: lines are formatted straight into the chunk that is written,
/// so each byte is copied once on its way to the kernel.
struct LogWriter {
    out: Box<dyn Write + Send>,
    formatter: LineFormatter,
    encoder: Encoder,
    /// Lines made by serde (with [`Encoder::Serde`]).
    serde_lines: Vec<u8>,
    /// Events whose lines are in the buffer.
    pending: u64,
    /// When the buffer was last written out: lines never wait much longer than [`IDLE_FLUSH`].
    last_write: std::time::Instant,
    tally: Arc<Tally>,
    failing: bool,
}

impl LogWriter {
    fn new(out: Box<dyn Write + Send>, encoder: Encoder, tally: Arc<Tally>) -> Self {
        LogWriter {
            out,
            formatter: LineFormatter::new(),
            encoder,
            serde_lines: Vec::new(),
            pending: 0,
            last_write: std::time::Instant::now(),
            tally,
            failing: false,
        }
    }

    fn push(&mut self, event: &Event) {
        match self.encoder {
            Encoder::Fast => self.formatter.push(event),
            Encoder::Serde => {
                // Serialising an event cannot fail: every field is plain data.
                let _ = serde_json::to_writer(&mut self.serde_lines, event);
                self.serde_lines.push(b'\n');
            }
        }
    }

    /// A `dns` line: through serde with either encoder (DNS lines are few next to TCP events).
    fn push_dns(&mut self, exchange: &DnsExchange) {
        let mut line = Vec::with_capacity(320);
        // Serialising plain data cannot fail.
        let _ = serde_json::to_writer(&mut line, &DnsLine::from(exchange));
        line.push(b'\n');
        match self.encoder {
            Encoder::Fast => self.formatter.push_line(&line),
            Encoder::Serde => self.serde_lines.extend_from_slice(&line),
        }
    }

    fn buffered(&self) -> &[u8] {
        match self.encoder {
            Encoder::Fast => self.formatter.buffered(),
            Encoder::Serde => &self.serde_lines,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<LogBatch>) {
        loop {
            match rx.recv_timeout(IDLE_FLUSH) {
                Ok(batch) => {
                    let n = batch.len();
                    for i in 0..n {
                        match &batch {
                            LogBatch::Events(events) => self.push(&events[i]),
                            LogBatch::Dns(exchanges) => self.push_dns(&exchanges[i]),
                        }
                        self.pending += 1;
                        if self.buffered().len() >= WRITE_CHUNK {
                            self.write_out(false);
                        }
                    }
                    if self.last_write.elapsed() >= IDLE_FLUSH {
                        self.write_out(true);
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.write_out(true),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.write_out(true);
    }

    /// Writes the gathered lines; on failure their events are counted lost (stage log).
    fn write_out(&mut self, flush: bool) {
        let mut result = self.out.write_all(match self.encoder {
            Encoder::Fast => self.formatter.buffered(),
            Encoder::Serde => &self.serde_lines,
        });
        if flush && result.is_ok() {
            result = self.out.flush();
        }
        match result {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.tally.add_lost(LossStage::Log, self.pending);
                if !self.failing {
                    tracing::error!(
                        "writing the JSON log failed: {e}; events are counted as lost (stage log)"
                    );
                    self.failing = true;
                }
            }
        }
        self.formatter.clear();
        self.serde_lines.clear();
        self.pending = 0;
        self.last_write = std::time::Instant::now();
    }
}

/// Opens the log (`-` is standard output) before anything is loaded, so a bad path fails at
/// once. Files are appended to.
pub fn open(path: &Path) -> anyhow::Result<Box<dyn Write + Send>> {
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

/// Writes queued batches of events (and DNS exchanges) as JSON lines on a thread of its own, so a slow disk never
/// stalls the ring buffer reader. One wakeup per batch, not per event. Flushes whenever the
/// queue runs dry for a moment, and at the end, when every sender is gone. Write errors count
/// every event they cost (stage log).
pub fn spawn_writer(
    out: Box<dyn Write + Send>,
    encoder: Encoder,
    tally: Arc<Tally>,
) -> io::Result<(SyncSender<LogBatch>, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel::<LogBatch>(QUEUE_BATCHES);
    let handle = thread::Builder::new()
        .name("connprobe-log".into())
        .spawn(move || {
            crate::privileges::drop_in_this_thread();
            LogWriter::new(out, encoder, tally).run(rx)
        })?;
    Ok((tx, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::tests::every_shape;

    /// A sink that fails every write after the first `ok` bytes.
    struct Failing {
        ok: usize,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut written = self.written.lock().unwrap();
            if written.len() + buf.len() > self.ok {
                return Err(io::Error::other("disk full"));
            }
            written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn written_by(encoder: Encoder, ok: usize) -> (Vec<u8>, u64) {
        let tally = Arc::new(Tally::default());
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Failing {
            ok,
            written: written.clone(),
        };
        let (tx, handle) = spawn_writer(Box::new(sink), encoder, tally.clone()).unwrap();
        tx.send(LogBatch::Events(every_shape())).unwrap();
        drop(tx);
        handle.join().unwrap();
        let bytes = written.lock().unwrap().clone();
        (bytes, tally.lost(LossStage::Log))
    }

    #[test]
    fn both_encoders_write_the_same_log_and_failures_count_as_lost() {
        let (fast, lost) = written_by(Encoder::Fast, usize::MAX);
        assert_eq!(lost, 0);
        let (serde, _) = written_by(Encoder::Serde, usize::MAX);
        assert_eq!(fast, serde);
        assert_eq!(
            fast.iter().filter(|b| **b == b'\n').count(),
            every_shape().len()
        );
        let (nothing, lost) = written_by(Encoder::Fast, 10);
        assert!(nothing.is_empty());
        assert_eq!(lost, every_shape().len() as u64);
    }
}
