//! Installing system packages: which package manager this system has (from os-release), and
//! running it without questions and without starting services.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::cmd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageManager {
    /// Debian, Ubuntu and their derivatives.
    Apt,
    /// Fedora and its derivatives.
    Dnf,
}

impl PackageManager {
    pub fn install_command(self) -> &'static str {
        match self {
            PackageManager::Apt => "apt-get install",
            PackageManager::Dnf => "dnf install",
        }
    }

    fn program(self) -> &'static str {
        match self {
            PackageManager::Apt => "apt-get",
            PackageManager::Dnf => "dnf",
        }
    }
}

/// This system's package manager: the family os-release names, if its program is installed.
pub fn package_manager() -> Option<PackageManager> {
    let os_release = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|path| fs::read_to_string(path).ok())?;
    package_manager_of(&os_release).filter(|manager| cmd::on_path(manager.program()))
}

/// The package manager of the family that os-release's `ID` or `ID_LIKE` names.
fn package_manager_of(os_release: &str) -> Option<PackageManager> {
    let mut ids = Vec::new();
    for line in os_release.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        if key == "ID" || key == "ID_LIKE" {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            ids.extend(value.split_whitespace().map(str::to_ascii_lowercase));
        }
    }
    ids.iter().find_map(|id| match id.as_str() {
        "debian" | "ubuntu" => Some(PackageManager::Apt),
        "fedora" => Some(PackageManager::Dnf),
        _ => None,
    })
}

/// Installs `packages` with `manager`, answering no questions and starting no services.
pub fn install(manager: PackageManager, packages: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "setup: installing {} with {}",
        packages.join(" "),
        manager.program()
    );
    match manager {
        PackageManager::Apt => {
            let _held = ServicesHeld::hold()?;
            let apt_get = || {
                let mut command = Command::new("apt-get");
                command.env("DEBIAN_FRONTEND", "noninteractive");
                command
            };
            cmd::status(apt_get().args(["update", "-q"]))?;
            cmd::status(
                apt_get()
                    .args(["install", "-y", "-q", "--no-install-recommends"])
                    .args(packages),
            )
        }
        // RPM packages do not start their services on install.
        PackageManager::Dnf => {
            cmd::status(Command::new("dnf").args(["install", "-y"]).args(packages))
        }
    }
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// While alive, Debian's maintainer scripts start no service (a `policy-rc.d` that answers 101):
/// installing prometheus must not leave a server running. The file is removed on drop only if
/// it was made here.
struct ServicesHeld {
    made_here: Option<PathBuf>,
}

impl ServicesHeld {
    fn hold() -> anyhow::Result<Self> {
        Self::hold_at(Path::new(POLICY_RC_D))
    }

    fn hold_at(policy: &Path) -> anyhow::Result<Self> {
        if policy.symlink_metadata().is_ok() {
            return Ok(Self { made_here: None });
        }
        let shown = policy.display();
        fs::write(
            policy,
            "#!/bin/sh\n# made by cargo xtask setup while it installs packages\nexit 101\n",
        )
        .with_context(|| format!("could not write {shown}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("could not make {shown} executable"))?;
        Ok(Self {
            made_here: Some(policy.to_owned()),
        })
    }
}

impl Drop for ServicesHeld {
    fn drop(&mut self) {
        if let Some(policy) = &self.made_here
            && let Err(err) = fs::remove_file(policy)
        {
            eprintln!(
                "setup: could not remove {}, which it made: {err}",
                policy.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_and_ubuntu_use_apt() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
                      VERSION_ID=\"12\"\nID=debian\n";
        assert_eq!(package_manager_of(debian), Some(PackageManager::Apt));
        let ubuntu = "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n";
        assert_eq!(package_manager_of(ubuntu), Some(PackageManager::Apt));
        let mint = "NAME=\"Linux Mint\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
        assert_eq!(package_manager_of(mint), Some(PackageManager::Apt));
    }

    #[test]
    fn fedora_and_its_family_use_dnf() {
        let fedora = "NAME=\"Fedora Linux\"\nID=fedora\nVERSION_ID=40\n";
        assert_eq!(package_manager_of(fedora), Some(PackageManager::Dnf));
        let rocky = "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n";
        assert_eq!(package_manager_of(rocky), Some(PackageManager::Dnf));
    }

    #[test]
    fn other_systems_have_no_package_manager_we_know() {
        assert_eq!(package_manager_of("NAME=\"Arch Linux\"\nID=arch\n"), None);
        assert_eq!(package_manager_of("ID=alpine\n"), None);
        assert_eq!(package_manager_of(""), None);
        // Only ID and ID_LIKE count, not a name that mentions a family.
        assert_eq!(package_manager_of("NAME=debian\nID=nixos\n"), None);
    }

    #[test]
    fn the_policy_file_is_removed_only_if_made_here() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xtask-policy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let policy = dir.join("policy-rc.d");

        let held = ServicesHeld::hold_at(&policy).unwrap();
        let script = fs::read_to_string(&policy).unwrap();
        assert!(script.starts_with("#!/bin/sh") && script.ends_with("exit 101\n"));
        assert_eq!(
            policy.metadata().unwrap().permissions().mode() & 0o777,
            0o755
        );
        drop(held);
        assert!(!policy.exists(), "made here, so removed");

        fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
        drop(ServicesHeld::hold_at(&policy).unwrap());
        assert!(policy.exists(), "not made here, so kept");
        fs::remove_dir_all(&dir).unwrap();
    }
}
