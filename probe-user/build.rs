//! Builds the eBPF programs (probe-ebpf, for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker) and leaves the object in OUT_DIR, where `loader.rs` embeds it.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // AYA_BUILD_SKIP=1 (used for clippy, which would otherwise build the eBPF object once more
    // under its own fingerprint) leaves an empty object so that the crate still compiles; a
    // binary built that way cannot load its programs and says so.
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        let object = out.join("probe-ebpf");
        if !object.exists() {
            std::fs::write(&object, b"").context("cannot write the placeholder eBPF object")?;
        }
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata failed")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "probe-ebpf")
        .ok_or_else(|| anyhow!("the probe-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
