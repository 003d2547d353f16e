//! The system commands each xtask task needs, the packages that bring them, and the check that
//! `setup` runs once per task: it installs what is missing where it can (apt-get on Debian and
//! Ubuntu, dnf on Fedora, as root), and otherwise stops with one sentence naming every missing
//! command and its package.
//!
//! This table is the one place that knows these programs: a new lab tool is one more row.
mod install;

use std::{ffi::OsStr, path::Path};

use anyhow::{anyhow, bail};

use crate::cmd;
use install::PackageManager;

/// An xtask task, as far as the system commands it needs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `cargo xtask setup`: everything any task needs.
    Setup,
    Build,
    Run,
    Test,
    Bench,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Setup => "setup",
            Task::Build => "build",
            Task::Run => "run",
            Task::Test => "test",
            Task::Bench => "bench",
        }
    }
}

/// A command some task runs, and the package that brings it.
#[derive(Debug, PartialEq, Eq)]
pub struct Requirement {
    pub command: &'static str,
    /// The Debian and Ubuntu package.
    pub debian: &'static str,
    /// The Fedora package, where known.
    pub fedora: Option<&'static str>,
    /// The tasks that run it (`setup` installs every row).
    pub tasks: &'static [Task],
}

use Task::{Bench, Build, Run, Test};

/// Every task that builds anything (`cc` links every build, bpf-linker's too).
const ALL: &[Task] = &[Build, Run, Test, Bench];
/// `test` ends with the bench's smoke run, so it needs the bench's peers too.
const TEST_AND_BENCH: &[Task] = &[Test, Bench];

pub const REQUIREMENTS: &[Requirement] = &[
    // Cargo links with it, and bpf-linker's build compiles C. xtask itself cannot build without
    // it, so it is checked here for the README's sake and for bpf-linker.
    row("cc", "build-essential", Some("gcc"), ALL),
    // The lab: namespaces and veth pairs, faults, ground truth, sysctls in a namespace.
    row("ip", "iproute2", Some("iproute"), TEST_AND_BENCH),
    row("nft", "nftables", Some("nftables"), TEST_AND_BENCH),
    row("nstat", "iproute2", Some("iproute"), TEST_AND_BENCH),
    row("sysctl", "procps", Some("procps-ng"), &[Test]),
    // A real Prometheus server scraping the agent, and `promtool check metrics`.
    row(
        "prometheus",
        "prometheus",
        Some("golang-github-prometheus"),
        &[Test],
    ),
    row(
        "promtool",
        "prometheus",
        Some("golang-github-prometheus"),
        &[Test],
    ),
    // A real non-blocking client, reading JSON logs, inspecting loaded programs.
    row("curl", "curl", Some("curl"), &[Test]),
    row("jq", "jq", Some("jq"), &[Test]),
    // Inspecting loaded programs; the bench names its programs and refuses to run while
    // foreign programs sit on the hooks it measures.
    row("bpftool", "bpftool", Some("bpftool"), TEST_AND_BENCH),
    // Certificates for the TLS tests of --web-config-file.
    row("openssl", "openssl", Some("openssl"), &[Test]),
    // Real server shapes in the lab: a pre-forked server, SO_REUSEPORT processes; and the venv
    // that holds virtme-ng for the kernel matrix.
    row("python3", "python3", Some("python3"), &[Test]),
    // DNS in the lab (tests/tests/dns.rs): glibc's resolver in a namespace (getent), the lab's
    // DNS server (python3, above), and a client stopped as an application gives up (timeout).
    row("getent", "libc-bin", Some("glibc-common"), &[Test]),
    row("timeout", "coreutils", Some("coreutils"), &[Test]),
    // Least privilege: the agent as another user with chosen capabilities, in a mount namespace
    // of its own; the systemd unit checked.
    row("setpriv", "util-linux", Some("util-linux"), &[Test]),
    row("unshare", "util-linux", Some("util-linux"), &[Test]),
    row("systemd-analyze", "systemd", Some("systemd"), &[Test]),
    // `connprobe probe` run inside the lab's client namespace (tests/tests/probe.rs).
    row("nsenter", "util-linux", Some("util-linux"), &[Test]),
    // The kernel matrix (xtask/src/matrix.rs): QEMU runs the guests; virtme-ng builds their
    // initramfs with busybox; the guest kernels' modules (veth, nf_tables, ...) need an index
    // (depmod) and modprobe, which the guest takes from the host's root filesystem, like udev,
    // which names the ports that carry the guest's exit status. The kernels are Debian packages,
    // fetched with apt-get download and unpacked with dpkg-deb.
    row(
        "qemu-system-x86_64",
        "qemu-system-x86",
        Some("qemu-system-x86-core"),
        &[Test],
    ),
    row("busybox", "busybox-static", Some("busybox"), &[Test]),
    row("depmod", "kmod", Some("kmod"), &[Test]),
    row("modprobe", "kmod", Some("kmod"), &[Test]),
    row("udevadm", "udev", Some("systemd-udev"), &[Test]),
    row("dpkg-deb", "dpkg", Some("dpkg"), &[Test]),
    // `connprobe top` driven as an operator would, in a terminal of its own.
    row("tmux", "tmux", Some("tmux"), &[Test]),
    // The monitoring mixin (deploy/mixin/): its jsonnet rendered to the committed rules and
    // dashboard, which the tests render again and compare.
    row("jsonnet", "jsonnet", Some("jsonnet"), &[Test]),
    row("jsonnetfmt", "jsonnet", Some("jsonnet"), &[Test]),
    // The bench's peers. Fedora's libbpf-tools names its programs bpf-tcpstates and so on.
    row("tcpstates", "libbpf-tools", None, TEST_AND_BENCH),
    row("tcplife", "libbpf-tools", None, TEST_AND_BENCH),
    row("bpftrace", "bpftrace", Some("bpftrace"), TEST_AND_BENCH),
];

const fn row(
    command: &'static str,
    debian: &'static str,
    fedora: Option<&'static str>,
    tasks: &'static [Task],
) -> Requirement {
    Requirement {
        command,
        debian,
        fedora,
        tasks,
    }
}

/// The commands `task` needs, in table order.
pub fn needs(task: Task) -> Vec<&'static Requirement> {
    REQUIREMENTS
        .iter()
        .filter(|r| task == Task::Setup || r.tasks.contains(&task))
        .collect()
}

/// The table as `cargo xtask setup --help` shows it.
pub fn table() -> String {
    let mut text = String::from(
        "System commands, their Debian and Fedora packages, and the tasks that need them:\n",
    );
    for r in REQUIREMENTS {
        let tasks: Vec<&str> = r.tasks.iter().map(|t| t.name()).collect();
        text.push_str(&format!(
            "  {:<19} {:<16} {:<25} {}\n",
            r.command,
            r.debian,
            r.fedora.unwrap_or("-"),
            tasks.join(", ")
        ));
    }
    text
}

/// Whether setup may install missing packages; `--no-install` or `CONNPROBE_NO_INSTALL` say no.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    Allowed,
    RefusedByFlag,
    RefusedByEnv,
}

/// The environment variable that does what `--no-install` does.
pub const NO_INSTALL_ENV: &str = "CONNPROBE_NO_INSTALL";

impl Install {
    /// From the `--no-install` flag and the value of `CONNPROBE_NO_INSTALL`: any value but empty,
    /// `0`, `false` or `no` opts out.
    pub fn from_flag_and_env(no_install: bool, env: Option<&OsStr>) -> Self {
        let env_opts_out =
            env.is_some_and(|v| !["", "0", "false", "no"].iter().any(|off| v == *off));
        if no_install {
            Install::RefusedByFlag
        } else if env_opts_out {
            Install::RefusedByEnv
        } else {
            Install::Allowed
        }
    }
}

/// Why missing commands were not installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocked {
    Flag,
    Env,
    NotRoot,
    NoPackageManager,
    /// Installing their packages (where known) did not bring them.
    StillMissing,
}

/// Checks the commands `task` needs, installs the missing ones where it can and says what it
/// installed; an error naming every command still missing otherwise.
pub fn ensure(task: Task, install: Install) -> anyhow::Result<()> {
    let needed = needs(task);
    let missing: Vec<&Requirement> = needed
        .iter()
        .copied()
        .filter(|r| find_program(r.command).is_none())
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = needed.iter().map(|r| r.command).collect();
        eprintln!(
            "setup: system commands for {}: found {}",
            task.name(),
            names.join(", ")
        );
        return Ok(());
    }
    let found = install::package_manager();
    let manager = installer(install, cmd::is_root(), found)
        .map_err(|blocked| anyhow!("{}", missing_message(task, &missing, found, blocked)))?;
    let packages = packages_of(&missing, manager);
    if !packages.is_empty() {
        install::install(manager, &packages)?;
        eprintln!("setup: installed {}", installed_summary(&missing, manager));
    }
    let still_missing: Vec<&Requirement> = missing
        .into_iter()
        .filter(|r| find_program(r.command).is_none())
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "{}",
            missing_message(task, &still_missing, Some(manager), Blocked::StillMissing)
        );
    }
    Ok(())
}

/// The package manager to install with, or why there is none to use.
fn installer(
    install: Install,
    root: bool,
    manager: Option<PackageManager>,
) -> Result<PackageManager, Blocked> {
    match (install, manager) {
        (Install::RefusedByFlag, _) => Err(Blocked::Flag),
        (Install::RefusedByEnv, _) => Err(Blocked::Env),
        (Install::Allowed, _) if !root => Err(Blocked::NotRoot),
        (Install::Allowed, None) => Err(Blocked::NoPackageManager),
        (Install::Allowed, Some(manager)) => Ok(manager),
    }
}

/// Where a program lives: on PATH, or in an sbin folder a non-root PATH may lack (Debian's
/// libbpf-tools, nft).
pub fn find_program(name: &str) -> Option<String> {
    if cmd::on_path(name) {
        return Some(name.to_owned());
    }
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|p| Path::new(p).is_file())
}

/// The package that brings a command for this package manager, if known.
fn package_of(requirement: &Requirement, manager: PackageManager) -> Option<&'static str> {
    match manager {
        PackageManager::Apt => Some(requirement.debian),
        PackageManager::Dnf => requirement.fedora,
    }
}

/// The packages to install for these commands, each once, in table order.
fn packages_of(missing: &[&Requirement], manager: PackageManager) -> Vec<&'static str> {
    let mut packages: Vec<&str> = Vec::new();
    for package in missing.iter().filter_map(|r| package_of(r, manager)) {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    packages
}

/// `nftables (nft), prometheus (prometheus, promtool)`.
fn installed_summary(missing: &[&Requirement], manager: PackageManager) -> String {
    packages_of(missing, manager)
        .iter()
        .map(|package| {
            let commands: Vec<&str> = missing
                .iter()
                .filter(|r| package_of(r, manager) == Some(package))
                .map(|r| r.command)
                .collect();
            format!("{package} ({})", commands.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one sentence that names every missing command, the package that brings it, why it was
/// not installed and what to do.
fn missing_message(
    task: Task,
    missing: &[&Requirement],
    manager: Option<PackageManager>,
    blocked: Blocked,
) -> String {
    let commands: Vec<String> = missing
        .iter()
        .map(|r| format!("{} ({})", r.command, package_phrase(r, manager)))
        .collect();
    let packages = manager.map(|m| (m, packages_of(missing, m)));
    let remedy = match packages {
        _ if blocked == Blocked::StillMissing => "install them by hand".to_owned(),
        None => "install them with your package manager".to_owned(),
        Some((_, packages)) if packages.is_empty() => "install them by hand".to_owned(),
        Some((manager, packages)) => format!(
            "install them (`{} {}`){}",
            manager.install_command(),
            packages.join(" "),
            if blocked == Blocked::NotRoot {
                " as root"
            } else {
                ""
            }
        ),
    };
    let why = match blocked {
        Blocked::Flag => "were not installed because of --no-install".to_owned(),
        Blocked::Env => format!("were not installed because {NO_INSTALL_ENV} is set"),
        Blocked::NotRoot => "were not installed because that needs root".to_owned(),
        Blocked::NoPackageManager => {
            "were not installed because this system is neither Debian/Ubuntu with apt-get nor Fedora with dnf"
                .to_owned()
        }
        Blocked::StillMissing => "are still missing after installing their packages".to_owned(),
    };
    format!(
        "`cargo xtask {}` needs {}, which {why}: {remedy}, then run it again",
        task.name(),
        join_with_and(&commands)
    )
}

/// `Debian package nftables`, `Fedora package nftables`, or both where the system is neither.
fn package_phrase(requirement: &Requirement, manager: Option<PackageManager>) -> String {
    let debian = format!("Debian package {}", requirement.debian);
    let fedora = requirement.fedora.map(|f| format!("Fedora package {f}"));
    match (manager, fedora) {
        (Some(PackageManager::Apt), _) => debian,
        (Some(PackageManager::Dnf), Some(fedora)) => fedora,
        (Some(PackageManager::Dnf), None) => format!("no Fedora package known; {debian}"),
        (None, Some(fedora)) => format!("{debian}, {fedora}"),
        (None, None) => debian,
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_with_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(task: Task) -> Vec<&'static str> {
        needs(task).iter().map(|r| r.command).collect()
    }

    fn requirement(command: &str) -> &'static Requirement {
        REQUIREMENTS
            .iter()
            .find(|r| r.command == command)
            .expect("in the table")
    }

    #[test]
    fn run_and_build_need_only_a_c_toolchain() {
        assert_eq!(commands(Task::Run), ["cc"]);
        assert_eq!(commands(Task::Build), ["cc"]);
    }

    #[test]
    fn test_needs_the_lab_prometheus_and_the_bench_peers() {
        let test = commands(Task::Test);
        for command in [
            "cc",
            "nft",
            "ip",
            "nstat",
            "sysctl",
            "promtool",
            "prometheus",
            "curl",
            "jq",
            "bpftool",
            "python3",
            "getent",
            "timeout",
            "qemu-system-x86_64",
            "busybox",
            "depmod",
            "modprobe",
            "udevadm",
            "dpkg-deb",
            "tcpstates",
            "tcplife",
            "bpftrace",
            "setpriv",
            "unshare",
            "systemd-analyze",
            "tmux",
        ] {
            assert!(test.contains(&command), "test should need {command}");
        }
    }

    #[test]
    fn bench_needs_its_peers_and_the_lab_but_not_prometheus() {
        let bench = commands(Task::Bench);
        for command in [
            "tcpstates",
            "tcplife",
            "bpftrace",
            "nft",
            "ip",
            "nstat",
            "bpftool",
        ] {
            assert!(bench.contains(&command), "bench should need {command}");
        }
        assert!(!bench.contains(&"promtool"));
    }

    #[test]
    fn setup_needs_every_row_once() {
        assert_eq!(needs(Task::Setup).len(), REQUIREMENTS.len());
        let mut names = commands(Task::Setup);
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REQUIREMENTS.len());
    }

    #[test]
    fn packages_are_named_once_each() {
        let missing = [
            requirement("nft"),
            requirement("prometheus"),
            requirement("promtool"),
        ];
        assert_eq!(
            packages_of(&missing, PackageManager::Apt),
            ["nftables", "prometheus"]
        );
        assert_eq!(
            installed_summary(&missing, PackageManager::Apt),
            "nftables (nft), prometheus (prometheus, promtool)"
        );
    }

    #[test]
    fn the_message_names_every_missing_command_and_its_package_in_one_sentence() {
        let missing = [
            requirement("nft"),
            requirement("promtool"),
            requirement("bpftool"),
        ];
        let message = missing_message(
            Task::Test,
            &missing,
            Some(PackageManager::Apt),
            Blocked::Env,
        );
        assert_eq!(
            message,
            "`cargo xtask test` needs nft (Debian package nftables), promtool (Debian package \
             prometheus) and bpftool (Debian package bpftool), which were not installed because \
             CONNPROBE_NO_INSTALL is set: install them (`apt-get install nftables prometheus \
             bpftool`), then run it again"
        );
        assert!(!message.contains(". "), "one sentence: {message}");
    }

    #[test]
    fn the_message_without_a_package_manager_names_both_families() {
        let message = missing_message(
            Task::Bench,
            &[requirement("nft"), requirement("tcpstates")],
            None,
            Blocked::NoPackageManager,
        );
        assert_eq!(
            message,
            "`cargo xtask bench` needs nft (Debian package nftables, Fedora package nftables) and \
             tcpstates (Debian package libbpf-tools), which were not installed because this \
             system is neither Debian/Ubuntu with apt-get nor Fedora with dnf: install them with \
             your package manager, then run it again"
        );
    }

    #[test]
    fn the_message_on_fedora_says_which_package_is_unknown() {
        let message = missing_message(
            Task::Bench,
            &[requirement("tcplife")],
            Some(PackageManager::Dnf),
            Blocked::StillMissing,
        );
        assert_eq!(
            message,
            "`cargo xtask bench` needs tcplife (no Fedora package known; Debian package \
             libbpf-tools), which are still missing after installing their packages: install \
             them by hand, then run it again"
        );
    }

    #[test]
    fn not_root_says_to_run_as_root() {
        let message = missing_message(
            Task::Setup,
            &[requirement("jq")],
            Some(PackageManager::Dnf),
            Blocked::NotRoot,
        );
        assert!(
            message.ends_with(
                "which were not installed because that needs root: install them (`dnf install \
                 jq`) as root, then run it again"
            ),
            "{message}"
        );
    }

    #[test]
    fn installing_needs_consent_root_and_a_known_package_manager() {
        let apt = Some(PackageManager::Apt);
        assert_eq!(
            installer(Install::Allowed, true, apt),
            Ok(PackageManager::Apt)
        );
        assert_eq!(
            installer(Install::RefusedByFlag, true, apt),
            Err(Blocked::Flag)
        );
        assert_eq!(
            installer(Install::RefusedByEnv, true, apt),
            Err(Blocked::Env)
        );
        assert_eq!(
            installer(Install::Allowed, false, apt),
            Err(Blocked::NotRoot)
        );
        assert_eq!(
            installer(Install::Allowed, true, None),
            Err(Blocked::NoPackageManager)
        );
    }

    #[test]
    fn the_flag_or_a_true_env_value_refuses_installing() {
        let from = Install::from_flag_and_env;
        assert_eq!(from(false, None), Install::Allowed);
        assert_eq!(from(true, None), Install::RefusedByFlag);
        assert_eq!(from(true, Some("1".as_ref())), Install::RefusedByFlag);
        for on in ["1", "yes", "true"] {
            assert_eq!(
                from(false, Some(on.as_ref())),
                Install::RefusedByEnv,
                "{on}"
            );
        }
        for off in ["", "0", "false", "no"] {
            assert_eq!(from(false, Some(off.as_ref())), Install::Allowed, "{off}");
        }
    }
}
