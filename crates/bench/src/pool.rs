//! `sandfleet-bench pool`: what a warm pool buys, on kube-sim with a
//! realistic pod start (`--pod-start-ms`, 2 s by default).
//!
//! Two sessions-service replicas share one cluster and one pool of
//! `--claims` members. Measured, each time from the create request to the
//! first command's result (`echo $MARK`, the session's own env):
//!
//! * cold: `--cold` concurrent sessions without a pool (a pod start each);
//! * empty pool: as many, asking for a pool of size 0 (a miss must cost no
//!   more than a cold start);
//! * claim: `--claims` concurrent sessions asking for the full pool, half
//!   through each replica.
//!
//! Every session must echo its own `MARK` (a member handed to two sessions
//! would show another's) and every id must be distinct; both are counted
//! as `double_claims`. API writes per pooled session come from kube-sim's
//! request log: every non-GET request naming the member (its create, the
//! idle mark, the claim, the teardown, and any lost race or retry).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use sandfleet_kube_sim::{KubeSim, RequestRecord, SimOptions};
use sandfleet_proto::Resources;
use sandfleet_sandbox::session::pool::PoolTemplate;
use sandfleet_sandbox::session::{
    KubeSessions, RunOptions, SessionBackend, SessionId, SessionSpec,
};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service, SessionsClient};
use sandfleet_settings::KubernetesSettings;
use tokio_util::sync::CancellationToken;

const NS: &str = "pool-bench";
const IMAGE: &str = "docker.io/library/alpine:3.20";
const TOKEN: &str = "bench-token";

/// Options of the pool benchmark.
#[derive(Debug, clap::Args)]
pub(crate) struct PoolArgs {
    /// Concurrent claims (and the pool's size).
    #[arg(long, default_value_t = 100)]
    claims: usize,
    /// Concurrent cold starts, and empty-pool starts.
    #[arg(long, default_value_t = 20)]
    cold: usize,
    /// Simulated create → Running delay of a pod, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pod_start_ms: u64,
    /// Claims each replica has under way at once (`sandfleet sessions
    /// --max-claims-in-flight`); the rest wait their turn.
    #[arg(long, default_value_t = Limits::default().claims_in_flight)]
    max_claims_in_flight: usize,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn replica(
    sim: &KubeSim,
    pools: Vec<PoolTemplate>,
    claims_in_flight: usize,
    stop: &CancellationToken,
) -> anyhow::Result<SessionsClient> {
    let settings = KubernetesSettings {
        namespace: NS.into(),
        ..KubernetesSettings::default()
    };
    let backend = KubeSessions::from_kubeconfig_yaml(&sim.kubeconfig_yaml(NS), settings)
        .await?
        .with_start_timeout(Duration::from_secs(120));
    let limits = Limits {
        sessions_per_token: 10_000,
        claims_in_flight,
        ..Limits::default()
    };
    let service = Service::with_pools(backend, Tokens::from_tokens([TOKEN]), limits, pools);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(service.run(listener, Duration::from_secs(5), stop.clone()));
    Ok(SessionsClient::new(&url, TOKEN))
}

/// One session as the client saw it.
struct Session {
    /// Create request → its response, ms.
    create_ms: f64,
    /// Create request → the first command's result, ms.
    ms: f64,
    id: String,
    /// The first command echoed this session's own mark.
    own: bool,
    /// When the create request left.
    sent: SystemTime,
}

/// One session: create (from `pool`, or cold) → first command.
async fn one(
    client: Arc<SessionsClient>,
    pool: Option<&'static str>,
    mark: String,
) -> anyhow::Result<Session> {
    let mut spec = SessionSpec::new(IMAGE);
    spec.env.insert("MARK".into(), mark.clone());
    let sent = SystemTime::now();
    let t = Instant::now();
    let info = match pool {
        Some(p) => client.create_in_pool(&spec, p).await,
        None => client.create(&spec).await,
    }
    .context("create")?;
    let created = t.elapsed().as_secs_f64() * 1e3;
    let out = client
        .run(
            &SessionId(info.id.clone()),
            "echo \"$MARK\"",
            RunOptions::new(Duration::from_secs(30)),
            None,
        )
        .await
        .context("first command")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let own = String::from_utf8_lossy(&out.stdout).trim() == mark;
    Ok(Session {
        create_ms: created,
        ms,
        id: info.id,
        own,
        sent,
    })
}

struct Round {
    create_ms: Vec<f64>,
    ms: Vec<f64>,
    ids: Vec<String>,
    foreign: usize,
    sessions: Vec<Session>,
}

async fn round(
    clients: &[Arc<SessionsClient>],
    pool: Option<&'static str>,
    n: usize,
    tag: &str,
) -> anyhow::Result<Round> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = clients[i % clients.len()].clone();
        tasks.push(tokio::spawn(one(c, pool, format!("{tag}-{i}"))));
    }
    let mut r = Round {
        create_ms: Vec::new(),
        ms: Vec::new(),
        ids: Vec::new(),
        foreign: 0,
        sessions: Vec::new(),
    };
    for t in tasks {
        let s = t.await??;
        r.create_ms.push(s.create_ms);
        r.ms.push(s.ms);
        r.ids.push(s.id.clone());
        r.foreign += usize::from(!s.own);
        r.sessions.push(s);
    }
    r.ms.sort_by(f64::total_cmp);
    r.create_ms.sort_by(f64::total_cmp);
    Ok(r)
}

/// Where a warm claim's time went, from kube-sim's request log: create
/// request → the winning claim patch reached the API server → the hand-over
/// (an attach to the member's idle loop, or an exec where the loop cannot
/// take it) reached it → the first command's exec reached it → its result at
/// the client. Medians in ms, and the claim patches that lost a race.
fn stages(
    log: &[RequestRecord],
    warm: &Round,
) -> ([f64; 4], usize, std::collections::BTreeMap<String, usize>) {
    let ms =
        |a: SystemTime, b: SystemTime| b.duration_since(a).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let mut parts: [Vec<f64>; 4] = Default::default();
    for s in warm.sessions.iter().filter(|s| s.id.starts_with("sp-")) {
        let job = format!("/jobs/{}", s.id);
        let pod = format!("/pods/{}-", s.id);
        let after = |r: &&RequestRecord| r.at >= s.sent;
        let Some(claim) = log
            .iter()
            .filter(after)
            .find(|r| r.method == "PATCH" && r.path.ends_with(&job) && r.status == 200)
        else {
            continue;
        };
        let to_pod: Vec<&RequestRecord> = log
            .iter()
            .filter(after)
            .filter(|r| {
                r.path.contains(&pod) && (r.path.ends_with("/exec") || r.path.ends_with("/attach"))
            })
            .collect();
        let [hand_over, first, ..] = to_pod[..] else {
            continue;
        };
        let done = s.sent + Duration::from_secs_f64(s.ms / 1e3);
        parts[0].push(ms(s.sent, claim.at));
        parts[1].push(ms(claim.at, hand_over.at));
        parts[2].push(ms(hand_over.at, first.at));
        parts[3].push(ms(first.at, done));
    }
    let start = warm.sessions.iter().map(|s| s.sent).min();
    let end = warm
        .sessions
        .iter()
        .map(|s| s.sent + Duration::from_secs_f64(s.ms / 1e3))
        .max();
    let mut requests = std::collections::BTreeMap::<String, usize>::new();
    for r in log
        .iter()
        .filter(|r| start.is_some_and(|t| r.at >= t) && end.is_some_and(|t| r.at <= t))
    {
        *requests
            .entry(format!("{} {}", r.verb(), r.resource()))
            .or_default() += 1;
    }
    let lost = log
        .iter()
        .filter(|r| start.is_some_and(|t| r.at >= t))
        .filter(|r| r.method == "PATCH" && r.status == 409)
        .count();
    let med = parts.map(|mut v| {
        v.sort_by(f64::total_cmp);
        pct(&v, 0.5)
    });
    (med, lost, requests)
}

/// CPU time in seconds: the whole machine's busy time (all cores, from
/// `/proc/stat`) and this process's own (user + system, from
/// `/proc/self/stat`, which includes the reaped sandbox commands it spawned:
/// kube-sim runs them as this process's children).
fn cpu_now() -> (f64, f64) {
    let tick = 100.0;
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some((v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?) / tick)
        })
        .unwrap_or(0.0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let v: Vec<f64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // after the name: state(skipped: not a number) ppid .. utime(14) stime(15) cutime(16) cstime(17)
            Some(v.get(10)? + v.get(11)? + v.get(12)? + v.get(13)?)
        })
        .map_or(0.0, |t| t / tick);
    (machine, own)
}

async fn idle(client: &SessionsClient, pool: &str) -> usize {
    client
        .pools()
        .await
        .ok()
        .and_then(|p| p.into_iter().find(|p| p.name == pool))
        .map_or(0, |p| p.idle)
}

/// Runs the benchmark and prints the figures; the last line is JSON.
pub(crate) async fn run(a: PoolArgs) -> anyhow::Result<()> {
    if a.claims == 0 || a.cold == 0 || a.max_claims_in_flight == 0 {
        bail!("--claims, --cold and --max-claims-in-flight must be at least 1");
    }
    let sim = KubeSim::start(SimOptions {
        pod_start_delay: Duration::from_millis(a.pod_start_ms),
        history_limit: 100_000,
        ..SimOptions::default()
    })
    .await?;
    let pools = vec![
        PoolTemplate {
            name: "bench".into(),
            image: IMAGE.into(),
            resources: Resources::default(),
            size: a.claims,
            max_age: Duration::from_secs(3600),
        },
        PoolTemplate {
            name: "empty".into(),
            image: IMAGE.into(),
            resources: Resources::default(),
            size: 0,
            max_age: Duration::from_secs(3600),
        },
    ];
    let stop = CancellationToken::new();
    let clients = [
        Arc::new(replica(&sim, pools.clone(), a.max_claims_in_flight, &stop).await?),
        Arc::new(replica(&sim, pools, a.max_claims_in_flight, &stop).await?),
    ];
    let fill = Instant::now();
    let deadline = fill + Duration::from_secs(180);
    loop {
        let (x, y) = (
            idle(&clients[0], "bench").await,
            idle(&clients[1], "bench").await,
        );
        if x == a.claims && y == a.claims {
            break;
        }
        if Instant::now() > deadline {
            bail!("the pool did not fill: {x} and {y} idle of {}", a.claims);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "pool of {} filled in {:.1} s (pod start {} ms; {} claims in flight per replica)",
        a.claims,
        fill.elapsed().as_secs_f64(),
        a.pod_start_ms,
        a.max_claims_in_flight
    );

    let cold = round(&clients, None, a.cold, "cold").await?;
    let empty = round(&clients, Some("empty"), a.cold, "empty").await?;
    let (machine0, own0) = cpu_now();
    let warm_started = Instant::now();
    let warm = round(&clients, Some("bench"), a.claims, "warm").await?;
    let warm_wall = warm_started.elapsed().as_secs_f64();
    let (machine1, own1) = cpu_now();

    let unique: HashSet<&String> = warm.ids.iter().chain(&cold.ids).chain(&empty.ids).collect();
    let all = warm.ids.len() + cold.ids.len() + empty.ids.len();
    let double_claims = (all - unique.len()) + warm.foreign + cold.foreign + empty.foreign;
    let warm_hits = warm.ids.iter().filter(|id| id.starts_with("sp-")).count();

    // Tear down, then count the writes each pooled session cost.
    for id in warm.ids.iter().chain(&cold.ids).chain(&empty.ids) {
        clients[0].teardown(&SessionId(id.clone())).await?;
    }
    let log = sim.request_log();
    let (stage, lost, requests) = stages(&log, &warm);
    let pooled: Vec<&String> = warm.ids.iter().filter(|id| id.starts_with("sp-")).collect();
    let writes: usize = pooled
        .iter()
        .map(|id| {
            log.iter()
                .filter(|r| r.method != "GET")
                .filter(|r| {
                    r.path.ends_with(&format!("/{id}"))
                        || r.path.contains(&format!("/{id}/"))
                        || r.body
                            .as_ref()
                            .is_some_and(|b| b["metadata"]["name"] == id.as_str())
                })
                .count()
        })
        .sum();
    let writes_per_session = writes as f64 / pooled.len().max(1) as f64;
    stop.cancel();

    let line = |name: &str, r: &Round| {
        println!(
            "{name:<11} create -> first command: p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms  (create alone p50 {:>7.1} ms; {} sessions)",
            pct(&r.ms, 0.5),
            pct(&r.ms, 0.95),
            pct(&r.ms, 0.99),
            pct(&r.create_ms, 0.5),
            r.ms.len()
        );
    };
    line("cold", &cold);
    line("empty pool", &empty);
    line("warm claim", &warm);
    println!(
        "warm claim stages (p50): create -> claim patch {:.1} ms, -> hand-over {:.1} ms, -> first command exec {:.1} ms, -> its result {:.1} ms; claim patches that lost a race: {lost}",
        stage[0], stage[1], stage[2], stage[3]
    );
    println!("API requests during the claim round: {requests:?}");
    println!(
        "claim round: {warm_wall:.2} s wall; CPU busy on the machine {:.2} s of {:.2} s available, this process and its reaped children {:.2} s",
        machine1 - machine0,
        warm_wall * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        own1 - own0
    );
    // One rounding for both lines (`{:.1}` would round 4.25 to 4.2, the
    // JSON line to 4.3).
    let r = |v: f64| (v * 10.0).round() / 10.0;
    println!(
        "warm claims served by a member: {warm_hits} of {}; double claims: {double_claims}; API writes per pooled session: {:.1}",
        warm.ids.len(),
        r(writes_per_session)
    );
    // The keys first, in its order, then the run's shape.
    let fields: [(&str, serde_json::Value); 10] = [
        ("claim_p50_ms", r(pct(&warm.ms, 0.5)).into()),
        ("claim_p99_ms", r(pct(&warm.ms, 0.99)).into()),
        ("cold_p95_ms", r(pct(&cold.ms, 0.95)).into()),
        ("empty_pool_p95_ms", r(pct(&empty.ms, 0.95)).into()),
        ("double_claims", double_claims.into()),
        ("api_writes_per_session", r(writes_per_session).into()),
        ("claims", a.claims.into()),
        ("warm_hits", warm_hits.into()),
        ("pod_start_ms", a.pod_start_ms.into()),
        ("claims_in_flight", a.max_claims_in_flight.into()),
    ];
    println!("{}", crate::json_line("pool", &fields));
    Ok(())
}
