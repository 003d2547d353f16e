//! Tools from PyPI that the tests run, each pinned, in a venv of its own in the cache (the same
//! reasons as virtme-ng's, see `matrix::virtme`: Debian's Python refuses system-wide pip
//! installs, and a venv is removed with one `rm -r`).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// A command-line tool from a PyPI package, at one version.
pub struct PypiTool {
    pub package: &'static str,
    pub version: &'static str,
    /// The program the package installs into the venv's `bin/`.
    pub command: &'static str,
}

/// Validates the Kubernetes manifests in deploy/kubernetes/ against the API's schemas, offline
/// (the schemas ship in the package); tests/tests/deploy.rs runs it.
pub const KUBERNETES_VALIDATE: PypiTool = PypiTool {
    package: "kubernetes-validate",
    version: "1.37.0",
    command: "kubernetes-validate",
};

impl PypiTool {
    fn venv(&self, cache: &Path) -> PathBuf {
        cache.join(format!("{}-{}", self.package, self.version))
    }

    fn installed(&self, venv: &Path) -> bool {
        cmd::output_of(
            &venv.join("bin/pip").to_string_lossy(),
            &["show", "--disable-pip-version-check", self.package],
        )
        .is_some_and(|show| {
            show.lines()
                .any(|l| l == format!("Version: {}", self.version))
        }) && venv.join("bin").join(self.command).exists()
    }

    /// The tool's program in `<cache>/<package>-<version>`, installed there first if missing
    /// or broken.
    pub fn ensure(&self, cache: &Path) -> anyhow::Result<PathBuf> {
        let (package, version) = (self.package, self.version);
        let venv = self.venv(cache);
        let program = venv.join("bin").join(self.command);
        if self.installed(&venv) {
            eprintln!("setup: {package} {version}: found in {}", venv.display());
            return Ok(program);
        }
        eprintln!(
            "setup: {package} {version}: missing, installing it from PyPI into a venv at {}",
            venv.display()
        );
        if venv.exists() {
            std::fs::remove_dir_all(&venv)
                .with_context(|| format!("cannot remove {}", venv.display()))?;
        }
        cmd::status(Command::new("python3").args(["-m", "venv"]).arg(&venv)).with_context(
            || format!("cannot make a Python venv for {package} (on Debian, `apt-get install python3-venv`)"),
        )?;
        cmd::status(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("{package}=={version}")),
        )
        .with_context(|| format!("cannot install {package} from PyPI"))?;
        if !self.installed(&venv) {
            bail!(
                "{package} was installed into {} but pip does not list {version}",
                venv.display()
            );
        }
        eprintln!("setup: {package} {version}: installed");
        Ok(program)
    }
}
