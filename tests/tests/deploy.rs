//! deploy/kubernetes: the manifests validate offline against the Kubernetes API's schemas
//! (kubernetes-validate, strict: unknown fields are errors), the validator rejects a planted
//! defect, and the pieces agree with each other, with the systemd unit's capability set and with
//! the mixin's job selector (things no schema checks: selectors, port names, probe paths).
//!
//! `cargo xtask test` installs kubernetes-validate (PyPI, pinned, in a venv of its own in
//! ~/.cache/connprobe) and passes its path in `CONNPROBE_KUBERNETES_VALIDATE`.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tests::verdict_lab::TempDir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn kubernetes() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn validator() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("CONNPROBE_KUBERNETES_VALIDATE").context(
        "CONNPROBE_KUBERNETES_VALIDATE is not set: run these tests through `cargo xtask test`, which installs kubernetes-validate and sets it",
    )?;
    Ok(PathBuf::from(path))
}

/// The manifests kubectl applies (everything but the kustomization itself).
fn manifests() -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(kubernetes())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    found.retain(|p| {
        p.extension().is_some_and(|e| e == "yaml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
    });
    found.sort();
    Ok(found)
}

/// `kubernetes-validate --strict FILES`: its output, and whether it passed.
fn validate(files: &[PathBuf]) -> anyhow::Result<(bool, String)> {
    let output = Command::new(validator()?)
        .arg("--strict")
        .args(files)
        .output()
        .context("cannot run kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() -> anyhow::Result<()> {
    let files = manifests()?;
    let (passed, text) = validate(&files)?;
    ensure!(passed, "kubernetes-validate failed:\n{text}");
    for kind in [
        "daemonset/connprobe",
        "service/connprobe",
        "namespace/connprobe",
    ] {
        ensure!(
            text.contains(&format!("passed for resource {kind}")),
            "kubernetes-validate did not check {kind}:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn the_validator_rejects_a_planted_defect() -> anyhow::Result<()> {
    let dir = TempDir::new("k8s-defect")?;
    let daemonset = std::fs::read_to_string(kubernetes().join("daemonset.yaml"))?;
    for (what, broken) in [
        (
            "a misspelt field",
            daemonset.replace("hostPID: true", "hostPid: true"),
        ),
        (
            "a wrong type",
            daemonset.replace("periodSeconds: 10", "periodSeconds: ten"),
        ),
    ] {
        ensure!(broken != daemonset, "the defect ({what}) was not planted");
        let file = dir.path().join("daemonset.yaml");
        std::fs::write(&file, broken)?;
        let (passed, text) = validate(&[file])?;
        ensure!(!passed, "kubernetes-validate accepted {what}:\n{text}");
    }
    Ok(())
}

/// Every document of a YAML file, as JSON, read with the PyYAML that kubernetes-validate's venv
/// holds (no YAML parser in the tests' dependencies).
fn yaml_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let python = validator()?
        .parent()
        .context("the validator's bin/")?
        .join("python");
    let output = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()?;
    if !output.status.success() {
        bail!(
            "cannot read {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn document(name: &str) -> anyhow::Result<Value> {
    let docs = yaml_documents(&kubernetes().join(name))?;
    ensure!(docs.len() == 1, "{name} should hold one document");
    Ok(docs.into_iter().next().expect("one"))
}

/// `labels` holds every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

#[test]
fn the_manifests_agree_with_each_other_and_with_the_unit() -> anyhow::Result<()> {
    let daemonset = document("daemonset.yaml")?;
    let service = document("service.yaml")?;
    let podmonitor = document("podmonitor.yaml")?;
    let kustomization = document("kustomization.yaml")?;
    let pod = &daemonset["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    ensure!(selects(
        &daemonset["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    ensure!(
        selects(&service["spec"]["selector"], pod_labels),
        "the Service selects no agent"
    );
    ensure!(
        podmonitor["kind"] == "PodMonitor"
            && podmonitor["apiVersion"] == "monitoring.coreos.com/v1"
    );
    ensure!(
        selects(&podmonitor["spec"]["selector"]["matchLabels"], pod_labels),
        "the PodMonitor selects no agent"
    );

    let containers = pod["spec"]["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1);
    let agent = &containers[0];
    let ports: BTreeSet<&str> = agent["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for endpoint in podmonitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .context("endpoints")?
    {
        let port = endpoint["port"].as_str().unwrap_or_default();
        ensure!(
            ports.contains(port),
            "the PodMonitor scrapes port {port:?}, which the agent has not"
        );
        ensure!(endpoint["path"] == "/metrics");
        // The mixin selects job="connprobe" and tells hosts apart by `instance`.
        let relabel = endpoint["relabelings"].as_array().context("relabelings")?;
        ensure!(
            relabel
                .iter()
                .any(|r| r["targetLabel"] == "job" && r["replacement"] == "connprobe")
        );
        ensure!(relabel.iter().any(|r| r["targetLabel"] == "instance"
            && r["sourceLabels"][0] == "__meta_kubernetes_pod_node_name"));
    }
    let target_port = service["spec"]["ports"][0]["targetPort"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        ports.contains(target_port),
        "the Service targets port {target_port:?}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        ensure!(
            agent[probe]["httpGet"]["path"] == "/healthz",
            "{probe} is not /healthz"
        );
        ensure!(ports.contains(agent[probe]["httpGet"]["port"].as_str().unwrap_or_default()));
    }
    let args: Vec<&str> = agent["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let port = agent["ports"][0]["containerPort"]
        .as_u64()
        .context("containerPort")?;
    ensure!(
        args.contains(&format!("--metrics-addr=0.0.0.0:{port}").as_str()),
        "the agent does not listen on the pod's address at port {port}: {args:?}"
    );

    // The same capabilities as the systemd unit (measured in probe-user/src/privileges.rs), and
    // nothing privileged.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/connprobe.service"))?;
    let unit_caps: BTreeSet<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit's CapabilityBoundingSet")?
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let security = &agent["securityContext"];
    let added: BTreeSet<String> = security["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    ensure!(
        added == unit_caps,
        "the DaemonSet adds {added:?}, the systemd unit allows {unit_caps:?}"
    );
    ensure!(security["capabilities"]["drop"] == serde_json::json!(["ALL"]));
    ensure!(security["privileged"] == false && security["allowPrivilegeEscalation"] == false);
    ensure!(security["readOnlyRootFilesystem"] == true);
    for limit in ["requests", "limits"] {
        ensure!(
            agent["resources"][limit]["memory"].is_string(),
            "no memory {limit}"
        );
    }
    ensure!(
        pod["spec"]["tolerations"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );

    // kubectl apply -k applies every manifest.
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let files: BTreeSet<String> = manifests()?
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    ensure!(
        files.iter().map(String::as_str).collect::<BTreeSet<_>>() == listed,
        "kustomization.yaml lists {listed:?}, the directory holds {files:?}"
    );
    Ok(())
}

/// The DaemonSet's container, as a command: `connprobe` with its arguments (the metrics address
/// moved to a free loopback port), as root with exactly its added capabilities in the bounding
/// set and `no_new_privs` (`allowPrivilegeEscalation: false`): what the runtime gives it.
#[test]
fn the_agent_serves_healthz_with_the_daemonsets_arguments_and_capabilities() -> anyhow::Result<()> {
    let daemonset = document("daemonset.yaml")?;
    let agent = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let caps: Vec<String> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("capabilities")?
        .iter()
        .filter_map(|c| c.as_str().map(|c| format!("+{}", c.to_lowercase())))
        .collect();
    let addr = tests::http::free_loopback_addr()?;
    let mut args: Vec<String> = agent["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    ensure!(args.first().map(String::as_str) == Some("run"), "{args:?}");
    args.remove(0);
    for arg in &mut args {
        if arg.starts_with("--metrics-addr=") {
            *arg = format!("--metrics-addr={addr}");
        }
    }
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let launch = tests::agent::Launch {
        json_log: None,
        metrics: false,
        args,
        wrapper: vec![
            "setpriv".into(),
            bounding,
            "--inh-caps=-all".into(),
            "--no-new-privs".into(),
            "--".into(),
        ],
        ..tests::agent::Launch::from_env(&[])?
    };
    let running = tests::Agent::launch(launch)?;
    // The readiness and liveness probe.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tests::http::http_get(addr, "/healthz") {
            Ok((200, _)) => break,
            other if std::time::Instant::now() > deadline => {
                bail!(
                    "/healthz did not answer 200 within 10 s: {other:?}; stderr:\n{}",
                    running.stderr_text()
                )
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    let (status, metrics) = tests::http::http_get(addr, "/metrics")?;
    ensure!(status == 200 && metrics.contains("connprobe_build_info"));
    Ok(())
}
