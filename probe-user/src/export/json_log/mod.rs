//! The JSON event log: one object per line (NDJSON) in the format of [`crate::schema`],
//! written on a thread of its own. A file gets whole lines only (see [`file`]), is rotated by
//! size if asked, and is reopened on request (SIGHUP, after logrotate renamed it).
use std::{
    io::{self, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
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

mod file;
mod line;

pub use file::{LogFile, Rotation};
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
/// often while batches keep coming; a reopen request waits at most this long.
const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Bytes of lines gathered before one write to the log.
const WRITE_CHUNK: usize = 256 * 1024;

/// Where the lines go.
pub enum Output {
    /// Standard output or another stream: written as it comes (a line cut short by an error
    /// cannot be taken back there).
    Stream(Box<dyn Write + Send>),
    /// A file: whole lines only, size rotation, reopening.
    File(LogFile),
}

/// The log writer thread's state: lines are formatted straight into the chunk that is written,
/// so each byte is copied once on its way to the kernel.
struct LogWriter {
    out: Output,
    formatter: LineFormatter,
    encoder: Encoder,
    /// Lines made by serde (with [`Encoder::Serde`]).
    serde_lines: Vec<u8>,
    /// Events whose lines are in the buffer.
    pending: u64,
    /// When the buffer was last written out: lines never wait much longer than [`IDLE_FLUSH`].
    last_write: std::time::Instant,
    tally: Arc<Tally>,
    /// Set by [`Reopen::request`].
    reopen: Arc<AtomicBool>,
    /// Events lost since writing last failed (said when it works again).
    failing: Option<u64>,
}

impl LogWriter {
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
                    for i in 0..batch.len() {
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
            if self.reopen.swap(false, Ordering::AcqRel) {
                // What was gathered before the request belongs to the file as it was.
                self.write_out(true);
                self.reopen_file();
            }
        }
        self.write_out(true);
    }

    fn reopen_file(&mut self) {
        let Output::File(file) = &mut self.out else {
            tracing::debug!("SIGHUP: the JSON log is not a file; nothing to reopen");
            return;
        };
        match file.reopen() {
            Ok(()) => tracing::info!("reopened the JSON log {}", file.path().display()),
            Err(e) => tracing::error!(
                "cannot reopen the JSON log {}: {e}; writing on to the file already open",
                file.path().display()
            ),
        }
    }

    /// Writes the gathered lines; the events of lines that did not make it whole are counted
    /// lost (stage log).
    fn write_out(&mut self, flush: bool) {
        let lines = match self.encoder {
            Encoder::Fast => self.formatter.buffered(),
            Encoder::Serde => &self.serde_lines,
        };
        let result = match &mut self.out {
            Output::File(file) => file.write_lines(lines),
            Output::Stream(stream) => match file::write_counted(stream, lines) {
                (_, None) if flush => stream.flush().map_err(|error| file::ShortWrite {
                    written: lines.len(),
                    error,
                }),
                (_, None) => Ok(()),
                (written, Some(error)) => Err(file::ShortWrite { written, error }),
            },
        };
        match result {
            Ok(()) => {
                if let Some(lost) = self.failing.take() {
                    tracing::info!(
                        "writing the JSON log works again; {lost} events were lost meanwhile \
                         (stage log)"
                    );
                }
            }
            Err(short) => {
                let whole = lines[..short.written.min(lines.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count() as u64;
                let lost = self.pending.saturating_sub(whole);
                self.tally.add_lost(LossStage::Log, lost);
                match &mut self.failing {
                    Some(count) => *count += lost,
                    None => {
                        tracing::error!(
                            "writing the JSON log failed: {}; events are counted as lost (stage \
                             log) until it works again",
                            short.error
                        );
                        self.failing = Some(lost);
                    }
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
/// once. Files are appended to, and rotated by size if `rotation` says so.
pub fn open(path: &Path, rotation: Option<Rotation>) -> anyhow::Result<Output> {
    if path == Path::new("-") {
        return Ok(Output::Stream(Box::new(io::stdout())));
    }
    let file = LogFile::open(path, rotation)
        .with_context(|| format!("cannot write the JSON log to {}", path.display()))?;
    Ok(Output::File(file))
}

/// The running log writer: its queue, its thread, and a way to have it reopen its file.
pub struct LogWriterHandle {
    pub queue: SyncSender<LogBatch>,
    pub thread: thread::JoinHandle<()>,
    pub reopen: Reopen,
}

/// Asks the log writer to reopen its file (SIGHUP).
#[derive(Clone, Debug)]
pub struct Reopen(Arc<AtomicBool>);

impl Reopen {
    /// The writer writes out what it holds to the file open now, then opens the path anew,
    /// within [`IDLE_FLUSH`].
    pub fn request(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Writes queued batches of events (and DNS exchanges) as JSON lines on a thread of its own, so a slow disk never
/// stalls the ring buffer reader. One wakeup per batch, not per event. Flushes whenever the
/// queue runs dry for a moment, and at the end, when every sender is gone. Write errors count
/// every event they cost (stage log).
pub fn spawn_writer(
    out: Output,
    encoder: Encoder,
    tally: Arc<Tally>,
) -> io::Result<LogWriterHandle> {
    let (tx, rx) = mpsc::sync_channel::<LogBatch>(QUEUE_BATCHES);
    let reopen = Arc::new(AtomicBool::new(false));
    let writer = LogWriter {
        out,
        formatter: LineFormatter::new(),
        encoder,
        serde_lines: Vec::new(),
        pending: 0,
        last_write: std::time::Instant::now(),
        tally,
        reopen: reopen.clone(),
        failing: None,
    };
    let thread = thread::Builder::new()
        .name("connprobe-log".into())
        .spawn(move || {
            crate::privileges::drop_in_this_thread();
            writer.run(rx)
        })?;
    Ok(LogWriterHandle {
        queue: tx,
        thread,
        reopen: Reopen(reopen),
    })
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
        let writer = spawn_writer(Output::Stream(Box::new(sink)), encoder, tally.clone()).unwrap();
        writer.queue.send(LogBatch::Events(every_shape())).unwrap();
        drop(writer.queue);
        writer.thread.join().unwrap();
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

    /// A stream that takes `room` bytes, a few at a time, then fails.
    struct Cramped {
        room: usize,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Cramped {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.room).min(100);
            self.room -= n;
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_short_write_loses_exactly_the_lines_not_written_whole() {
        let tally = Arc::new(Tally::default());
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Cramped {
            room: 1000,
            written: written.clone(),
        };
        let writer =
            spawn_writer(Output::Stream(Box::new(sink)), Encoder::Fast, tally.clone()).unwrap();
        writer.queue.send(LogBatch::Events(every_shape())).unwrap();
        drop(writer.queue);
        writer.thread.join().unwrap();
        let bytes = written.lock().unwrap().clone();
        let whole = bytes.iter().filter(|b| **b == b'\n').count() as u64;
        assert!(whole > 0 && whole < every_shape().len() as u64);
        assert_eq!(
            tally.lost(LossStage::Log),
            every_shape().len() as u64 - whole
        );
    }

    #[test]
    fn reopen_moves_on_to_a_new_file_without_losing_a_line() {
        let dir = std::env::temp_dir().join(format!("connprobe-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let tally = Arc::new(Tally::default());
        let writer =
            spawn_writer(open(&path, None).unwrap(), Encoder::Fast, tally.clone()).unwrap();
        let events = every_shape();
        writer
            .queue
            .send(LogBatch::Events(events[..5].to_vec()))
            .unwrap();
        std::thread::sleep(IDLE_FLUSH * 2);
        std::fs::rename(&path, dir.join("events.jsonl.1")).unwrap();
        writer
            .queue
            .send(LogBatch::Events(events[5..8].to_vec()))
            .unwrap();
        writer.reopen.request();
        std::thread::sleep(IDLE_FLUSH * 2);
        writer
            .queue
            .send(LogBatch::Events(events[8..].to_vec()))
            .unwrap();
        drop(writer.queue);
        writer.thread.join().unwrap();
        let old = std::fs::read_to_string(dir.join("events.jsonl.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.lines().count(), 8);
        assert_eq!(new.lines().count(), events.len() - 8);
        let seqs: Vec<u64> = old
            .lines()
            .chain(new.lines())
            .map(|l| serde_json::from_str::<Event>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, events.iter().map(|e| e.seq).collect::<Vec<_>>());
        assert_eq!(tally.lost(LossStage::Log), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
