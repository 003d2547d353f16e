//! `cargo xtask setup`: installs what a task needs where it is missing, and says what it found or
//! did: the system commands of the task (see `packages`), then the eBPF toolchain.
//!
//! The eBPF crate builds with a nightly toolchain (for `-Z build-std=core` on the bpf target), its
//! `rust-src` component, and `bpf-linker`, which must link the same LLVM major version as that
//! nightly's rustc. Tested with nightly-2026-05-20 (rustc 1.97.0-nightly e50aa6fba, LLVM 22.1)
//! and bpf-linker 0.13.0; the toolchain installed is whatever `nightly` is on the day.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    cmd, matrix,
    packages::{self, Install, Task},
};

/// The toolchain aya-build builds the eBPF crate with.
const NIGHTLY: &str = "nightly";
/// The bpf-linker release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Sets up what `task` needs: its system commands, then the eBPF toolchain. `run`, `build`,
/// `test` and `bench` call it once, before anything else.
pub fn run(task: Task, install: Install) -> anyhow::Result<()> {
    if !cmd::on_path("rustup") {
        bail!(
            "rustup is not on PATH: install it (https://rustup.rs) and run `cargo xtask setup` again"
        );
    }
    packages::ensure(task, install)?;
    ensure_nightly()?;
    ensure_rust_src()?;
    let llvm_major = nightly_llvm_major()?;
    ensure_bpf_linker(llvm_major)?;
    // `test` fetches the guests it runs itself (`--kernel` may name only some).
    if task == Task::Setup {
        matrix::prepare(&matrix::Series::ALL)?;
        crate::pypi::KUBERNETES_VALIDATE.ensure(&matrix::cache_dir())?;
    }
    Ok(())
}

fn ensure_nightly() -> anyhow::Result<()> {
    let host = host_triple()?;
    let wanted = format!("{NIGHTLY}-{host}");
    let list = cmd::output_of("rustup", &["toolchain", "list"])
        .ok_or_else(|| anyhow!("`rustup toolchain list` failed"))?;
    let installed = list
        .lines()
        .any(|line| line.split_whitespace().next() == Some(wanted.as_str()));
    if installed {
        eprintln!("setup: {NIGHTLY} toolchain: found ({})", nightly_release()?);
        return Ok(());
    }
    eprintln!("setup: {NIGHTLY} toolchain: missing, installing it");
    cmd::status(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY,
        "--profile",
        "minimal",
    ]))?;
    eprintln!(
        "setup: {NIGHTLY} toolchain: installed ({})",
        nightly_release()?
    );
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output_of(
        "rustup",
        &["component", "list", "--toolchain", NIGHTLY, "--installed"],
    )
    .ok_or_else(|| anyhow!("`rustup component list --toolchain {NIGHTLY}` failed"))?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: rust-src for {NIGHTLY}: found");
        return Ok(());
    }
    eprintln!("setup: rust-src for {NIGHTLY}: missing, adding it");
    cmd::status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))?;
    eprintln!("setup: rust-src for {NIGHTLY}: added");
    Ok(())
}

fn ensure_bpf_linker(llvm_major: u32) -> anyhow::Result<()> {
    match find_bpf_linker() {
        Some(path) => match bpf_linker_problem(&path, llvm_major) {
            None => {
                eprintln!(
                    "setup: bpf-linker: found {} (LLVM {llvm_major}, like {NIGHTLY})",
                    path.display()
                );
                return Ok(());
            }
            Some(problem) => {
                eprintln!(
                    "setup: bpf-linker: {} {problem}, reinstalling it",
                    path.display()
                )
            }
        },
        None => eprintln!("setup: bpf-linker: missing, installing it for LLVM {llvm_major}"),
    }
    install_bpf_linker(llvm_major)?;
    let path = find_bpf_linker().ok_or_else(|| {
        anyhow!(
            "bpf-linker was installed but is neither on PATH nor in {}",
            cargo_bin().display()
        )
    })?;
    if let Some(problem) = bpf_linker_problem(&path, llvm_major) {
        bail!(
            "bpf-linker was installed at {} but {problem}",
            path.display()
        );
    }
    eprintln!(
        "setup: bpf-linker: installed {} (LLVM {llvm_major})",
        path.display()
    );
    Ok(())
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM: cargo finds it through a
/// folder whose `lib/libLLVM.so` points at it. The folder stays, as the linker's run path.
fn install_bpf_linker(llvm_major: u32) -> anyhow::Result<()> {
    let library = nightly_libllvm(llvm_major)?;
    let prefix = cargo_home().join(format!("bpf-linker-llvm-{llvm_major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("could not create {}", lib.display()))?;
    let file_name = library
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", library.display()))?;
    // `libLLVM.so` for the build; the versioned name (the library's soname) for the run path.
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .with_context(|| format!("could not remove {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&library, &link).with_context(|| {
            format!("could not link {} to {}", link.display(), library.display())
        })?;
    }
    let features = format!("llvm-{llvm_major}");
    cmd::status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args(["--no-default-features", "--features", &features])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker failed")
}

/// bpf-linker on PATH, else in cargo's bin folder.
fn find_bpf_linker() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("bpf-linker");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let candidate = cargo_bin().join("bpf-linker");
    candidate.is_file().then_some(candidate)
}

/// Why this bpf-linker won't do, if it won't: it does not run (as rustc runs it, with the
/// nightly's libraries on the search path) or it links another LLVM major version.
fn bpf_linker_problem(path: &Path, llvm_major: u32) -> Option<String> {
    let runs = Command::new("rustup")
        .args(["run", NIGHTLY])
        .arg(path)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        return Some("does not run".to_owned());
    }
    match linked_llvm_major(path) {
        Some(major) if major != llvm_major => Some(format!(
            "links LLVM {major} but {NIGHTLY} has LLVM {llvm_major}"
        )),
        _ => None,
    }
}

/// The LLVM major version a dynamically linked bpf-linker needs (`libLLVM.so.22.1-rust-...` or
/// `libLLVM-22...`), from the names in the binary; `None` when it names none (static LLVM).
fn linked_llvm_major(path: &Path) -> Option<u32> {
    let bytes = std::fs::read(path).ok()?;
    for pattern in [&b"libLLVM.so."[..], &b"libLLVM-"[..]] {
        if let Some(at) = bytes.windows(pattern.len()).position(|w| w == pattern) {
            let digits: String = bytes[at + pattern.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|&b| b as char)
                .collect();
            if let Ok(major) = digits.parse() {
                return Some(major);
            }
        }
    }
    None
}

/// The nightly toolchain's `libLLVM.so.<major>.*-rust-*`.
fn nightly_libllvm(llvm_major: u32) -> anyhow::Result<PathBuf> {
    let sysroot = cmd::output_of("rustc", &[&format!("+{NIGHTLY}"), "--print", "sysroot"])
        .ok_or_else(|| anyhow!("`rustc +{NIGHTLY} --print sysroot` failed"))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{llvm_major}.");
    let entries =
        std::fs::read_dir(&lib).with_context(|| format!("could not list {}", lib.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.contains("-rust-") {
            return Ok(entry.path());
        }
    }
    bail!(
        "{} holds no {prefix}*-rust-* library to build bpf-linker against",
        lib.display()
    )
}

/// The LLVM major version of the nightly rustc, from `LLVM version: 22.1.4`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let verbose = nightly_version_verbose()?;
    parse_llvm_major(&verbose)
        .ok_or_else(|| anyhow!("`rustc +{NIGHTLY} -vV` shows no `LLVM version:` line:\n{verbose}"))
}

fn parse_llvm_major(rustc_verbose: &str) -> Option<u32> {
    let version = rustc_verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

fn nightly_release() -> anyhow::Result<String> {
    let verbose = nightly_version_verbose()?;
    Ok(verbose.lines().next().unwrap_or_default().trim().to_owned())
}

fn nightly_version_verbose() -> anyhow::Result<String> {
    cmd::output_of("rustc", &[&format!("+{NIGHTLY}"), "-vV"]).ok_or_else(|| {
        anyhow!("`rustc +{NIGHTLY} -vV` failed: is the {NIGHTLY} toolchain installed?")
    })
}

fn host_triple() -> anyhow::Result<String> {
    let verbose = cmd::output_of("rustc", &["-vV"]).ok_or_else(|| anyhow!("`rustc -vV` failed"))?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("host:"))
        .map(|host| host.trim().to_owned())
        .ok_or_else(|| anyhow!("`rustc -vV` shows no host triple"))
}

fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        }
    }
}

fn cargo_bin() -> PathBuf {
    cargo_home().join("bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let verbose = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                       host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(verbose), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0.0\n"), None);
    }
}
