//! The simulated kubelet: takes each pod the Job controller creates through
//! Pending → Running → Succeeded/Failed, running the container's command locally (or
//! following a [`PodScript`]), captures its output as the pod log, and carries out
//! graceful deletion.
//!
//! One task ("runner") per pod. A runner ends when its pod is gone from the store; an
//! event loop ([`run_events`]) tells runners when their pod starts terminating or is
//! removed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustix::process::{Pid, Signal, kill_process_group};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::meta;
use crate::pod_log::ContainerLog;
use crate::script::{PodScript, Scripts};
use crate::shared::Shared;
use crate::store::{EventType, Kind};

/// The simulated node every pod lands on.
pub(crate) const NODE_NAME: &str = "kube-sim-node";
/// `PATH` given to containers whose env does not set one (what most images set).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type Key = (String, String);

#[derive(Clone)]
struct Runner {
    /// Fired when the pod starts terminating (or is removed, or the sim stops).
    terminate: CancellationToken,
    /// Set when the pod object is gone from the store.
    gone: Arc<AtomicBool>,
}

/// Pod runners, their logs, and the registered scripts.
#[derive(Default)]
pub(crate) struct Kubelet {
    pub(crate) scripts: Scripts,
    logs: Mutex<HashMap<Key, Arc<ContainerLog>>>,
    runners: Mutex<HashMap<Key, Runner>>,
    /// Process groups of running containers, killed when the sim is dropped.
    process_groups: Mutex<HashSet<u32>>,
    /// Running containers that `pods/exec` can run commands in.
    exec_targets: Mutex<HashMap<Key, ExecTarget>>,
}

/// Where `pods/exec` runs a command and what `pods/attach` attaches to: the
/// running container's env, working dir, volume paths and its own stdin and
/// output. `ended` fires when the container stops; exec'd processes die with
/// it, as they do in a real container, and attaches end.
#[derive(Debug, Clone)]
pub(crate) struct ExecTarget {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: PathBuf,
    pub(crate) paths: PathMap,
    pub(crate) ended: CancellationToken,
    /// The container's spec name (`pods/attach` checks `container=`).
    pub(crate) container: String,
    pub(crate) io: ContainerIo,
}

/// The write end of a container's stdin pipe, shared by its attaches. `None`
/// inside once closed (`stdinOnce`). A writer holds the lock for one whole
/// frame (one `write_all`), so frames of concurrent attaches never
/// interleave.
pub(crate) type ContainerStdin = Arc<tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>>;

/// How many output chunks (of up to 8 KiB) an attach may fall behind the
/// container by before it loses output.
const ATTACH_BACKLOG: usize = 256;

/// A container's own stdin and output, for `pods/attach`.
#[derive(Debug, Clone)]
pub(crate) struct ContainerIo {
    /// The container's stdin when its spec says `stdin: true` (it gets
    /// `/dev/null` otherwise). The kubelet keeps the write end for the
    /// container's whole life, so detaching never closes the container's
    /// stdin (`stdinOnce: false`, the default).
    pub(crate) stdin: Option<ContainerStdin>,
    /// `stdinOnce: true`: the first attach whose stdin ends closes it, and it
    /// stays closed for this run of the container.
    pub(crate) stdin_once: bool,
    /// The output pump's broadcast, weak so that the pump's end (the
    /// container and everything it started closed the output) closes it.
    output: broadcast::WeakSender<Bytes>,
}

impl ContainerIo {
    /// The container's output (stdout and stderr: one stream, as the runtime
    /// keeps one log) from now on, nothing written before. `None` once the
    /// container has closed its output. A receiver that falls more than
    /// [`ATTACH_BACKLOG`] chunks behind loses the oldest (`Lagged`): a slow
    /// attach never holds up the container or its log.
    pub(crate) fn subscribe(&self) -> Option<broadcast::Receiver<Bytes>> {
        self.output.upgrade().map(|s| s.subscribe())
    }
}

impl Kubelet {
    /// Kills every running container at once (synchronously: used from `Drop`, when
    /// the runtime may not poll the runners again).
    pub(crate) fn kill_all(&self) {
        let groups: Vec<u32> = lock(&self.process_groups).drain().collect();
        for pgid in groups {
            signal_group(pgid, Signal::KILL);
        }
    }

    /// The running container of a pod, for `pods/exec`.
    pub(crate) fn exec_target(&self, ns: &str, name: &str) -> Option<ExecTarget> {
        lock(&self.exec_targets)
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Tracks an exec'd process group so that dropping the sim kills it.
    pub(crate) fn track_group(&self, pgid: u32, running: bool) {
        if running {
            lock(&self.process_groups).insert(pgid);
        } else {
            lock(&self.process_groups).remove(&pgid);
        }
    }

    /// The container log of a pod, while the pod exists.
    pub(crate) fn log(&self, ns: &str, name: &str) -> Option<Arc<ContainerLog>> {
        lock(&self.logs)
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the runner of a newly created pod.
pub(crate) fn start(shared: &Arc<Shared>, pod: &Value) {
    let key = (meta::namespace(pod).to_owned(), meta::name(pod).to_owned());
    let runner = Runner {
        terminate: shared.shutdown.child_token(),
        gone: Arc::new(AtomicBool::new(false)),
    };
    let log = Arc::new(ContainerLog::default());
    lock(&shared.kubelet.logs).insert(key.clone(), log.clone());
    lock(&shared.kubelet.runners).insert(key, runner.clone());
    tokio::spawn(run_pod(shared.clone(), pod.clone(), runner, log));
}

/// Relays deletions from the store to the runners, and drops logs of removed pods.
pub(crate) async fn run_events(shared: Arc<Shared>) {
    let mut rx = shared.store.subscribe();
    loop {
        let event = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            e = rx.recv() => e,
        };
        match event {
            Ok(ev) if ev.kind == Kind::Pod => {
                let key = (
                    meta::namespace(&ev.object).to_owned(),
                    meta::name(&ev.object).to_owned(),
                );
                match ev.ty {
                    EventType::Deleted => pod_gone(&shared, &key),
                    _ if meta::is_deleting(&ev.object) => {
                        if let Some(r) = lock(&shared.kubelet.runners).get(&key) {
                            r.terminate.cancel();
                        }
                    }
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => {
                // Missed events: compare every runner with the store.
                let keys: Vec<Key> = lock(&shared.kubelet.runners).keys().cloned().collect();
                for key in keys {
                    match shared.store.get(Kind::Pod, &key.0, &key.1) {
                        None => pod_gone(&shared, &key),
                        Some(p) if meta::is_deleting(&p) => {
                            if let Some(r) = lock(&shared.kubelet.runners).get(&key) {
                                r.terminate.cancel();
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn pod_gone(shared: &Shared, key: &Key) {
    if let Some(r) = lock(&shared.kubelet.runners).remove(key) {
        r.gone.store(true, Ordering::SeqCst);
        r.terminate.cancel();
    }
    lock(&shared.kubelet.logs).remove(key);
}

/// Context of one pod's runner.
struct PodCtx {
    shared: Arc<Shared>,
    ns: String,
    name: String,
    container: String,
    image: String,
    container_id: String,
    restart_count: u32,
    last_state: Value,
}

impl PodCtx {
    /// Writes to the pod; a pod that is gone is ignored.
    fn update(&self, f: impl FnOnce(&mut Value)) {
        let _ = self
            .shared
            .store
            .update(Kind::Pod, &self.ns, &self.name, |p| {
                f(p);
                Ok(())
            });
    }

    fn container_status(&self, state: Value, ready: bool, started: bool) -> Value {
        json!([{
            "name": self.container,
            "image": self.image,
            "imageID": format!("{}@sha256:{}", self.image, "0".repeat(64)),
            "containerID": format!("kube-sim://{}", self.container_id),
            "ready": ready,
            "started": started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state,
        }])
    }

    fn set_waiting(&self, reason: &str, message: &str) {
        let mut waiting = json!({"reason": reason});
        if !message.is_empty() {
            waiting["message"] = json!(message);
        }
        let statuses = self.container_status(json!({"waiting": waiting}), false, false);
        self.update(|p| {
            p["status"]["containerStatuses"] = statuses;
            meta::set_condition(
                p,
                "Ready",
                "False",
                "ContainersNotReady",
                "containers with unready status",
            );
            meta::set_condition(
                p,
                "ContainersReady",
                "False",
                "ContainersNotReady",
                "containers with unready status",
            );
        });
    }
}

/// How a container instance ended.
struct Ended {
    exit_code: i32,
    reason: &'static str,
    message: Option<String>,
    started_at: String,
    disruption: Option<Disruption>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Disruption {
    Evicted,
    NodeLost,
}

impl Ended {
    fn exited(exit_code: i32, started_at: &str) -> Self {
        Self {
            exit_code,
            reason: if exit_code == 0 { "Completed" } else { "Error" },
            message: None,
            started_at: started_at.to_owned(),
            disruption: None,
        }
    }
}

async fn run_pod(shared: Arc<Shared>, pod: Value, runner: Runner, log: Arc<ContainerLog>) {
    let container = pod
        .pointer("/spec/containers/0")
        .cloned()
        .unwrap_or_default();
    let mut ctx = PodCtx {
        shared: shared.clone(),
        ns: meta::namespace(&pod).to_owned(),
        name: meta::name(&pod).to_owned(),
        container: container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        image: container
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        container_id: uuid::Uuid::new_v4().simple().to_string(),
        restart_count: 0,
        last_state: json!({}),
    };
    let script = shared.kubelet.scripts.resolve(&pod);
    // The pod's root holds its emptyDir volumes and termination-message file; it lives
    // as long as the runner, i.e. until the pod is gone.
    let root = tempfile::Builder::new()
        .prefix("kube-sim-pod-")
        .tempdir()
        .ok();
    lifecycle(
        &mut ctx,
        &pod,
        &script,
        &runner.terminate,
        &log,
        root.as_ref().map(|r| r.path()),
    )
    .await;
    log.finish();
    runner.terminate.cancelled().await;
    if runner.gone.load(Ordering::SeqCst) || shared.shutdown.is_cancelled() {
        return;
    }
    // Graceful deletion finished: fail whatever had not ended, then let the store drop
    // the pod (once the Job controller has removed its finalizer).
    let statuses_if_running = ctx.container_status(
        json!({"terminated": {
            "exitCode": 137, "reason": "Error", "finishedAt": meta::now(),
        }}),
        false,
        false,
    );
    ctx.update(|p| {
        let phase = p["status"]["phase"].as_str().unwrap_or("");
        if phase != "Succeeded" && phase != "Failed" {
            let was_running = p
                .pointer("/status/containerStatuses/0/state/running")
                .is_some();
            p["status"]["phase"] = json!("Failed");
            if was_running {
                p["status"]["containerStatuses"] = statuses_if_running;
            }
            meta::set_condition(p, "Ready", "False", "PodFailed", "");
        }
        meta::metadata_mut(p).insert("deletionGracePeriodSeconds".into(), json!(0));
    });
}

/// Runs the pod to a terminal phase (or until interrupted).
async fn lifecycle(
    ctx: &mut PodCtx,
    pod: &Value,
    script: &PodScript,
    interrupt: &CancellationToken,
    log: &Arc<ContainerLog>,
    root: Option<&Path>,
) {
    let opts = ctx.shared.options.clone();
    if *script == PodScript::NeverSchedule {
        ctx.update(|p| {
            p["status"]["phase"] = json!("Pending");
            meta::set_condition(
                p,
                "PodScheduled",
                "False",
                "Unschedulable",
                "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are \
                 available: 1 No preemption victims found for incoming pod.",
            );
        });
        return;
    }
    let now = meta::now();
    ctx.update(|p| {
        p["spec"]["nodeName"] = json!(NODE_NAME);
        p["status"]["phase"] = json!("Pending");
        p["status"]["hostIP"] = json!("10.0.0.1");
        p["status"]["startTime"] = json!(now);
        meta::set_condition(p, "PodScheduled", "True", "", "");
        meta::set_condition(p, "Initialized", "True", "", "");
        meta::set_condition(p, "PodReadyToStartContainers", "False", "", "");
    });
    ctx.set_waiting("ContainerCreating", "");
    if sleep_or(interrupt, opts.pod_start_delay).await {
        return;
    }
    if *script == PodScript::ImagePullBackOff {
        let image = ctx.image.clone();
        ctx.set_waiting(
            "ErrImagePull",
            &format!("failed to pull and unpack image \"{image}\": not found (kube-sim)"),
        );
        if sleep_or(interrupt, opts.pod_start_delay).await {
            return;
        }
        ctx.set_waiting(
            "ImagePullBackOff",
            &format!("Back-off pulling image \"{image}\""),
        );
        return;
    }
    let on_failure =
        pod.pointer("/spec/restartPolicy").and_then(Value::as_str) == Some("OnFailure");
    loop {
        let started_at = meta::now();
        let running =
            ctx.container_status(json!({"running": {"startedAt": started_at}}), true, true);
        let pod_ip = format!("10.244.0.{}", rand::random_range(2..250));
        ctx.update(|p| {
            p["status"]["phase"] = json!("Running");
            p["status"]["podIP"] = json!(pod_ip);
            p["status"]["podIPs"] = json!([{"ip": pod_ip}]);
            p["status"]["containerStatuses"] = running;
            meta::set_condition(p, "PodReadyToStartContainers", "True", "", "");
            meta::set_condition(p, "ContainersReady", "True", "", "");
            meta::set_condition(p, "Ready", "True", "", "");
        });
        let ended = match script {
            PodScript::Instant { exit_code } => Ended::exited(*exit_code, &started_at),
            PodScript::OomKill => {
                if sleep_or(interrupt, opts.pod_start_delay).await {
                    Ended::exited(137, &started_at)
                } else {
                    Ended {
                        reason: "OOMKilled",
                        ..Ended::exited(137, &started_at)
                    }
                }
            }
            PodScript::Hang => {
                interrupt.cancelled().await;
                Ended::exited(137, &started_at)
            }
            PodScript::Evict { after } => {
                run_process(
                    ctx,
                    pod,
                    interrupt,
                    Some((*after, Disruption::Evicted)),
                    log,
                    root,
                    &started_at,
                )
                .await
            }
            PodScript::NodeLost { after } => {
                run_process(
                    ctx,
                    pod,
                    interrupt,
                    Some((*after, Disruption::NodeLost)),
                    log,
                    root,
                    &started_at,
                )
                .await
            }
            _ => run_process(ctx, pod, interrupt, None, log, root, &started_at).await,
        };
        let terminated = json!({
            "exitCode": ended.exit_code,
            "reason": ended.reason,
            "startedAt": ended.started_at,
            "finishedAt": meta::now(),
            "containerID": format!("kube-sim://{}", ctx.container_id),
        });
        let mut terminated = terminated;
        if let Some(m) = &ended.message {
            terminated["message"] = json!(m);
        }
        if on_failure
            && ended.exit_code != 0
            && ended.disruption.is_none()
            && !interrupt.is_cancelled()
        {
            // restartPolicy OnFailure: the kubelet restarts the container in place.
            ctx.restart_count += 1;
            ctx.last_state = json!({"terminated": terminated});
            ctx.container_id = uuid::Uuid::new_v4().simple().to_string();
            ctx.set_waiting(
                "CrashLoopBackOff",
                &format!(
                    "back-off restarting failed container {} in pod {}",
                    ctx.container, ctx.name
                ),
            );
            log.restart();
            if sleep_or(interrupt, opts.pod_start_delay).await {
                return;
            }
            continue;
        }
        let statuses = ctx.container_status(json!({"terminated": terminated}), false, false);
        let pod_name = ctx.name.clone();
        ctx.update(|p| {
            p["status"]["containerStatuses"] = statuses;
            let phase = if ended.exit_code == 0 && ended.disruption.is_none() {
                "Succeeded"
            } else {
                "Failed"
            };
            p["status"]["phase"] = json!(phase);
            let ready_reason = if phase == "Succeeded" { "PodCompleted" } else { "PodFailed" };
            meta::set_condition(p, "Ready", "False", ready_reason, "");
            meta::set_condition(p, "ContainersReady", "False", ready_reason, "");
            meta::set_condition(p, "PodReadyToStartContainers", "False", "", "");
            match ended.disruption {
                Some(Disruption::Evicted) => {
                    let msg = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 20Mi. ";
                    p["status"]["reason"] = json!("Evicted");
                    p["status"]["message"] = json!(msg);
                    meta::set_condition(p, "DisruptionTarget", "True", "TerminationByKubelet", msg);
                }
                Some(Disruption::NodeLost) => {
                    p["status"]["reason"] = json!("NodeLost");
                    p["status"]["message"] = json!(format!(
                        "Node {NODE_NAME} which was running pod {pod_name} is unresponsive"
                    ));
                    p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] =
                        json!("ContainerStatusUnknown");
                    p["status"]["containerStatuses"][0]["state"]["terminated"]["message"] =
                        json!("The container could not be located when the pod was terminated");
                    meta::set_condition(
                        p,
                        "DisruptionTarget",
                        "True",
                        "DeletionByTaintManager",
                        "Taint manager: deleting due to NoExecute taint",
                    );
                    // The node lifecycle controller deletes the pod; with the node gone
                    // nothing waits for a grace period.
                    let md = meta::metadata_mut(p);
                    md.insert("deletionTimestamp".into(), json!(meta::now()));
                    md.insert("deletionGracePeriodSeconds".into(), json!(0));
                }
                None => {}
            }
        });
        return;
    }
}

/// Sleeps, or returns `true` early when interrupted.
async fn sleep_or(interrupt: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = interrupt.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// The container command, env and paths, mapped onto the host.
#[derive(Debug)]
struct Prepared {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    termination_file: PathBuf,
    fallback_to_logs: bool,
    paths: PathMap,
    /// `emptyDir` volumes with `medium: Memory`, on tmpfs: removed when the
    /// container's run ends.
    _memory: Vec<tempfile::TempDir>,
}

/// Where `emptyDir` volumes with `medium: Memory` live: tmpfs, as a real
/// kubelet mounts them (other volumes are dirs under the pod's temp root).
const MEMORY_VOLUMES: &str = "/dev/shm";

/// Whether the pod's volume `name` is an `emptyDir` with `medium: Memory`.
fn memory_volume(pod: &Value, name: &str) -> bool {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|v| v.pointer("/emptyDir/medium"))
        .and_then(Value::as_str)
        == Some("Memory")
}

/// Maps container paths (volume mounts, the termination-message path) to host paths.
#[derive(Debug, Clone)]
pub(crate) struct PathMap(Vec<(String, PathBuf)>);

impl PathMap {
    /// Rewrites `value` when it equals a container path or starts with one plus `/`.
    pub(crate) fn remap(&self, value: &str) -> String {
        for (container, host) in &self.0 {
            let c = container.trim_end_matches('/');
            if value == c || value == container {
                return host.to_string_lossy().into_owned();
            }
            if let Some(rest) = value.strip_prefix(c).filter(|r| r.starts_with('/')) {
                return format!("{}{rest}", host.to_string_lossy());
            }
        }
        value.to_owned()
    }
}

fn prepare(pod: &Value, root: &Path) -> Result<Prepared, String> {
    let c = pod
        .pointer("/spec/containers/0")
        .ok_or("pod has no containers")?;
    let io = |e: std::io::Error| format!("kube-sim could not prepare the container: {e}");
    // emptyDir volumes (and, in the fake, every other volume type) are host temp dirs.
    let mut paths = Vec::new();
    let mut memory: Vec<(String, tempfile::TempDir)> = Vec::new();
    if let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) {
        for m in mounts {
            let vol = m.get("name").and_then(Value::as_str).unwrap_or("vol");
            let mount_path = m.get("mountPath").and_then(Value::as_str).unwrap_or("");
            let mut host = root.join("volumes").join(vol);
            if memory_volume(pod, vol) && Path::new(MEMORY_VOLUMES).is_dir() {
                if let Some((_, dir)) = memory.iter().find(|(name, _)| name == vol) {
                    host = dir.path().to_path_buf();
                } else {
                    let dir = tempfile::Builder::new()
                        .prefix("kube-sim-memory-")
                        .tempdir_in(MEMORY_VOLUMES)
                        .map_err(io)?;
                    host = dir.path().to_path_buf();
                    memory.push((vol.to_owned(), dir));
                }
            }
            if let Some(sub) = m
                .get("subPath")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                host = host.join(sub);
            }
            std::fs::create_dir_all(&host).map_err(io)?;
            paths.push((mount_path.to_owned(), host));
        }
    }
    let tm_path = c
        .get("terminationMessagePath")
        .and_then(Value::as_str)
        .unwrap_or("/dev/termination-log");
    let termination_file = root.join("termination-log");
    std::fs::write(&termination_file, b"").map_err(io)?;
    paths.push((tm_path.to_owned(), termination_file.clone()));
    // Longest container path first, so nested mounts win.
    paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let map = PathMap(paths);

    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(list) = c.get("env").and_then(Value::as_array) {
        for e in list {
            let Some(name) = e.get("name").and_then(Value::as_str) else {
                continue;
            };
            let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
                expand(v, &env)
            } else if let Some(path) = e
                .pointer("/valueFrom/fieldRef/fieldPath")
                .and_then(Value::as_str)
            {
                field_ref(pod, path)
            } else if e.get("value").is_none() && e.get("valueFrom").is_none() {
                String::new()
            } else {
                // secretKeyRef / configMapKeyRef / resourceFieldRef: not backed by anything.
                continue;
            };
            let value = map.remap(&value);
            env.retain(|(k, _)| k != name);
            env.push((name.to_owned(), value));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".into(), meta::name(pod).to_owned()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        let home = root.join("home");
        std::fs::create_dir_all(&home).map_err(io)?;
        env.push(("HOME".into(), home.to_string_lossy().into_owned()));
    }

    let strings = |key: &str| -> Vec<String> {
        c.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|s| map.remap(&expand(s, &env)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings("command");
    argv.extend(strings("args"));
    if argv.is_empty() {
        return Err(
            "kube-sim runs the container's command locally and this container has no \
             command or args (the image's entrypoint is unknown to the fake)"
                .into(),
        );
    }
    let cwd = match c
        .get("workingDir")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(wd) => PathBuf::from(map.remap(wd)),
        None => root.to_path_buf(),
    };
    Ok(Prepared {
        argv,
        env,
        cwd,
        termination_file,
        fallback_to_logs: c.get("terminationMessagePolicy").and_then(Value::as_str)
            == Some("FallbackToLogsOnError"),
        paths: map,
        _memory: memory.into_iter().map(|(_, dir)| dir).collect(),
    })
}

/// Kubernetes `$(VAR)` expansion: defined variables are substituted, `$$` escapes `$`,
/// undefined references stay as written.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `valueFrom.fieldRef` for the fields the downward API offers.
fn field_ref(pod: &Value, path: &str) -> String {
    let str_at = |p: &str| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['").or_else(|| r.strip_prefix("[\"")))
            .and_then(|r| r.strip_suffix("']").or_else(|| r.strip_suffix("\"]")))
            .map(str::to_owned)
    };
    if let Some(k) = map_key("metadata.labels") {
        return pod
            .pointer("/metadata/labels")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
    }
    if let Some(k) = map_key("metadata.annotations") {
        return pod
            .pointer("/metadata/annotations")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
    }
    match path {
        "metadata.name" => str_at("/metadata/name"),
        "metadata.namespace" => str_at("/metadata/namespace"),
        "metadata.uid" => str_at("/metadata/uid"),
        "spec.nodeName" => NODE_NAME.to_owned(),
        "spec.serviceAccountName" => {
            let sa = str_at("/spec/serviceAccountName");
            if sa.is_empty() {
                "default".to_owned()
            } else {
                sa
            }
        }
        "status.hostIP" => "10.0.0.1".to_owned(),
        "status.podIP" => str_at("/status/podIP"),
        _ => String::new(),
    }
}

/// Sends `signal` to the process group `pgid` (the container's processes),
/// with a system call: starting the `kill` program for it cost a process
/// per container end and per exec cut short.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    // Group 0 would be our own, 1 is init's; a group that is gone already is
    // not an error here.
    if let Some(pgid) = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .and_then(Pid::from_raw)
    {
        let _ = kill_process_group(pgid, signal);
    }
}

/// Copies the container's output into its log and to its attaches.
async fn pump(
    mut reader: impl AsyncRead + Unpin,
    log: Arc<ContainerLog>,
    output: broadcast::Sender<Bytes>,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                log.append(&buf[..n]);
                // With no attach (the usual case, and the benchmarks' hot
                // path) this is one uncontended lock: no copy, no send.
                if output.receiver_count() > 0 {
                    let _ = output.send(Bytes::copy_from_slice(&buf[..n]));
                }
            }
        }
    }
}

/// Runs the container command to its end, a deletion, or a scripted disruption.
async fn run_process(
    ctx: &PodCtx,
    pod: &Value,
    interrupt: &CancellationToken,
    disrupt: Option<(Duration, Disruption)>,
    log: &Arc<ContainerLog>,
    root: Option<&Path>,
    started_at: &str,
) -> Ended {
    let start_error = |message: String| Ended {
        exit_code: 128,
        reason: "StartError",
        message: Some(message),
        started_at: started_at.to_owned(),
        disruption: None,
    };
    let Some(root) = root else {
        return start_error("kube-sim could not create the pod's temp dir".into());
    };
    let prepared = match prepare(pod, root) {
        Ok(p) => p,
        Err(m) => {
            log.append(m.as_bytes());
            return start_error(m);
        }
    };
    // One pipe for stdout and stderr, as a container runtime keeps one log:
    // the lines keep the order they were written in, and the process holds
    // one descriptor per container, not two (every spawn copies the table).
    let output = std::io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w)));
    let (reader, out, err) = match output {
        Ok(p) => p,
        Err(e) => return start_error(format!("kube-sim could not create the log pipe: {e}")),
    };
    // `stdin: true`: a pipe whose write end the kubelet keeps for attaches.
    let spec = pod.pointer("/spec/containers/0");
    let flag = |key: &str| {
        spec.and_then(|c| c.get(key))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let (stdin_reader, stdin_writer) = if flag("stdin") {
        match std::io::pipe() {
            Ok((r, w)) => (Stdio::from(r), Some(w)),
            Err(e) => {
                return start_error(format!("kube-sim could not create the stdin pipe: {e}"));
            }
        }
    } else {
        (Stdio::null(), None)
    };
    let mut cmd = tokio::process::Command::new(&prepared.argv[0]);
    cmd.args(&prepared.argv[1..])
        .env_clear()
        .envs(prepared.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&prepared.cwd)
        .stdin(stdin_reader)
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let spawned = cmd.spawn();
    // The writing ends are the container's alone now: its exit ends the log.
    // So is stdin's reading end: a write after the container is gone fails.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let m = format!(
                "failed to create containerd task: exec: {:?}: {e}",
                prepared.argv[0]
            );
            log.append(m.as_bytes());
            return start_error(m);
        }
    };
    let pid = child.id().unwrap_or(0);
    lock(&ctx.shared.kubelet.process_groups).insert(pid);
    let exec_key = (ctx.ns.clone(), ctx.name.clone());
    let exec_ended = interrupt.child_token();
    let stdin = stdin_writer
        .and_then(|w| tokio::net::unix::pipe::Sender::from_owned_fd(w.into()).ok())
        .map(|w| Arc::new(tokio::sync::Mutex::new(Some(w))));
    let (output, _) = broadcast::channel(ATTACH_BACKLOG);
    lock(&ctx.shared.kubelet.exec_targets).insert(
        exec_key.clone(),
        ExecTarget {
            env: prepared.env.clone(),
            cwd: prepared.cwd.clone(),
            paths: prepared.paths.clone(),
            ended: exec_ended.clone(),
            container: ctx.container.clone(),
            io: ContainerIo {
                stdin,
                stdin_once: flag("stdinOnce"),
                output: output.downgrade(),
            },
        },
    );
    let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(reader.into())
        .ok()
        .map(|r| tokio::spawn(pump(r, log.clone(), output)));
    let grace = || {
        let secs = ctx
            .shared
            .store
            .get(Kind::Pod, &ctx.ns, &ctx.name)
            .and_then(|p| {
                p.pointer("/metadata/deletionGracePeriodSeconds")
                    .or_else(|| p.pointer("/spec/terminationGracePeriodSeconds"))
                    .and_then(Value::as_u64)
            })
            .unwrap_or(30);
        Duration::from_secs(secs).min(ctx.shared.options.max_termination_grace)
    };
    let disrupt_sleep = async {
        match disrupt {
            Some((after, _)) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    let mut disruption = None;
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        () = interrupt.cancelled() => {
            signal_group(pid, Signal::TERM);
            match tokio::time::timeout(grace(), child.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    signal_group(pid, Signal::KILL);
                    // The main process too, should it have left the group.
                    let _ = child.start_kill();
                    child.wait().await.ok()
                }
            }
        }
        () = disrupt_sleep => {
            disruption = disrupt.map(|(_, d)| d);
            signal_group(pid, Signal::KILL);
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    };
    // The container's other processes die with it, exec'd ones included.
    lock(&ctx.shared.kubelet.exec_targets).remove(&exec_key);
    exec_ended.cancel();
    signal_group(pid, Signal::KILL);
    lock(&ctx.shared.kubelet.process_groups).remove(&pid);
    if let Some(r) = reader {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    let exit_code = match status {
        Some(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            s.code()
                .or_else(|| s.signal().map(|sig| 128 + sig))
                .unwrap_or(1)
        }
        None => 1,
    };
    let mut message = std::fs::read(&prepared.termination_file)
        .ok()
        .map(|b| {
            let s = String::from_utf8_lossy(&b).into_owned();
            meta::truncate_utf8(&s, meta::MAX_TERMINATION_MESSAGE).to_owned()
        })
        .filter(|s| !s.is_empty());
    if message.is_none() && prepared.fallback_to_logs && exit_code != 0 {
        let all = log.contents();
        let tail = crate::pod_log::tail(&all, Some(80));
        let tail = &tail[tail.len().saturating_sub(2048)..];
        message = Some(String::from_utf8_lossy(tail).into_owned()).filter(|s| !s.is_empty());
    }
    let mut ended = Ended::exited(exit_code, started_at);
    ended.message = message;
    ended.disruption = disruption;
    ended
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let env = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)/y", &env), "x/y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    #[test]
    fn a_memory_empty_dir_is_on_tmpfs_and_goes_with_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let pod = json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "volumes": [
                    {"name": "disk", "emptyDir": {}},
                    {"name": "mem", "emptyDir": {"medium": "Memory"}},
                ],
                "containers": [{
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh"],
                    "volumeMounts": [
                        {"name": "disk", "mountPath": "/d"},
                        {"name": "mem", "mountPath": "/m"},
                    ],
                    "env": [{"name": "M", "value": "/m/x"}, {"name": "D", "value": "/d"}],
                }],
            },
        });
        let p = prepare(&pod, dir.path()).unwrap();
        let get = |k: &str| p.env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(
            get("D"),
            dir.path().join("volumes/disk").display().to_string()
        );
        let mem = PathBuf::from(get("M"));
        assert!(mem.starts_with(MEMORY_VOLUMES), "{}", mem.display());
        let host = mem.parent().unwrap().to_path_buf();
        assert!(host.is_dir());
        drop(p);
        assert!(!host.exists(), "removed with the container's run");
    }

    #[test]
    fn env_and_working_dir_are_remapped_to_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let pod = json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}},
            "spec": {
                "volumes": [{"name": "ws", "emptyDir": {}}],
                "containers": [{
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c"],
                    "args": ["echo $(GREETING)"],
                    "workingDir": "/workspace",
                    "volumeMounts": [{"name": "ws", "mountPath": "/workspace"}],
                    "env": [
                        {"name": "GREETING", "value": "hi"},
                        {"name": "WS", "value": "/workspace/sub"},
                        {"name": "TL", "value": "/dev/termination-log"},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    ],
                }],
            },
        });
        let p = prepare(&pod, dir.path()).unwrap();
        let get = |k: &str| {
            p.env
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let ws = dir.path().join("volumes/ws");
        assert_eq!(get("WS"), format!("{}/sub", ws.display()));
        assert_eq!(
            get("TL"),
            dir.path().join("termination-log").display().to_string()
        );
        assert_eq!(get("POD"), "p");
        assert_eq!(get("APP"), "a");
        assert_eq!(p.cwd, ws);
        assert_eq!(p.argv, vec!["sh", "-c", "echo hi"]);
    }
}
