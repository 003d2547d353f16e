//! Which workload owns a socket: the owner's cgroup v2 id (taken by the programs in its
//! `connect()` or `listen()`) resolved to the cgroup's path, and the path to a container id and a
//! Kubernetes pod UID.
//!
//! The id is the inode number of the cgroup's directory in the cgroup v2 mount, so a path is found
//! by looking: first at the owner's `/proc/PID/cgroup` (one read and one `stat`, while the process
//! still lives), then by walking the hierarchy (bounded). Resolution happens as soon as the event
//! is read, since short-lived cgroups vanish; results, found or not, are cached with a bound.
//!
//! The container and pod come from the path's components, as the runtimes name them:
//!
//! | runtime | cgroup (systemd driver) | cgroup (cgroupfs driver) |
//! | --- | --- | --- |
//! | Docker | `docker-<id>.scope` | `/docker/<id>` |
//! | containerd (CRI) | `cri-containerd-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
//! | CRI-O | `crio-<id>.scope` | `/kubepods/<qos>/pod<uid>/crio-<id>` |
//! | podman | `libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |
//! | Kubernetes pod | `kubepods-<qos>-pod<uid with _>.slice` | `/kubepods/<qos>/pod<uid>/` |
//!
//! `<id>` is 64 hex digits. The runtimes' monitors (`crio-conmon-<id>.scope`,
//! `libpod-conmon-<id>.scope`) are not the container. The deepest match wins (a container nested
//! in another one names the inner).
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

/// The cgroup a socket's owner ran in, and the container and pod it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    /// The cgroup v2 path as `/proc/PID/cgroup` writes it (`/system.slice/nginx.service`).
    pub cgroup: String,
    /// The full container id (64 hex digits); `None` outside a container.
    pub container_id: Option<String>,
    /// The Kubernetes pod UID (with dashes); `None` outside Kubernetes.
    pub pod_uid: Option<String>,
}

/// The `container` metric label of a host process.
pub const HOST: &str = "host";
/// Characters of a container id in the `container` label (as `docker ps` shows it).
pub const SHORT_ID: usize = 12;

impl Workload {
    /// Reads the container and pod from a cgroup path.
    pub fn from_cgroup(path: &str) -> Self {
        let mut container_id = None;
        let mut pod_uid = None;
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (i, component) in components.iter().enumerate() {
            if let Some(id) = container_in(component, components.get(i.wrapping_sub(1))) {
                container_id = Some(id.to_owned());
            }
            if let Some(uid) = pod_in(component, &components[..i]) {
                pod_uid = Some(uid);
            }
        }
        Workload {
            cgroup: path.to_owned(),
            container_id,
            pod_uid,
        }
    }

    /// The `container` label: the short id, or [`HOST`].
    pub fn container_label(&self) -> ContainerLabel {
        match &self.container_id {
            Some(id) => ContainerLabel::from_id(id),
            None => ContainerLabel::host(),
        }
    }
}

/// A `container` label value without allocation: up to [`SHORT_ID`] ASCII bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContainerLabel {
    bytes: [u8; SHORT_ID],
    len: u8,
}

impl ContainerLabel {
    fn new(text: &str) -> Self {
        let len = text.len().min(SHORT_ID);
        let mut bytes = [0u8; SHORT_ID];
        bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
        ContainerLabel {
            bytes,
            len: len as u8,
        }
    }

    pub fn from_id(id: &str) -> Self {
        Self::new(id)
    }

    pub fn host() -> Self {
        Self::new(HOST)
    }

    pub fn as_str(&self) -> &str {
        // Built from ASCII only (hex digits or a constant).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id a path component names, given the component before it.
fn container_in<'a>(component: &'a str, parent: Option<&&str>) -> Option<&'a str> {
    let scope = component.strip_suffix(".scope").unwrap_or(component);
    for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-", "cri-o-"] {
        if let Some(id) = scope.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some(id);
        }
    }
    // cgroupfs driver: `/docker/<id>`, `/kubepods/.../pod<uid>/<id>`.
    let bare_parent =
        parent.is_some_and(|p| *p == "docker" || p.starts_with("pod") || p.starts_with("kubepods"));
    (bare_parent && is_container_id(component)).then_some(component)
}

/// The pod UID a path component names: `kubepods-<qos>-pod<uid>.slice` (systemd, with
/// underscores for dashes) or `pod<uid>` under a `kubepods` component (cgroupfs).
fn pod_in(component: &str, before: &[&str]) -> Option<String> {
    let uid = if let Some(slice) = component.strip_suffix(".slice") {
        if !slice.starts_with("kubepods") {
            return None;
        }
        slice.rsplit_once("-pod")?.1.replace('_', "-")
    } else {
        if !before.iter().any(|c| c.starts_with("kubepods")) {
            return None;
        }
        component.strip_prefix("pod")?.to_owned()
    };
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID with dashes (8-4-4-4-12 hex digits).
fn is_pod_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where cgroup v2 is mounted, from `/proc/mounts` text: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one. `None` when there is no cgroup v2 mount.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // Spaces in mount points are written as \040.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// The cgroup v2 path in a `/proc/PID/cgroup` text (its `0::` line).
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Cgroup ids to workloads, with a bounded cache.
pub struct Workloads {
    root: PathBuf,
    proc: PathBuf,
    cache: HashMap<u64, Option<Arc<Workload>>>,
    capacity: usize,
    last_walk: Option<Instant>,
    /// Every directory the last walk visited (at most [`WALK_LIMIT`]), by id: an id missed
    /// before the next walk is allowed is looked up here rather than given up on.
    last_walked: HashMap<u64, String>,
}

/// Cached ids (found or not) before the cache starts over.
pub const CACHE_CAPACITY: usize = 16_384;
/// Directories a walk of the hierarchy visits at most.
const WALK_LIMIT: usize = 100_000;
/// Deepest directory a walk descends to.
const WALK_DEPTH: usize = 32;
/// At most one walk of the hierarchy this often; an id missed in between is not cached.
const WALK_INTERVAL: Duration = Duration::from_millis(200);

impl Workloads {
    /// Resolves ids under the cgroup v2 mount `root`, with processes in `proc` (`/proc`).
    pub fn new(root: PathBuf, proc: PathBuf) -> Self {
        Workloads {
            root,
            proc,
            cache: HashMap::new(),
            capacity: CACHE_CAPACITY,
            last_walk: None,
            last_walked: HashMap::new(),
        }
    }

    /// Finds the cgroup v2 mount in `/proc/self/mounts`; `None` (and the reason) without one.
    pub fn for_this_host() -> Result<Self, String> {
        let mounts = fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("cannot read /proc/self/mounts ({e})"))?;
        let root = cgroup2_mount(&mounts).ok_or("no cgroup v2 hierarchy is mounted")?;
        Ok(Self::new(root, PathBuf::from("/proc")))
    }

    /// The cgroup v2 mount.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The workload of cgroup `id`, whose process `pid` (0 if unknown) may still be running.
    pub fn resolve(&mut self, id: u64, pid: u32) -> Option<Arc<Workload>> {
        if id == 0 {
            return None;
        }
        if let Some(known) = self.cache.get(&id) {
            return known.clone();
        }
        if let Some(path) = self.path_of_process(id, pid) {
            return self.remember(id, Some(Workload::from_cgroup(&path)));
        }
        if self
            .last_walk
            .is_some_and(|at| at.elapsed() < WALK_INTERVAL)
        {
            // Not cached when missed: a later walk may find a cgroup made since.
            let path = self.last_walked.get(&id)?.clone();
            return self.remember(id, Some(Workload::from_cgroup(&path)));
        }
        self.last_walk = Some(Instant::now());
        let mut walked = std::mem::take(&mut self.last_walked);
        walked.clear();
        self.walk(|dir_id, path| {
            walked.insert(dir_id, path.to_owned());
        });
        let found = walked.get(&id).cloned();
        self.last_walked = walked;
        self.remember(id, found.map(|p| Workload::from_cgroup(&p)))
    }

    fn remember(&mut self, id: u64, workload: Option<Workload>) -> Option<Arc<Workload>> {
        if self.cache.len() >= self.capacity {
            self.cache.clear();
        }
        let workload = workload.map(Arc::new);
        self.cache.insert(id, workload.clone());
        workload
    }

    /// The path in `/proc/PID/cgroup`, if its directory's inode is still `id` (the process may
    /// have moved since).
    fn path_of_process(&self, id: u64, pid: u32) -> Option<String> {
        if pid == 0 {
            return None;
        }
        let text = fs::read_to_string(self.proc.join(pid.to_string()).join("cgroup")).ok()?;
        let path = unified_path(&text)?.to_owned();
        let dir = self.root.join(path.trim_start_matches('/'));
        (fs::metadata(dir).ok()?.ino() == id).then_some(path)
    }

    /// Visits every cgroup directory (bounded in count and depth) with its id and path.
    fn walk(&self, mut visit: impl FnMut(u64, &str)) {
        let mut stack: Vec<(PathBuf, String, usize)> = vec![(self.root.clone(), "/".into(), 0)];
        let mut seen = 0;
        while let Some((dir, path, depth)) = stack.pop() {
            seen += 1;
            if seen > WALK_LIMIT {
                return;
            }
            if let Ok(meta) = fs::metadata(&dir) {
                visit(meta.ino(), &path);
            }
            if depth >= WALK_DEPTH {
                continue;
            }
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = match path.as_str() {
                        "/" => format!("/{name}"),
                        p => format!("{p}/{name}"),
                    };
                    stack.push((entry.path(), child, depth + 1));
                }
            }
        }
    }
}

/// The cgroup id of process `pid` in `proc` (`/proc`) under the cgroup v2 mount `root`, 0 if
/// unknown: for listeners found in /proc at start-up, whose `listen()` the programs did not see.
pub fn process_cgroup_id(root: &Path, proc: &Path, pid: u32) -> u64 {
    let path = fs::read_to_string(proc.join(pid.to_string()).join("cgroup"))
        .ok()
        .and_then(|t| unified_path(&t).map(str::to_owned));
    path.and_then(|p| fs::metadata(root.join(p.trim_start_matches('/'))).ok())
        .map_or(0, |m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1a2b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const UID: &str = "5a1c3e7b-2f4d-4b8a-9c6e-1d2f3a4b5c6d";

    fn parsed(path: &str) -> (Option<String>, Option<String>) {
        let w = Workload::from_cgroup(path);
        assert_eq!(w.cgroup, path);
        (w.container_id, w.pod_uid)
    }

    #[test]
    fn docker_systemd_and_cgroupfs() {
        assert_eq!(
            parsed(&format!("/system.slice/docker-{ID}.scope")),
            (Some(ID.into()), None)
        );
        assert_eq!(parsed(&format!("/docker/{ID}")), (Some(ID.into()), None));
    }

    #[test]
    fn containerd_pod_systemd() {
        let uid = UID.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(parsed(&path), (Some(ID.into()), Some(UID.into())));
        let guaranteed =
            format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parsed(&guaranteed), (Some(ID.into()), Some(UID.into())));
    }

    #[test]
    fn kubepods_cgroupfs() {
        assert_eq!(
            parsed(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            (Some(ID.into()), Some(UID.into()))
        );
        assert_eq!(
            parsed(&format!("/kubepods/pod{UID}/{ID}")),
            (Some(ID.into()), Some(UID.into()))
        );
        // The pod's own cgroup (its pause process lives below it): a pod, no container.
        assert_eq!(
            parsed(&format!("/kubepods/besteffort/pod{UID}")),
            (None, Some(UID.into()))
        );
    }

    #[test]
    fn crio_and_podman_but_not_their_monitors() {
        let uid = UID.replace('-', "_");
        let crio = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/crio-{ID}.scope"
        );
        assert_eq!(parsed(&crio), (Some(ID.into()), Some(UID.into())));
        let conmon = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/crio-conmon-{ID}.scope"
        );
        assert_eq!(parsed(&conmon), (None, Some(UID.into())));
        assert_eq!(
            parsed(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
            )),
            (Some(ID.into()), None)
        );
        assert_eq!(
            parsed(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            (None, None)
        );
        assert_eq!(
            parsed(&format!("/libpod_parent/libpod-{ID}")),
            (Some(ID.into()), None)
        );
    }

    #[test]
    fn systemd_inside_a_container_and_nested_containers() {
        let inner = "a".repeat(64);
        assert_eq!(
            parsed(&format!("/system.slice/docker-{ID}.scope/init.scope")),
            (Some(ID.into()), None)
        );
        assert_eq!(
            parsed(&format!("/docker/{ID}/docker/{inner}")),
            (Some(inner), None)
        );
    }

    #[test]
    fn host_services_and_lookalikes_are_no_container() {
        for path in [
            "/",
            "/system.slice/nginx.service",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/docker.service",
            "/system.slice/docker-short.scope",
            &format!("/system.slice/docker-{}.scope", "g".repeat(64)),
            &format!("/other/{ID}"),
            "/kubepods.slice/kubepods-podnot_a_uid.slice",
            &format!("/pods/pod{UID}"),
        ] {
            assert_eq!(parsed(path), (None, None), "{path}");
        }
    }

    #[test]
    fn labels_are_the_short_id_or_host() {
        let w = Workload::from_cgroup(&format!("/docker/{ID}"));
        assert_eq!(w.container_label().as_str(), &ID[..SHORT_ID]);
        let host = Workload::from_cgroup("/system.slice/sshd.service");
        assert_eq!(host.container_label().as_str(), HOST);
    }

    #[test]
    fn the_cgroup2_mount_is_read_from_proc_mounts() {
        let hybrid = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            cgroup2_mount("none /my\\040cg cgroup2 rw 0 0"),
            Some("/my cg".into())
        );
    }

    #[test]
    fn proc_cgroup_gives_the_unified_path() {
        let hybrid = "12:memory:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/user.slice/session-1.scope\n";
        assert_eq!(unified_path(hybrid), Some("/user.slice/session-1.scope"));
        assert_eq!(unified_path("3:cpu:/\n"), None);
    }

    /// A directory tree stands in for the hierarchy: ids are its directories' inodes.
    #[test]
    fn ids_resolve_by_walking_and_are_cached_with_a_bound() {
        let dir = std::env::temp_dir().join(format!("connprobe-workload-{}", std::process::id()));
        let leaf = dir.join(format!("system.slice/docker-{ID}.scope"));
        fs::create_dir_all(&leaf).unwrap();
        let id = fs::metadata(&leaf).unwrap().ino();
        let mut workloads = Workloads::new(dir.clone(), dir.join("no-proc"));
        let found = workloads.resolve(id, 0).unwrap();
        assert_eq!(found.cgroup, format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(found.container_id.as_deref(), Some(ID));
        // Cached: found again after the directory is gone.
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(workloads.resolve(id, 0), Some(found));
        assert_eq!(workloads.resolve(0, 0), None);
        workloads.capacity = 1;
        workloads.last_walk = None;
        assert_eq!(workloads.resolve(id + 1, 0), None);
        assert_eq!(workloads.cached(), 1, "the cache started over at its bound");
    }
}
