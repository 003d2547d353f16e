//! The kernel matrix: the kernel tests in QEMU guests that boot Debian's 6.1 and 6.12 kernels,
//! beside the host's own kernel (6.18 on the project's machines), one `cargo xtask test` step
//! per guest.
//!
//! A guest is virtme-ng over the host's root filesystem (see `virtme`), booting a Debian kernel
//! package fetched into the cache (see `kernels`). It runs, as root, the release agent and the
//! test binaries cargo built on the host, directly (not through cargo), with `CONNPROBE_BIN`
//! set; the lab's namespaces, lock file and tracefs all live in the guest. Its exit status is the
//! tests' result.
//!
//! QEMU emulates the guest (TCG): the lab runs about five times slower than on the host, so a
//! guest runs the core lab scenarios (`tcp_state` and `tcp_reset`), one metrics scenario and the
//! verdict scenarios; [`GUEST_TESTS`] is the list and `cargo xtask test --help` prints it.
mod kernels;
mod virtme;

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::cmd;
pub use kernels::GuestKernel;
pub use virtme::VirtmeNg;

/// A Debian kernel series the matrix boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Series {
    /// Debian 12's own kernel (`linux-image-6.1.0-N-amd64`).
    #[value(name = "6.1")]
    V6_1,
    /// The newer kernel Debian 12 ships (`linux-image-6.12.N+deb12-amd64`).
    #[value(name = "6.12")]
    V6_12,
}

impl Series {
    pub const ALL: [Series; 2] = [Series::V6_1, Series::V6_12];
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        })
    }
}

/// Tests of one file of `tests/tests/` that run in every guest.
#[derive(Debug)]
pub struct GuestTests {
    /// The test target (`tests/tests/<file>.rs`).
    pub file: &'static str,
    /// The tests to run, by exact name; empty: all of them.
    pub only: &'static [&'static str],
    /// Tests not to run, by exact name.
    pub skip: &'static [&'static str],
    /// What they check, for `--help` and the README.
    pub what: &'static str,
}

/// What runs in each guest. Under emulation on the project's 2-core machines the list took 4.0
/// minutes in the 6.1 guest and 3.8 in the 6.12 one in CI (2026-12-04), boot included.
pub const GUEST_TESTS: &[GuestTests] = &[
    // Four of its seven classic-tracepoint tests: between them every classic program fires, and
    // any classic test loads them all; the other three repeat these on other ICMP types or the
    // application's timeout (they run on the host).
    GuestTests {
        file: "tcp_state",
        only: &[],
        skip: &[
            "port_unreachable_classic_tracepoints",
            "admin_prohibited_classic_tracepoints",
            "application_timeout_classic_tracepoints",
        ],
        what: "every connect outcome; the classic fallback on four of them",
    },
    GuestTests {
        file: "tcp_reset",
        only: &[],
        skip: &[],
        what: "resets sent and received, with or without the kernel's reason",
    },
    GuestTests {
        file: "metrics",
        only: &["lab_scenarios_add_up_in_the_metrics"],
        skip: &[],
        what: "the lab scenarios through /metrics",
    },
    // The BTF variant only: before 6.11 it is the program without `rx_sk` (the host runs both
    // variants and the classic one).
    GuestTests {
        file: "drops",
        only: &["drops_and_overflows_btf"],
        skip: &[],
        what: "drops against nft counters, listen overflows against ListenOverflows",
    },
    // Its tests share one run of every fault, which is most of the time: all of them cost about
    // what one does.
    GuestTests {
        file: "verdicts",
        only: &[],
        skip: &[],
        what: "every lab fault gets its verdict, diagnose and analyze agree",
    },
    GuestTests {
        file: "workload",
        only: &[],
        skip: &[],
        what: "containers and pods from real cgroups (about a minute emulated)",
    },
    GuestTests {
        file: "backend",
        only: &[],
        skip: &[],
        what: "the backend behind a DNAT'd address, its metrics and verdicts (about a minute)",
    },
    // Before 6.10 the egress program runs without the sending process: what differs is checked.
    GuestTests {
        file: "dns",
        only: &[],
        skip: &[],
        what: "DNS over UDP and TCP: answers, silences, rcodes, the name behind a connect (about a minute emulated)",
    },
    // Two of watch's: its cgroup scope, and its DNS rule (which before 6.10, where no query
    // names its process, fails saying it cannot be judged).
    GuestTests {
        file: "watch",
        only: &[
            "refused_connects_fail_the_rule_and_name_the_destination",
            "silent_dns_fails_dns_timeouts_and_only_the_commands_count",
        ],
        skip: &[],
        what: "watch's cgroup scope and its DNS rule",
    },
    GuestTests {
        file: "probe",
        only: &["probe_reports_the_injected_causes"],
        skip: &[],
        what: "probe against the lab's injected causes",
    },
];

/// A guest that runs longer than this is killed and its step fails.
const GUEST_LIMIT: Duration = Duration::from_secs(20 * 60);

/// `cargo xtask test --help`'s account of the matrix, from [`GUEST_TESTS`].
pub fn help() -> String {
    let mut text = String::from(
        "Kernel matrix: after the host's kernel tests, each of Debian's 6.1 and 6.12 kernels boots \
         in a QEMU guest (TCG emulation, virtme-ng over the host's root filesystem) and runs, as \
         root, with the release agent:\n",
    );
    for tests in GUEST_TESTS {
        let which = match (tests.only, tests.skip) {
            ([], []) => "every test".to_owned(),
            ([], skip) => format!("every test but {}", skip.join(", ")),
            (only, _) => only.join(", "),
        };
        text.push_str(&format!(
            "  tests/tests/{}.rs: {which} ({})\n",
            tests.file, tests.what
        ));
    }
    text.push_str(
        "On the project's 2-core machines each guest takes about 4 minutes, boot (under a \
         minute) included. The first run downloads the kernel packages \
         (about 180 MB) into ~/.cache/connprobe/kernels. `--kernel 6.1` runs only that guest \
         (repeat it for more), after building what it needs.\n",
    );
    text
}

/// Where the matrix keeps what it downloads: `$XDG_CACHE_HOME/connprobe`, else
/// `~/.cache/connprobe`. Kept across clones and runs, so kernels are fetched once per machine.
pub fn cache_dir() -> PathBuf {
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|c| !c.is_empty()) {
        return PathBuf::from(cache).join("connprobe");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("connprobe")
}

/// What the guests need from the host, fetched once before any step: virtme-ng and the kernels.
pub struct Prepared {
    pub virtme: VirtmeNg,
    pub kernels: Vec<GuestKernel>,
}

/// Installs virtme-ng and fetches the kernels of `series` where missing.
pub fn prepare(series: &[Series]) -> anyhow::Result<Prepared> {
    let cache = cache_dir();
    let virtme = VirtmeNg::ensure(&cache)?;
    let kernels = series
        .iter()
        .map(|&s| kernels::ensure(s, &cache))
        .collect::<anyhow::Result<_>>()?;
    Ok(Prepared { virtme, kernels })
}

/// The built test binaries of the `tests` package, by target name.
pub type TestBinaries = BTreeMap<String, PathBuf>;

/// Builds the test binaries of `tests/` (without running them) and finds them.
pub fn build_test_binaries() -> anyhow::Result<TestBinaries> {
    let mut command = cmd::cargo();
    command.args([
        "test",
        "--no-run",
        "--package",
        "tests",
        "--message-format=json-render-diagnostics",
    ]);
    eprintln!("+ {}", cmd::display(&command));
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not run cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the kernel tests failed ({})", output.status);
    }
    Ok(test_binaries(&output.stdout))
}

/// The `test` targets' executables in cargo's JSON messages.
pub fn test_binaries(json: &[u8]) -> TestBinaries {
    use cargo_metadata::{Message, TargetKind};
    let mut binaries = TestBinaries::new();
    for message in Message::parse_stream(json).flatten() {
        if let Message::CompilerArtifact(artifact) = message
            && artifact.target.kind.contains(&TargetKind::Test)
            && let Some(executable) = artifact.executable
        {
            binaries.insert(artifact.target.name, executable.into_std_path_buf());
        }
    }
    binaries
}

/// Checks that every test [`GUEST_TESTS`] names exists (a renamed test would otherwise match
/// nothing and pass, or no longer be skipped), by listing each binary on the host.
pub fn check_guest_tests(binaries: &TestBinaries) -> anyhow::Result<()> {
    for tests in GUEST_TESTS {
        let binary = binaries.get(tests.file).ok_or_else(|| {
            anyhow!(
                "cargo built no test binary for tests/tests/{}.rs",
                tests.file
            )
        })?;
        let named: Vec<&str> = tests.only.iter().chain(tests.skip).copied().collect();
        if named.is_empty() {
            continue;
        }
        let listed = cmd::output_of(&binary.to_string_lossy(), &["--list"])
            .ok_or_else(|| anyhow!("`{} --list` failed", binary.display()))?;
        let missing = missing_tests(&listed, &named);
        if !missing.is_empty() {
            bail!(
                "tests/tests/{}.rs has no test {} that the kernel matrix runs (xtask/src/matrix.rs)",
                tests.file,
                missing.join(", ")
            );
        }
    }
    Ok(())
}

/// The names in `wanted` that a test binary's `--list` output does not list.
fn missing_tests<'a>(listed: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    let names: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    wanted
        .iter()
        .copied()
        .filter(|w| !names.contains(w))
        .collect()
}

/// The script a guest runs: every entry of [`GUEST_TESTS`] in turn (all of them, even after a
/// failure), each test binary run directly with one test thread, and an exit status of 1 if any
/// failed.
pub fn guest_script(
    kernel: &GuestKernel,
    workspace: &Path,
    agent: &Path,
    binaries: &TestBinaries,
) -> anyhow::Result<String> {
    use virtme::shell_quote as q;
    let mut script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask test`: the kernel tests in a {series} guest ({package}).\n\
         set -u\n\
         cd {workspace}\n\
         export CONNPROBE_BIN={agent}\n\
         export RUST_BACKTRACE=1\n\
         echo \"guest: Linux $(uname -r), $(nproc) CPUs, $(id -un)\"\n\
         failed=''\n\
         run() {{\n\
         \x20   name=$1; shift\n\
         \x20   begun=$(date +%s)\n\
         \x20   if \"$@\"; then\n\
         \x20       echo \"guest: $name passed in $(( $(date +%s) - begun )) s\"\n\
         \x20   else\n\
         \x20       echo \"guest: $name FAILED after $(( $(date +%s) - begun )) s\"\n\
         \x20       failed=\"$failed $name\"\n\
         \x20   fi\n\
         }}\n",
        series = kernel.series,
        package = kernel.package,
        workspace = q(&workspace.to_string_lossy()),
        agent = q(&agent.to_string_lossy()),
    );
    for tests in GUEST_TESTS {
        let binary = binaries.get(tests.file).ok_or_else(|| {
            anyhow!(
                "cargo built no test binary for tests/tests/{}.rs",
                tests.file
            )
        })?;
        script.push_str(&format!(
            "run {} {} --test-threads=1",
            tests.file,
            q(&binary.to_string_lossy())
        ));
        if !tests.only.is_empty() || !tests.skip.is_empty() {
            script.push_str(" --exact");
        }
        for name in tests.only {
            script.push(' ');
            script.push_str(&q(name));
        }
        for name in tests.skip {
            script.push_str(" --skip ");
            script.push_str(&q(name));
        }
        script.push('\n');
    }
    script.push_str(
        "if [ -n \"$failed\" ]; then\n\
         \x20   echo \"guest: failed:$failed\"\n\
         \x20   exit 1\n\
         fi\n\
         echo 'guest: every test passed'\n",
    );
    Ok(script)
}

/// Boots `kernel` and runs the guest tests in it; fails unless every one passed.
pub fn run_guest(
    virtme: &VirtmeNg,
    kernel: &GuestKernel,
    agent: &Path,
    binaries: &TestBinaries,
) -> anyhow::Result<()> {
    let workspace = cmd::workspace_root();
    let dir = cmd::target_dir()?.join("kernel-matrix");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let script = dir.join(format!("guest-{}.sh", kernel.series));
    std::fs::write(&script, guest_script(kernel, workspace, agent, binaries)?)
        .with_context(|| format!("cannot write {}", script.display()))?;
    eprintln!(
        "matrix: booting {} ({}) under QEMU TCG",
        kernel.release, kernel.package
    );
    let guest =
        virtme::RunningGuest::start(virtme.command(kernel, &script), &kernel.series.to_string())?;
    let status = guest.wait(GUEST_LIMIT)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!("kernel tests failed in the {} guest", kernel.series),
        // virtme-ng answers 255 when the guest could not run the script or report its status
        // (its script ports are named by udev in the guest).
        _ => bail!(
            "the {} guest ended with {status} before reporting the tests' result",
            kernel.series
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_test_must_be_listed() {
        let listed = "lab_scenarios_add_up_in_the_metrics: test\n\
                      prometheus_counts_the_refused_connects: test\n\n\
                      2 tests, 0 benchmarks\n";
        assert!(missing_tests(listed, &["lab_scenarios_add_up_in_the_metrics"]).is_empty());
        assert_eq!(
            missing_tests(
                listed,
                &["lab_scenarios", "prometheus_counts_the_refused_connects"]
            ),
            ["lab_scenarios"]
        );
    }

    #[test]
    fn test_binaries_come_from_cargos_json() {
        let json = br#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"tcp_state","src_path":"/w/tests/tests/tcp_state.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/w/target/debug/deps/tcp_state-6cfb898eaa0ab24e"],"executable":"/w/target/debug/deps/tcp_state-6cfb898eaa0ab24e","fresh":true}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"tests","src_path":"/w/tests/src/lib.rs","edition":"2024","doc":true,"doctest":true,"test":true},"profile":{"opt_level":"0","debuginfo":2,"debug_assertions":true,"overflow_checks":true,"test":true},"features":[],"filenames":["/w/target/debug/deps/tests-90ed00f82c4dfeb7"],"executable":"/w/target/debug/deps/tests-90ed00f82c4dfeb7","fresh":true}
{"reason":"build-finished","success":true}
"#;
        let binaries = test_binaries(json);
        assert_eq!(
            binaries.into_iter().collect::<Vec<_>>(),
            [(
                "tcp_state".to_owned(),
                PathBuf::from("/w/target/debug/deps/tcp_state-6cfb898eaa0ab24e")
            )]
        );
    }

    #[test]
    fn the_guest_script_runs_every_file_and_fails_if_any_failed() {
        let kernel = GuestKernel {
            series: Series::V6_12,
            package: "linux-image-6.12.117+deb12-amd64".into(),
            release: "6.12.117+deb12-amd64".into(),
            image: "/k/boot/vmlinuz-6.12.117+deb12-amd64".into(),
        };
        let binaries: TestBinaries = GUEST_TESTS
            .iter()
            .map(|t| {
                (
                    t.file.to_owned(),
                    PathBuf::from(format!("/w/target/debug/deps/{}-0", t.file)),
                )
            })
            .collect();
        let script = guest_script(
            &kernel,
            Path::new("/w"),
            Path::new("/w/target/release/connprobe"),
            &binaries,
        )
        .unwrap();
        assert!(script.contains("export CONNPROBE_BIN='/w/target/release/connprobe'\n"));
        assert!(script.contains(
            "\nrun tcp_state '/w/target/debug/deps/tcp_state-0' --test-threads=1 --exact --skip \
             'port_unreachable_classic_tracepoints' --skip"
        ));
        assert!(
            script
                .contains("\nrun tcp_reset '/w/target/debug/deps/tcp_reset-0' --test-threads=1\n")
        );
        assert!(script.contains(
            "\nrun metrics '/w/target/debug/deps/metrics-0' --test-threads=1 --exact \
             'lab_scenarios_add_up_in_the_metrics'\n"
        ));
        assert!(script.contains("exit 1\n"));
        assert!(!script.contains("|| true"));
        assert!(
            script
                .trim_end()
                .ends_with("echo 'guest: every test passed'")
        );

        let mut incomplete = binaries.clone();
        incomplete.remove("verdicts");
        assert!(guest_script(&kernel, Path::new("/w"), Path::new("/a"), &incomplete).is_err());
    }
}
