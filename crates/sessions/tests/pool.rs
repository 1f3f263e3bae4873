//! Warm pools on kube-sim: a claim hands the session its own values, the
//! pool refills, replicas racing never share a member, a template change
//! replaces idle members only, a replica killed mid-claim leaves nothing
//! claimed and unused, and a pooled session costs few API writes.
//!
//! Each replica runs on its own tokio runtime, so killing it (dropping the
//! runtime) ends every task it had, request handlers included, as a crashed
//! process would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sandfleet_kube_sim::{FaultAction, FaultRule, KubeSim, SimOptions};
use sandfleet_proto::Resources;
use sandfleet_sandbox::session::kubernetes::SessionMeta;
use sandfleet_sandbox::session::pool::{
    ANNOTATION_HANDOVER, ANNOTATION_POD, HANDOVER_STDIN, LABEL_POOL, LABEL_POOL_STATE,
    LABEL_TEMPLATE, PoolTemplate,
};
use sandfleet_sandbox::session::{KubeSessions, SessionBackend, SessionId, SessionSpec};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service, SessionsClient};
use sandfleet_settings::KubernetesSettings;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "docker.io/library/alpine:3.20";

fn settings(ns: &str) -> KubernetesSettings {
    KubernetesSettings {
        namespace: ns.into(),
        ..KubernetesSettings::default()
    }
}

fn pool(name: &str, image: &str, size: usize) -> PoolTemplate {
    PoolTemplate {
        name: name.into(),
        image: image.into(),
        resources: Resources::default(),
        size,
        max_age: Duration::from_secs(3600),
    }
}

/// A service replica on a runtime of its own.
struct Replica {
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    stop: CancellationToken,
}

impl Replica {
    fn start(sim: &KubeSim, ns: &str, pools: Vec<PoolTemplate>) -> Replica {
        Replica::start_with(sim, ns, pools, Limits::default())
    }

    fn start_with(sim: &KubeSim, ns: &str, pools: Vec<PoolTemplate>, limits: Limits) -> Replica {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let kubeconfig = sim.kubeconfig_yaml(ns);
        let settings = settings(ns);
        let stop = CancellationToken::new();
        let until = stop.clone();
        rt.spawn(async move {
            let backend = KubeSessions::from_kubeconfig_yaml(&kubeconfig, settings)
                .await
                .unwrap()
                .with_start_timeout(Duration::from_secs(20));
            let service =
                Service::with_pools(backend, Tokens::from_tokens(["tok-a"]), limits, pools);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            service
                .run(listener, Duration::from_millis(200), until)
                .await
        });
        Replica {
            url,
            rt: Some(rt),
            stop,
        }
    }

    fn client(&self) -> SessionsClient {
        SessionsClient::new(&self.url, "tok-a")
    }

    /// Dies at once: every task of the replica ends where it stands.
    fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

use common::eventually;

async fn idle(client: &SessionsClient, pool: &str) -> usize {
    client
        .pools()
        .await
        .ok()
        .and_then(|p| p.into_iter().find(|p| p.name == pool))
        .map_or(0, |p| p.idle)
}

/// Waits (up to 30 s) until the replica behind `client` sees `n` idle
/// members in `pool`.
async fn filled(client: &SessionsClient, pool: &str, n: usize) {
    eventually("the pool is full", Duration::from_secs(30), || async {
        idle(client, pool).await == n
    })
    .await;
}

/// A replica with `limits` and the one pool `template`, once the pool is
/// full, and a client of it.
async fn full_pool(
    sim: &KubeSim,
    ns: &str,
    template: PoolTemplate,
    limits: Limits,
) -> (Replica, Arc<SessionsClient>) {
    let (name, size) = (template.name.clone(), template.size);
    let r = Replica::start_with(sim, ns, vec![template], limits);
    let client = Arc::new(r.client());
    filled(&client, &name, size).await;
    (r, client)
}

/// Runs `command` in session `id` (10 s timeout).
async fn run(
    client: &SessionsClient,
    id: &str,
    command: &str,
) -> sandfleet_sandbox::session::CommandOutput {
    client
        .run(
            &SessionId(id.to_owned()),
            command,
            sandfleet_sandbox::session::RunOptions::new(Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap()
}

fn label(job: &Value, key: &str) -> Option<String> {
    job["metadata"]["labels"][key].as_str().map(str::to_owned)
}

fn members(sim: &KubeSim, ns: &str, pool: &str) -> Vec<Value> {
    sim.jobs(ns)
        .into_iter()
        .filter(|j| label(j, LABEL_POOL).as_deref() == Some(pool))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_member_gets_the_sessions_own_values_and_the_pool_refills() {
    const NS: &str = "pool-claim";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = Replica::start(&sim, NS, vec![pool("py", IMAGE, 2), pool("none", IMAGE, 0)]);
    let client = r.client();
    filled(&client, "py", 2).await;

    let secret = "s3cr3t-'quoted' $(not run) `nor this`";
    let mut spec = SessionSpec::new(IMAGE);
    spec.env.insert("API_TOKEN".into(), secret.into());
    spec.working_dir = "src/app".into();
    let info = client.create_in_pool(&spec, "py").await.unwrap();
    assert!(info.id.starts_with("sp-py-"), "a warm member: {}", info.id);
    let id = SessionId(info.id.clone());
    let out = client
        .run(
            &id,
            "printf '%s|' \"$API_TOKEN\"; pwd",
            sandfleet_sandbox::session::RunOptions::new(Duration::from_secs(10)),
            None,
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with(&format!("{secret}|")) && text.trim_end().ends_with("/src/app"),
        "env and working dir arrive at claim time: {text:?}"
    );
    // The secret is in no pod spec or Job another session could read.
    for obj in sim.jobs(NS).into_iter().chain(sim.pods(NS)) {
        assert!(
            !obj.to_string().contains("s3cr3t"),
            "secret leaked into {obj}"
        );
    }

    // The pool refills at once; the claimed member is a session now.
    eventually("the pool refilled", Duration::from_secs(30), || async {
        idle(&client, "py").await == 2
    })
    .await;
    let pools = client.pools().await.unwrap();
    let py = pools.iter().find(|p| p.name == "py").unwrap();
    assert_eq!(py.claimed, 1);

    // An empty pool is a cold start, never an error.
    let cold = client.create_in_pool(&spec, "none").await.unwrap();
    assert!(cold.id.starts_with("ss-"), "a cold start: {}", cold.id);
    let err = client.create_in_pool(&spec, "nope").await.unwrap_err();
    assert!(err.to_string().contains("no pool named"), "{err}");

    let metrics = reqwest::get(format!("{}/metrics", r.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "sandfleet_sessions_pool_claims_total{pool=\"py\"} 1",
        "sandfleet_sessions_pool_misses_total{pool=\"none\"} 1",
        "sandfleet_sessions_pool_size{pool=\"py\"} 2",
        "sandfleet_sessions_pool_claim_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The idle gauge follows the refill (the pool loop sets it after each plan).
    let url = r.url.clone();
    eventually(
        "the idle gauge shows the refilled pool",
        Duration::from_secs(10),
        || {
            let url = url.clone();
            async move {
                reqwest::get(format!("{url}/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
                    .contains("sandfleet_sessions_pool_idle{pool=\"py\"} 2")
            }
        },
    )
    .await;

    // A member serves one session: teardown deletes it.
    client.teardown(&id).await.unwrap();
    client.teardown(&SessionId(cold.id)).await.unwrap();
    eventually("the member is gone", Duration::from_secs(10), || async {
        !sim.jobs(NS)
            .iter()
            .any(|j| j["metadata"]["name"] == info.id.as_str())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_ten_api_writes_per_pooled_session() {
    const NS: &str = "pool-writes";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = Replica::start(&sim, NS, vec![pool("w", IMAGE, 3)]);
    let client = r.client();
    filled(&client, "w", 3).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut spec = SessionSpec::new(IMAGE);
        spec.env.insert("N".into(), i.to_string());
        let info = client.create_in_pool(&spec, "w").await.unwrap();
        assert!(info.id.starts_with("sp-w-"));
        let out = run(&client, &info.id, "echo $N").await;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
        client.teardown(&SessionId(info.id.clone())).await.unwrap();
        ids.push(info.id);
    }
    // Every write that names a session's member: its create, its idle mark,
    // the claim, the teardown (and any lost race or retry on top).
    let log = sim.request_log();
    for id in &ids {
        let writes = log
            .iter()
            .filter(|r| r.method != "GET")
            .filter(|r| {
                r.path.ends_with(&format!("/{id}"))
                    || r.path.contains(&format!("/{id}/"))
                    || r.body
                        .as_ref()
                        .is_some_and(|b| b["metadata"]["name"] == id.as_str())
            })
            .count();
        assert!(
            (1..=10).contains(&writes),
            "{writes} API writes for pooled session {id}"
        );
    }
}

/// A replica that claims a member another replica started finds the pod on
/// the member's Job (its promoter wrote it there with the `idle` label): it
/// goes from the claim to the first command without looking the pod up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_another_replica_started_is_claimed_without_a_pod_lookup() {
    const NS: &str = "pool-pod-known";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let a = Replica::start(&sim, NS, vec![pool("k", IMAGE, 2)]);
    let ca = a.client();
    filled(&ca, "k", 2).await;
    for m in members(&sim, NS, "k") {
        let pod = m["metadata"]["annotations"][ANNOTATION_POD].as_str();
        assert!(
            pod.is_some_and(|p| p.starts_with(m["metadata"]["name"].as_str().unwrap())),
            "{m}"
        );
    }
    // B started nothing: every member it claims is one A started.
    let b = Replica::start(&sim, NS, vec![pool("k", IMAGE, 2)]);
    let cb = b.client();
    filled(&cb, "k", 2).await;
    let before = sim.request_log().len();
    let mut spec = SessionSpec::new(IMAGE);
    spec.env.insert("MINE".into(), "via-b".into());
    let info = cb.create_in_pool(&spec, "k").await.unwrap();
    assert!(info.id.starts_with("sp-k-"), "{}", info.id);
    let out = run(&cb, &info.id, "echo $MINE").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-b");
    // (The refill's own start lists its pods, as any watch begins.)
    let selects = |q: &str| {
        let sel = format!("%3D{}", info.id);
        q.contains(&format!("{sel}&")) || q.ends_with(&sel)
    };
    let lookups: Vec<String> = sim.request_log()[before..]
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/pods") && selects(&r.query))
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    assert!(lookups.is_empty(), "{lookups:?}");
    cb.teardown(&SessionId(info.id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_never_hand_one_member_to_two_sessions() {
    const NS: &str = "pool-race";
    const SIZE: usize = 6;
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    // The token holds all 2 × SIZE sessions at once, counted across the
    // replicas: more than the default limit (10), which would refuse the
    // last ones whenever they are counted after the others were made.
    let limits = Limits {
        sessions_per_token: 2 * SIZE,
        ..Limits::default()
    };
    let a = Replica::start_with(&sim, NS, vec![pool("r", IMAGE, SIZE)], limits.clone());
    let b = Replica::start_with(&sim, NS, vec![pool("r", IMAGE, SIZE)], limits);
    let (ca, cb) = (Arc::new(a.client()), Arc::new(b.client()));
    eventually(
        "both replicas see a full pool",
        Duration::from_secs(30),
        || async { idle(&ca, "r").await == SIZE && idle(&cb, "r").await == SIZE },
    )
    .await;
    assert_eq!(
        members(&sim, NS, "r").len(),
        SIZE,
        "two replicas filled it once"
    );

    // Twice as many claims as idle members, half through each replica, at once.
    let mut tasks = Vec::new();
    for i in 0..2 * SIZE {
        let client = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            let mut spec = SessionSpec::new(IMAGE);
            spec.env.insert("MINE".into(), format!("session-{i}"));
            let info = client.create_in_pool(&spec, "r").await.unwrap();
            let out = run(&client, &info.id, "echo $MINE").await;
            (
                i,
                info.id,
                String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            )
        }));
    }
    let mut ids = HashSet::new();
    let mut warm = 0;
    for t in tasks {
        let (i, id, echoed) = t.await.unwrap();
        assert_eq!(
            echoed,
            format!("session-{i}"),
            "{id} runs another session's env"
        );
        warm += usize::from(id.starts_with("sp-"));
        assert!(ids.insert(id.clone()), "{id} was handed to two sessions");
    }
    assert!(
        (1..=SIZE).contains(&warm),
        "{warm} warm claims from {SIZE} members"
    );
    for id in ids {
        ca.teardown(&SessionId(id)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_replaces_every_idle_member_and_none_in_use() {
    const NS: &str = "pool-template";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let old = pool("t", IMAGE, 3);
    let a = Replica::start(&sim, NS, vec![old.clone()]);
    let client = a.client();
    filled(&client, "t", 3).await;
    let in_use = client
        .create_in_pool(&SessionSpec::new(IMAGE), "t")
        .await
        .unwrap();
    eventually("the pool refilled", Duration::from_secs(30), || async {
        idle(&client, "t").await == 3
    })
    .await;
    // The operator changes the pool's image and rolls the service.
    drop(a);
    let new = pool("t", "docker.io/library/alpine:3.21", 3);
    let b = Replica::start(&sim, NS, vec![new.clone()]);
    let client = b.client();
    eventually(
        "every idle member runs the new template",
        Duration::from_secs(30),
        || async {
            let m = members(&sim, NS, "t");
            let idle: Vec<&Value> = m
                .iter()
                .filter(|j| label(j, LABEL_POOL_STATE).as_deref() == Some("idle"))
                .collect();
            idle.len() == 3
                && idle
                    .iter()
                    .all(|j| label(j, LABEL_TEMPLATE) == Some(new.hash()))
                && m.iter()
                    .filter(|j| label(j, LABEL_TEMPLATE) == Some(old.hash()))
                    .all(|j| j["metadata"]["name"] == in_use.id.as_str())
        },
    )
    .await;
    // The session in use was not touched.
    let out = run(&client, &in_use.id, "echo still here").await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "still here");
    client.teardown(&SessionId(in_use.id)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_claiming_leaves_no_member_claimed_and_unused() {
    const NS: &str = "pool-kill";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let a = Replica::start(&sim, NS, vec![pool("k", IMAGE, 2)]);
    let b = Replica::start(&sim, NS, vec![pool("k", IMAGE, 2)]);
    let (ca, cb) = (a.client(), b.client());
    eventually("the pool is full", Duration::from_secs(30), || async {
        idle(&ca, "k").await == 2 && idle(&cb, "k").await == 2
    })
    .await;
    // The next request to an idle member's pod (replica A's attach handing
    // the member it claimed its session) hangs, so replica A is caught
    // between the claim and the hand-over. The rules name the idle members'
    // pods (`<job>-<suffix>`): a rule on every pod request would as well
    // catch the readiness exec of the refill the claim starts, which can
    // come first, and let the hand-over through.
    // Replica B's check of a claimed member (the `claimed` wrapper, whose
    // command names `${SANDFLEET_STATE_DIR:?}/claimed`, URL-encoded below) is
    // left alone: under load replica A can take longer than the idle timeout
    // between its claim and its hand-over, and B's check would then take the
    // delay meant for A and hang for a minute.
    const CHECK: &str = "%7D%2Fclaimed";
    for job in members(&sim, NS, "k") {
        let name = job["metadata"]["name"].as_str().unwrap();
        sim.faults().inject(
            FaultRule::new(
                "GET",
                &format!("/pods/{name}-"),
                FaultAction::Delay(Duration::from_secs(60)),
            )
            .unless_query(CHECK)
            .times(1),
        );
    }
    // Only requests from here on count below: the members' own readiness
    // execs (before the pool was full) go to the same pods.
    let rules_armed = std::time::SystemTime::now();
    let idle_timeout = Duration::from_secs(2);
    let url = a.url.clone();
    let claim = tokio::spawn(async move {
        let mut spec = SessionSpec::new(IMAGE);
        spec.idle_timeout = idle_timeout;
        SessionsClient::new(&url, "tok-a")
            .create_in_pool(&spec, "k")
            .await
    });
    let mut claimed = String::new();
    eventually(
        "replica A claimed a member",
        Duration::from_secs(10),
        || {
            let found = members(&sim, NS, "k")
                .into_iter()
                .find(|j| label(j, LABEL_POOL_STATE).as_deref() == Some("claimed"));
            if let Some(j) = found {
                claimed = j["metadata"]["name"].as_str().unwrap().to_owned();
            }
            let done = !claimed.is_empty();
            async move { done }
        },
    )
    .await;
    // Killed once its hand-over has reached the API server (and hangs
    // there): killed sooner, replica A would leave that member's delay rule
    // armed for replica B's check of the member, which then hangs instead.
    let exec_path = format!("/pods/{claimed}-");
    eventually(
        "replica A's hand-over reached the API server",
        Duration::from_secs(10),
        || {
            let sent = sim.request_log().iter().any(|r| {
                r.at >= rules_armed && r.path.contains(&exec_path) && r.path.ends_with("/attach")
            });
            async move { sent }
        },
    )
    .await;
    // Seen within one poll (25 ms) of the exec, a few ms after the claim.
    let killed_at = Instant::now();
    a.kill();
    assert!(
        claim.await.unwrap().is_err(),
        "the client sees its request fail"
    );

    // Replica B deletes the member nobody will use once the idle timeout has
    // passed, and keeps the pool full.
    eventually(
        "the abandoned member is deleted",
        Duration::from_secs(20),
        || async {
            !members(&sim, NS, "k")
                .iter()
                .any(|j| j["metadata"]["name"] == claimed.as_str())
        },
    )
    .await;
    assert!(
        killed_at.elapsed() >= idle_timeout - Duration::from_millis(300),
        "deleted before its idle timeout: a claim in progress must be given that long"
    );
    // `CHECK` is what replica B's check looks like on the wire, so the rules
    // above did leave it alone.
    assert!(
        sim.request_log()
            .iter()
            .any(|r| r.path.contains(&exec_path) && r.query.contains(CHECK)),
        "no exec of replica B's check carries {CHECK} in its query"
    );
    // The pool is full again: a refill replica A still had warming when it
    // died is adopted by replica B (after ADOPT_AFTER, 10 s).
    eventually(
        "the pool is full again",
        Duration::from_secs(60),
        || async { idle(&cb, "k").await == 2 },
    )
    .await;
    let claimed_left: Vec<Value> = members(&sim, NS, "k")
        .into_iter()
        .filter(|j| label(j, LABEL_POOL_STATE).as_deref() == Some("claimed"))
        .collect();
    assert!(
        claimed_left.is_empty(),
        "claimed and unused: {claimed_left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_claim_lets_exactly_one_of_two_through() {
    const NS: &str = "pool-cas";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = Replica::start(&sim, NS, vec![pool("c", IMAGE, 1)]);
    let client = r.client();
    filled(&client, "c", 1).await;
    let job = members(&sim, NS, "c").pop().unwrap();
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let rv = job["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let kubeconfig = sim.kubeconfig_yaml(NS);
    let x = KubeSessions::from_kubeconfig_yaml(&kubeconfig, settings(NS))
        .await
        .unwrap();
    let y = KubeSessions::from_kubeconfig_yaml(&kubeconfig, settings(NS))
        .await
        .unwrap();
    let spec = SessionSpec::new(IMAGE);
    let meta = SessionMeta {
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    let (p, q) = tokio::join!(
        x.claim_member(&name, &rv, &spec, &meta),
        y.claim_member(&name, &rv, &spec, &meta)
    );
    use sandfleet_sandbox::session::kubernetes::pool::ClaimOutcome::{Claimed, Lost};
    let mut outcomes = [p.unwrap(), q.unwrap()];
    outcomes.sort_by_key(|o| *o == Lost);
    assert_eq!(outcomes, [Claimed, Lost]);
    // The member's loop runs under bash with a stdin: it takes the claim
    // through it.
    assert_eq!(
        job["metadata"]["annotations"][ANNOTATION_HANDOVER], HANDOVER_STDIN,
        "{job}"
    );
    x.activate_member(&SessionId(name.clone()), &spec, None, true)
        .await
        .unwrap();
    // The sandbox itself refuses a second hand-over, through its stdin and
    // through an exec alike (whether the pod is looked up or read off the Job).
    let pod = job["metadata"]["annotations"][ANNOTATION_POD].as_str();
    assert!(pod.is_some(), "{job}");
    for stdin in [true, false] {
        let again = y
            .activate_member(&SessionId(name.clone()), &spec, pod, stdin)
            .await;
        assert!(
            again.is_err(),
            "a member serves one session (stdin: {stdin})"
        );
    }
    x.teardown(&SessionId(name)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_of_a_claimed_member_that_hangs_is_given_up_and_the_next_one_answers() {
    const NS: &str = "pool-check";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = Replica::start(&sim, NS, vec![pool("h", IMAGE, 1)]);
    filled(&r.client(), "h", 1).await;
    let job = members(&sim, NS, "h").pop().unwrap();
    let name = job["metadata"]["name"].as_str().unwrap().to_owned();
    let rv = job["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let x = KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), settings(NS))
        .await
        .unwrap();
    let meta = SessionMeta {
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    use sandfleet_sandbox::session::kubernetes::pool::{CHECK_WAIT, ClaimOutcome};
    let claimed = x
        .claim_member(&name, &rv, &SessionSpec::new(IMAGE), &meta)
        .await
        .unwrap();
    assert_eq!(claimed, ClaimOutcome::Claimed);
    // The API server holds the next request to the member's pod for a minute.
    sim.faults().inject(
        FaultRule::new(
            "GET",
            &format!("/pods/{name}-"),
            FaultAction::Delay(Duration::from_secs(60)),
        )
        .times(1),
    );
    let id = SessionId(name.clone());
    let started = Instant::now();
    let hung = x.member_activated(&id).await;
    assert!(hung.is_err(), "{hung:?}");
    assert!(
        started.elapsed() < CHECK_WAIT + Duration::from_secs(5),
        "given up after {:?}",
        started.elapsed()
    );
    // The next check answers: claimed, never handed over.
    assert!(!x.member_activated(&id).await.unwrap());
    x.teardown(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_member_ends_on_the_sessions_own_idle_timeout_and_lifetime() {
    const NS: &str = "pool-timeouts";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let r = Replica::start(&sim, NS, vec![pool("t", IMAGE, 2)]);
    let client = r.client();
    filled(&client, "t", 2).await;
    // The members themselves idle for an hour and a minute: only the values
    // handed over at claim time can end these sessions within seconds.
    let mut quiet = SessionSpec::new(IMAGE);
    quiet.idle_timeout = Duration::from_secs(2);
    let mut short = SessionSpec::new(IMAGE);
    short.idle_timeout = Duration::from_secs(600);
    short.max_lifetime = Duration::from_secs(3);
    let started = Instant::now();
    let a = client.create_in_pool(&quiet, "t").await.unwrap();
    let b = client.create_in_pool(&short, "t").await.unwrap();
    for info in [&a, &b] {
        assert!(info.id.starts_with("sp-t-"), "a warm member: {}", info.id);
        let out = run(&client, &info.id, "true").await;
        assert_eq!(out.exit_code, 0);
    }
    for (info, what) in [(&a, "idle timeout"), (&b, "lifetime")] {
        let id = SessionId(info.id.clone());
        eventually(
            &format!("the session ends on its own {what}"),
            Duration::from_secs(20),
            // Ended, or already deleted by the reaper.
            || async {
                match client.info(&id).await {
                    Ok(i) => i.ended,
                    Err(e) => matches!(e, sandfleet_sandbox::session::SessionError::NotFound(_)),
                }
            },
        )
        .await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the idle timeout: {:?}",
        started.elapsed()
    );
    for info in [a, b] {
        let _ = client.teardown(&SessionId(info.id)).await;
    }
}

/// The per-token limit holds for a burst of pooled creates: claims and cold
/// starts under way count until their sessions are in the pool manager's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pooled_creates_by_one_token_gets_exactly_its_limit() {
    const NS: &str = "pool-limit";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let limits = Limits {
        sessions_per_token: 3,
        ..Limits::default()
    };
    let (_r, client) = full_pool(&sim, NS, pool("q", IMAGE, 2), limits).await;
    // Every claim's conditional update and every cold start's create takes
    // 300 ms: all eight checks run before any of the sessions is counted.
    for method in ["PATCH", "POST"] {
        sim.faults().inject(FaultRule::new(
            method,
            "/jobs",
            FaultAction::Delay(Duration::from_millis(300)),
        ));
    }
    let creates = (0..8).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.create_in_pool(&SessionSpec::new(IMAGE), "q").await })
    });
    let creates: Vec<_> = creates.collect();
    let mut made = Vec::new();
    for t in creates {
        match t.await.unwrap() {
            Ok(info) => made.push(info.id),
            Err(e) => assert!(e.to_string().contains("session_limit"), "{e}"),
        }
    }
    assert_eq!(made.len(), 3, "{made:?}");
    assert_eq!(client.list().await.unwrap().len(), 3);
    for id in made {
        client.teardown(&SessionId(id)).await.unwrap();
    }
}

/// A burst of claims is served `claims_in_flight` at a time, in arrival
/// order: with one in flight and every hand-over slowed to 300 ms, each
/// claim's conditional update waits for the previous claim's hand-over, and
/// the first session is ready long before the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_claims_is_served_a_few_at_a_time_in_arrival_order() {
    const NS: &str = "pool-turns";
    let sim = KubeSim::start(SimOptions::default()).await.unwrap();
    let limits = Limits {
        claims_in_flight: 1,
        ..Limits::default()
    };
    let (_r, client) = full_pool(&sim, NS, pool("t", IMAGE, 4), limits).await;
    sim.faults().inject(FaultRule::new(
        "GET",
        "/attach",
        FaultAction::Delay(Duration::from_millis(300)),
    ));
    let sent = std::time::SystemTime::now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut spec = SessionSpec::new(IMAGE);
            spec.env.insert("N".into(), i.to_string());
            let info = client.create_in_pool(&spec, "t").await.unwrap();
            (info.id, started.elapsed())
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let ids: HashSet<&String> = done.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "{done:?}");
    assert!(ids.iter().all(|id| id.starts_with("sp-t-")), "{done:?}");
    let mut took: Vec<Duration> = done.iter().map(|(_, d)| *d).collect();
    took.sort();
    assert!(
        took[0] < Duration::from_millis(900) && took[3] >= Duration::from_millis(1150),
        "one claim at a time, 300 ms each: {took:?}"
    );
    // The claim patches: each after the previous claim's hand-over.
    let mut patches: Vec<std::time::SystemTime> = sim
        .request_log()
        .iter()
        .filter(|r| r.at >= sent && r.method == "PATCH" && r.status == 200)
        .filter(|r| {
            r.body
                .as_ref()
                .is_some_and(|b| b["metadata"]["labels"][LABEL_POOL_STATE] == "claimed")
        })
        .map(|r| r.at)
        .collect();
    patches.sort();
    assert_eq!(patches.len(), 4);
    for w in patches.windows(2) {
        let gap = w[1].duration_since(w[0]).unwrap();
        assert!(
            gap >= Duration::from_millis(250),
            "claims overlapped: {gap:?} apart"
        );
    }
}
