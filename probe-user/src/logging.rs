//! Logging on standard error: `tracing` with an `EnvFilter`, aya's `log` records bridged in.
//!
//! How much: `RUST_LOG` when it is set; otherwise connprobe's own lines (the agent, its eBPF
//! programs' log) at info, at debug with `-v`, and library internals (aya's relocations and BTF,
//! hyper, ...) only from `-vv` on (`-vvv`: trace). Colour only when standard error is a
//! terminal, and never with `NO_COLOR` set (<https://no-color.org>).
use std::{ffi::OsStr, io::IsTerminal as _};

use tracing_subscriber::EnvFilter;

/// The targets that are connprobe's own: the library and binary, and the eBPF programs' log
/// (aya-log names its records after the programs' module paths).
const OWN_TARGETS: [&str; 3] = ["probe_user", "connprobe", "probe_ebpf"];

/// The filter directives for `-v` given `verbose` times (`RUST_LOG` aside).
pub fn directives(verbose: u8) -> String {
    match verbose {
        0 => "info".to_string(),
        1 => {
            let mut text = "info".to_string();
            for target in OWN_TARGETS {
                text.push_str(&format!(",{target}=debug"));
            }
            text
        }
        2 => "debug".to_string(),
        _ => "trace".to_string(),
    }
}

/// `RUST_LOG` when it is set and valid, else [`directives`].
pub fn filter(verbose: u8, rust_log: Option<&OsStr>) -> EnvFilter {
    filter_or(&directives(verbose), rust_log)
}

/// `RUST_LOG` when it is set and valid, else `directives`.
fn filter_or(directives: &str, rust_log: Option<&OsStr>) -> EnvFilter {
    rust_log
        .and_then(OsStr::to_str)
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(directives))
}

/// Whether log lines get ANSI colour: on a terminal, unless `NO_COLOR` is set to anything but
/// the empty string.
pub fn use_color(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Whether `NO_COLOR` asks for no colour (for every output, the console's too).
pub fn no_color() -> bool {
    !use_color(true, std::env::var_os("NO_COLOR").as_deref())
}

/// Sets up the global subscriber, writing to standard error.
pub fn init(verbose: u8) {
    init_with(&directives(verbose));
}

/// Sets up the global subscriber with these filter directives (`RUST_LOG` still wins).
pub fn init_with(directives: &str) {
    let ansi = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter_or(
            directives,
            std::env::var_os("RUST_LOG").as_deref(),
        ))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber set up like `init` prints for an aya relocation line and one of
    /// connprobe's own debug lines.
    fn printed(verbose: u8, rust_log: Option<&str>, ansi: bool) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter(verbose, rust_log.map(OsStr::new)))
            .with_writer(move || writer.clone())
            .with_ansi(ansi)
            .with_target(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "aya_obj::relocation", "relocating program tcp_state");
            tracing::debug!(target: "aya::bpf", "BPF Feature Detection");
            tracing::debug!(target: "probe_user::loader", "own debug line");
            tracing::debug!(target: "connprobe", "binary debug line");
            tracing::info!(target: "probe_user::pipeline", "connprobe is tracing");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn v_shows_own_debug_lines_and_vv_library_internals() {
        let quiet = printed(0, None, false);
        assert!(quiet.contains("connprobe is tracing"), "{quiet}");
        assert!(!quiet.contains("debug line"), "{quiet}");

        let v = printed(1, None, false);
        assert!(v.contains("own debug line"), "{v}");
        assert!(v.contains("binary debug line"), "{v}");
        assert!(!v.contains("relocating"), "-v shows aya's internals:\n{v}");
        assert!(!v.contains("Feature Detection"), "{v}");

        let vv = printed(2, None, false);
        assert!(vv.contains("relocating"), "{vv}");
        assert!(vv.contains("own debug line"), "{vv}");

        // RUST_LOG wins over -v.
        let env = printed(1, Some("aya_obj=debug"), false);
        assert!(env.contains("relocating"), "{env}");
        assert!(!env.contains("own debug line"), "{env}");
        // An empty RUST_LOG is as good as none.
        assert_eq!(printed(1, Some(" "), false), v);
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        assert!(use_color(true, None));
        assert!(
            !use_color(false, None),
            "a file or journald gets no escapes"
        );
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(false, Some(OsStr::new("1"))));
        // no-color.org: set to the empty string, it does not count.
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!printed(0, None, false).contains('\x1b'));
    }
}
