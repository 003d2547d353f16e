//! Debian's kernel packages for the guests: the newest `linux-image` of a series that apt knows,
//! fetched with `apt-get download` (nothing is installed on the host) and unpacked with
//! `dpkg-deb -x` into the cache, with a module index (`depmod`) so that the guest can load veth,
//! nf_tables and the rest, which Debian builds as modules.
//!
//! Cache layout: `<cache>/kernels/<package>/` holds the package's `boot/vmlinuz-<release>` and
//! `lib/modules/<release>/`, and a `.ready` file once all of that is complete. A new package of
//! a series replaces the older one; a series whose newest package cannot be fetched (no network,
//! a mirror ahead of the local package lists) runs on the one already cached, and says so.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

use super::Series;
use crate::cmd;

/// A guest kernel, unpacked and ready to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestKernel {
    pub series: Series,
    /// The Debian package it came from, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// The kernel release (`uname -r` in the guest), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// `boot/vmlinuz-<release>` in the unpacked package; virtme-ng finds the modules beside it.
    pub image: PathBuf,
}

/// Marks a package folder whose unpacking and module index are complete.
const READY: &str = ".ready";

impl Series {
    /// The `apt-cache search --names-only` pattern of this series' generic amd64 kernels.
    fn apt_pattern(self) -> &'static str {
        match self {
            Series::V6_1 => r"^linux-image-6\.1\.0-[0-9]+-amd64$",
            Series::V6_12 => r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        }
    }

    /// The number that orders this series' packages (the ABI number of 6.1, the patch level of
    /// 6.12), or `None` when `package` is not a generic amd64 kernel of this series (`-cloud-`,
    /// `-rt-`, `-unsigned`, another series).
    fn package_order(self, package: &str) -> Option<u32> {
        let (prefix, suffix) = match self {
            Series::V6_1 => ("linux-image-6.1.0-", "-amd64"),
            Series::V6_12 => ("linux-image-6.12.", "+deb12-amd64"),
        };
        let number = package.strip_prefix(prefix)?.strip_suffix(suffix)?;
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        number.parse().ok()
    }
}

/// The newest package of `series` in `apt-cache search` output (`NAME - DESCRIPTION` lines).
pub fn newest_package(series: Series, apt_search: &str) -> Option<String> {
    apt_search
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| series.package_order(name).map(|order| (order, name)))
        .max_by_key(|(order, _)| *order)
        .map(|(_, name)| name.to_owned())
}

/// The kernel release from an unpacked package's `boot/vmlinuz-<release>`.
fn release_of(package_root: &Path) -> anyhow::Result<String> {
    let boot = package_root.join("boot");
    let entries =
        std::fs::read_dir(&boot).with_context(|| format!("cannot list {}", boot.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        if let Some(release) = name.to_string_lossy().strip_prefix("vmlinuz-") {
            return Ok(release.to_owned());
        }
    }
    bail!("{} holds no vmlinuz-*", boot.display())
}

/// The kernel of `series`: the newest package apt knows, from the cache or fetched into it.
pub fn ensure(series: Series, cache: &Path) -> anyhow::Result<GuestKernel> {
    let kernels = cache.join("kernels");
    std::fs::create_dir_all(&kernels)
        .with_context(|| format!("cannot create {}", kernels.display()))?;
    let cached = cached_packages(series, &kernels);
    let newest = match find_newest(series) {
        Ok(newest) => newest,
        Err(err) => return fall_back(series, &kernels, &cached, err),
    };
    if cached.contains(&newest) {
        let kernel = ready_kernel(series, &kernels, &newest)?;
        eprintln!(
            "matrix: {series} kernel: found {} ({newest}) in {}",
            kernel.release,
            kernels.display()
        );
        return Ok(kernel);
    }
    match fetch(&kernels, &newest) {
        Ok(()) => {}
        Err(err) => return fall_back(series, &kernels, &cached, err),
    }
    for old in cached {
        let path = kernels.join(&old);
        eprintln!("matrix: {series} kernel: removing the older {old}");
        if let Err(err) = std::fs::remove_dir_all(&path) {
            eprintln!("matrix: could not remove {}: {err}", path.display());
        }
    }
    ready_kernel(series, &kernels, &newest)
}

/// Runs on a cached kernel of the series when the newest one cannot be had; fails when none is.
fn fall_back(
    series: Series,
    kernels: &Path,
    cached: &[String],
    err: anyhow::Error,
) -> anyhow::Result<GuestKernel> {
    let Some(package) = cached
        .iter()
        .max_by_key(|p| series.package_order(p).unwrap_or(0))
    else {
        return Err(err.context(format!(
            "cannot get a {series} kernel for the kernel matrix, and none is cached in {}",
            kernels.display()
        )));
    };
    eprintln!("matrix: {series} kernel: {err:#}; using the cached {package}");
    ready_kernel(series, kernels, package)
}

/// Packages of `series` already unpacked in the cache.
fn cached_packages(series: Series, kernels: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(kernels) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(READY).is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| series.package_order(name).is_some())
        .collect()
}

fn ready_kernel(series: Series, kernels: &Path, package: &str) -> anyhow::Result<GuestKernel> {
    let root = kernels.join(package);
    let release = release_of(&root)?;
    Ok(GuestKernel {
        series,
        package: package.to_owned(),
        image: root.join("boot").join(format!("vmlinuz-{release}")),
        release,
    })
}

/// Asks apt for the newest package of the series, updating its package lists once if they know
/// none (a fresh machine's lists may be empty).
fn find_newest(series: Series) -> anyhow::Result<String> {
    if !cmd::on_path("apt-cache") {
        bail!(
            "the kernel matrix boots Debian's kernel packages and fetches them with apt, which \
             this system lacks"
        );
    }
    let search = || {
        cmd::output_of(
            "apt-cache",
            &["search", "--names-only", series.apt_pattern()],
        )
        .ok_or_else(|| anyhow!("`apt-cache search` failed"))
    };
    if let Some(newest) = newest_package(series, &search()?) {
        return Ok(newest);
    }
    eprintln!("matrix: apt knows no {series} kernel package; updating its package lists");
    cmd::status(Command::new("apt-get").args(["update", "-q"]))?;
    newest_package(series, &search()?).ok_or_else(|| {
        anyhow!(
            "apt knows no package matching {} (Debian 12's main and security archives have them)",
            series.apt_pattern()
        )
    })
}

/// Downloads `package` and unpacks it into `<kernels>/<package>`, with a module index.
fn fetch(kernels: &Path, package: &str) -> anyhow::Result<()> {
    let downloads = kernels.join(".download");
    let partial = kernels.join(format!("{package}.partial"));
    for stale in [&downloads, &partial] {
        if stale.exists() {
            std::fs::remove_dir_all(stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    std::fs::create_dir_all(&downloads)
        .with_context(|| format!("cannot create {}", downloads.display()))?;
    let begun = Instant::now();
    eprintln!("matrix: downloading {package} with apt-get download (70 to 110 MB)");
    // The download goes to a folder of root's; apt's sandbox user could not write there.
    cmd::status(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&downloads),
    )
    .with_context(|| format!("cannot download {package}"))?;
    let deb = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| anyhow!("apt-get download left no .deb in {}", downloads.display()))?;
    eprintln!("matrix: unpacking {}", deb.display());
    cmd::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    let release = release_of(&partial)?;
    // Debian builds the index at install time; the guest's modprobe and virtme-ng need it.
    cmd::status(Command::new("depmod").arg("-b").arg(&partial).arg(&release))?;
    std::fs::write(partial.join(READY), format!("{package}\n"))?;
    let root = kernels.join(package);
    std::fs::rename(&partial, &root)
        .with_context(|| format!("cannot move {} to {}", partial.display(), root.display()))?;
    std::fs::remove_dir_all(&downloads)
        .with_context(|| format!("cannot remove {}", downloads.display()))?;
    eprintln!(
        "matrix: {package} ({release}) ready in {} after {:.0} s",
        root.display(),
        begun.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const APT_SEARCH: &str = "\
linux-image-6.1.0-47-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-57-rt-amd64 - Linux 6.1 for 64-bit PCs, PREEMPT_RT (signed)
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-57-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-60-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-48-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.12.101+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.118+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.119+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.99+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
";

    #[test]
    fn the_newest_generic_kernel_of_each_series_is_picked() {
        // By number, not by name: 57 > 9 and 117 > 99.
        assert_eq!(
            newest_package(Series::V6_1, APT_SEARCH).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(
            newest_package(Series::V6_12, APT_SEARCH).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(newest_package(Series::V6_1, ""), None);
    }

    #[test]
    fn flavours_and_other_series_are_not_packages_of_a_series() {
        for name in [
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-57-amd64-unsigned",
            "linux-image-6.1.0--amd64",
            "linux-image-6.12.117+deb12-amd64",
            "linux-image-amd64",
        ] {
            assert_eq!(Series::V6_1.package_order(name), None, "{name}");
        }
        assert_eq!(
            Series::V6_12.package_order("linux-image-6.1.0-57-amd64"),
            None
        );
        assert_eq!(
            Series::V6_12.package_order("linux-image-6.12.117+deb12-amd64"),
            Some(117)
        );
    }

    #[test]
    fn the_release_comes_from_the_unpacked_image() {
        let root = std::env::temp_dir().join(format!("xtask-kernel-{}", std::process::id()));
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join("boot/config-6.1.0-57-amd64"), "").unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.1.0-57-amd64"), "").unwrap();
        assert_eq!(release_of(&root).unwrap(), "6.1.0-57-amd64");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
