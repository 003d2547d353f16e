//! The log file itself: whole lines only, size rotation, and reopening on request (SIGHUP).
//!
//! Every write hands over whole lines. When the file system refuses part of them (disk full,
//! quota), the file is cut back to the end of the last line that was written whole, so a
//! reader never finds a partial line, and the caller learns how many bytes (whole lines) made
//! it. With a size limit, the file is rotated between lines, before a line would take it past
//! the limit: `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ..., and `PATH.N` (N =
//! `max_files`) is overwritten. Reopening (logrotate's convention: it renames the file, then
//! sends SIGHUP) opens `PATH` anew; lines written before that went to the renamed file.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

/// Size rotation: `--json-log-max-size`, `--json-log-max-files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// A file is rotated before a line would take it past this many bytes (a single line
    /// longer than this gets a file of its own).
    pub max_size: u64,
    /// Rotated files kept beside the current one: `PATH.1` (newest) to `PATH.N`.
    pub max_files: u32,
}

/// Why a write stopped short: the error, and how many bytes of the lines were written (always
/// whole lines: the file holds no partial one).
#[derive(Debug)]
pub struct ShortWrite {
    pub written: usize,
    pub error: io::Error,
}

/// An open log file, appended to.
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Where the size limit counts from: 0, or the size at a failed rotation (the next try
    /// comes `max_size` bytes later, not at every line).
    counted_from: u64,
    rotation: Option<Rotation>,
    /// A rotation failed; said once, tried again `max_size` bytes later.
    rotation_failing: bool,
}

impl LogFile {
    /// Opens `path` for appending (creating it).
    pub fn open(path: &Path, rotation: Option<Rotation>) -> io::Result<Self> {
        let (file, size) = open_append(path)?;
        Ok(LogFile {
            path: path.to_owned(),
            file,
            size,
            counted_from: 0,
            rotation,
            rotation_failing: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `lines` (whole lines, each ending in `\n`), rotating between lines where the size
    /// limit says so.
    pub fn write_lines(&mut self, lines: &[u8]) -> Result<(), ShortWrite> {
        let mut done = 0;
        while done < lines.len() {
            let rest = &lines[done..];
            let piece = match self.rotation {
                Some(rotation) => {
                    let fits = lines_within(rest, self.room(rotation));
                    if fits == 0 && self.size > self.counted_from {
                        // After a failed rotation this goes on in the current file rather than
                        // lose lines.
                        self.rotate(rotation);
                        lines_within(rest, self.room(rotation)).max(first_line(rest))
                    } else {
                        fits.max(first_line(rest))
                    }
                }
                None => rest.len(),
            };
            let written = self
                .write_whole_lines(&rest[..piece])
                .map_err(|mut short| {
                    short.written += done;
                    short
                })?;
            done += written;
        }
        Ok(())
    }

    /// Bytes the current file may still take before it is rotated.
    fn room(&self, rotation: Rotation) -> u64 {
        rotation
            .max_size
            .saturating_sub(self.size.saturating_sub(self.counted_from))
    }

    /// Writes `lines`; on an error, cuts the file back to the last whole line written.
    fn write_whole_lines(&mut self, lines: &[u8]) -> Result<usize, ShortWrite> {
        let (written, error) = write_counted(&mut self.file, lines);
        let Some(error) = error else {
            self.size += written as u64;
            return Ok(written);
        };
        let whole = lines[..written]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if whole < written {
            // A partial line reached the file: take it back.
            if let Err(e) = self.file.set_len(self.size + whole as u64) {
                tracing::error!(
                    "cannot cut a partial line off the JSON log {}: {e}",
                    self.path.display()
                );
            }
        }
        self.size += whole as u64;
        Err(ShortWrite {
            written: whole,
            error,
        })
    }

    /// `PATH.(N-1)` -> `PATH.N`, ..., `PATH` -> `PATH.1`, then a new `PATH`. On failure the
    /// current file stays (and grows past the limit) rather than lines being lost.
    fn rotate(&mut self, rotation: Rotation) {
        let result = (|| {
            for n in (1..rotation.max_files).rev() {
                let from = numbered(&self.path, n);
                match std::fs::rename(&from, numbered(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
            let (file, size) = open_append(&self.path)?;
            self.file = file;
            self.size = size;
            self.counted_from = 0;
            Ok(())
        })();
        match result {
            Ok(()) => {
                if self.rotation_failing {
                    tracing::info!("rotating the JSON log {} works again", self.path.display());
                }
                self.rotation_failing = false;
            }
            Err(e) => {
                self.counted_from = self.size;
                if !self.rotation_failing {
                    tracing::error!(
                        "cannot rotate the JSON log {}: {e}; writing on past --json-log-max-size",
                        self.path.display()
                    );
                }
                self.rotation_failing = true;
            }
        }
    }

    /// Opens `PATH` anew (after logrotate renamed it). If that fails, lines keep going to the
    /// file already open, wherever it now is.
    pub fn reopen(&mut self) -> io::Result<()> {
        let (file, size) = open_append(&self.path)?;
        self.file = file;
        self.size = size;
        self.counted_from = 0;
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_lines(buf)
            .map(|()| buf.len())
            .map_err(|s| s.error)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// `PATH.n`.
pub fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Bytes of the whole lines at the start of `lines` that fit in `room`.
fn lines_within(lines: &[u8], room: u64) -> usize {
    let limit = lines.len().min(usize::try_from(room).unwrap_or(usize::MAX));
    lines[..limit]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1)
}

/// Bytes of the first line of `lines`, its newline included (all of it if it has none).
fn first_line(lines: &[u8]) -> usize {
    lines
        .iter()
        .position(|b| *b == b'\n')
        .map_or(lines.len(), |i| i + 1)
}

/// Writes `buf` as `write_all` does, but says how many bytes were written before an error.
pub fn write_counted(out: &mut impl Write, buf: &[u8]) -> (usize, Option<io::Error>) {
    let mut written = 0;
    while written < buf.len() {
        match out.write(&buf[written..]) {
            Ok(0) => {
                return (
                    written,
                    Some(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the log accepted no more bytes",
                    )),
                );
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("connprobe-logfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn lines(from: u32, to: u32) -> Vec<u8> {
        (from..to)
            .flat_map(|i| format!("{{\"seq\":{i:04}}}\n").into_bytes())
            .collect()
    }

    /// Every file of the log, oldest first.
    fn read_all(path: &Path, max_files: u32) -> Vec<String> {
        let mut text = String::new();
        for n in (1..=max_files).rev() {
            text += &std::fs::read_to_string(numbered(path, n)).unwrap_or_default();
        }
        text += &std::fs::read_to_string(path).unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn rotation_keeps_every_line_once_in_order_and_files_within_the_limit() {
        let dir = dir("rotate");
        let path = dir.join("events.jsonl");
        // 13 bytes a line; 5 lines a file.
        let rotation = Rotation {
            max_size: 70,
            max_files: 100,
        };
        let mut log = LogFile::open(&path, Some(rotation)).unwrap();
        log.write_lines(&lines(0, 3)).unwrap();
        log.write_lines(&lines(3, 40)).unwrap();
        log.write_lines(&lines(40, 41)).unwrap();
        let all = read_all(&path, 100);
        let expected: Vec<String> = (0..41).map(|i| format!("{{\"seq\":{i:04}}}")).collect();
        assert_eq!(all, expected);
        for n in 1..=8 {
            assert_eq!(std::fs::metadata(numbered(&path, n)).unwrap().len(), 65);
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 13);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_drops_the_oldest_past_max_files_and_long_lines_get_a_file() {
        let dir = dir("oldest");
        let path = dir.join("e.jsonl");
        let rotation = Rotation {
            max_size: 26,
            max_files: 2,
        };
        let mut log = LogFile::open(&path, Some(rotation)).unwrap();
        log.write_lines(&lines(0, 10)).unwrap();
        // Two lines a file: lines 0 to 3 were rotated out; .2 holds 4 and 5, .1 holds 6 and 7,
        // the current file 8 and 9.
        assert_eq!(read_all(&path, 2).len(), 6, "{:?}", read_all(&path, 2));
        assert!(!numbered(&path, 3).exists());
        let long = format!("{}\n", "x".repeat(100));
        log.write_lines(long.as_bytes()).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), long);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_rotation_keeps_writing_and_tries_again_later() {
        let dir = dir("failing");
        let path = dir.join("e.jsonl");
        let rotation = Rotation {
            max_size: 26,
            max_files: 1,
        };
        let mut log = LogFile::open(&path, Some(rotation)).unwrap();
        log.write_lines(&lines(0, 2)).unwrap();
        // PATH.1 cannot be made: a directory stands there.
        std::fs::create_dir(numbered(&path, 1)).unwrap();
        std::fs::write(numbered(&path, 1).join("x"), "x").unwrap();
        log.write_lines(&lines(2, 6)).unwrap();
        // The rotation before line 2 failed: lines 2 and 3 went on in the file, and the next
        // try came 26 bytes later (before line 4), not before every line.
        assert_eq!(read_all(&path, 0).len(), 6);
        assert!(log.rotation_failing);
        std::fs::remove_dir_all(numbered(&path, 1)).unwrap();
        log.write_lines(&lines(6, 7)).unwrap();
        assert!(!log.rotation_failing);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"seq\":0006}\n");
        assert_eq!(
            std::fs::read_to_string(numbered(&path, 1))
                .unwrap()
                .lines()
                .count(),
            6
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopen_follows_a_rename() {
        let dir = dir("reopen");
        let path = dir.join("e.jsonl");
        let mut log = LogFile::open(&path, None).unwrap();
        log.write_lines(&lines(0, 2)).unwrap();
        std::fs::rename(&path, dir.join("e.jsonl.old")).unwrap();
        log.write_lines(&lines(2, 3)).unwrap();
        log.reopen().unwrap();
        log.write_lines(&lines(3, 4)).unwrap();
        let old = std::fs::read_to_string(dir.join("e.jsonl.old")).unwrap();
        assert_eq!(old.lines().count(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"seq\":0003}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A writer that takes `room` bytes, then fails with "no space".
    struct Full {
        room: usize,
        taken: Vec<u8>,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(self.room).min(7);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_are_counted_to_the_byte() {
        let mut full = Full {
            room: 30,
            taken: Vec::new(),
        };
        let (written, error) = write_counted(&mut full, &lines(0, 5));
        assert_eq!(written, 30);
        assert_eq!(error.unwrap().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(lines_within(b"ab\ncd\nef", 7), 6);
        assert_eq!(lines_within(b"ab\ncd\nef", 2), 0);
        assert_eq!(first_line(b"ab\ncd"), 3);
        assert_eq!(first_line(b"abcd"), 4);
    }
}
