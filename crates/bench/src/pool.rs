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
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandfleet_kube_sim::{KubeSim, SimOptions};
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
        ..Limits::default()
    };
    let service = Service::with_pools(backend, Tokens::from_tokens([TOKEN]), limits, pools);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(service.run(listener, Duration::from_secs(5), stop.clone()));
    Ok(SessionsClient::new(&url, TOKEN))
}

/// One session: create (from `pool`, or cold) → first command. Returns the
/// latency in ms, the id, and whether the command echoed this session's mark.
async fn one(
    client: Arc<SessionsClient>,
    pool: Option<&'static str>,
    mark: String,
) -> anyhow::Result<(f64, f64, String, bool)> {
    let mut spec = SessionSpec::new(IMAGE);
    spec.env.insert("MARK".into(), mark.clone());
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
    Ok((created, ms, info.id, own))
}

struct Round {
    create_ms: Vec<f64>,
    ms: Vec<f64>,
    ids: Vec<String>,
    foreign: usize,
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
    };
    for t in tasks {
        let (created, ms, id, own) = t.await??;
        r.create_ms.push(created);
        r.ms.push(ms);
        r.ids.push(id);
        r.foreign += usize::from(!own);
    }
    r.ms.sort_by(f64::total_cmp);
    r.create_ms.sort_by(f64::total_cmp);
    Ok(r)
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
    if a.claims == 0 || a.cold == 0 {
        bail!("--claims and --cold must be at least 1");
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
        Arc::new(replica(&sim, pools.clone(), &stop).await?),
        Arc::new(replica(&sim, pools, &stop).await?),
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
        "pool of {} filled in {:.1} s (pod start {} ms)",
        a.claims,
        fill.elapsed().as_secs_f64(),
        a.pod_start_ms
    );

    let cold = round(&clients, None, a.cold, "cold").await?;
    let empty = round(&clients, Some("empty"), a.cold, "empty").await?;
    let warm = round(&clients, Some("bench"), a.claims, "warm").await?;

    let unique: HashSet<&String> = warm.ids.iter().chain(&cold.ids).chain(&empty.ids).collect();
    let all = warm.ids.len() + cold.ids.len() + empty.ids.len();
    let double_claims = (all - unique.len()) + warm.foreign + cold.foreign + empty.foreign;
    let warm_hits = warm.ids.iter().filter(|id| id.starts_with("sp-")).count();

    // Tear down, then count the writes each pooled session cost.
    for id in warm.ids.iter().chain(&cold.ids).chain(&empty.ids) {
        clients[0].teardown(&SessionId(id.clone())).await?;
    }
    let log = sim.request_log();
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
        "warm claims served by a member: {warm_hits} of {}; double claims: {double_claims}; API writes per pooled session: {writes_per_session:.1}",
        warm.ids.len()
    );
    let r = |v: f64| (v * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "pool",
            "claim_p50_ms": r(pct(&warm.ms, 0.5)),
            "claim_p99_ms": r(pct(&warm.ms, 0.99)),
            "cold_p95_ms": r(pct(&cold.ms, 0.95)),
            "empty_pool_p95_ms": r(pct(&empty.ms, 0.95)),
            "double_claims": double_claims,
            "api_writes_per_session": r(writes_per_session),
            "claims": a.claims,
            "warm_hits": warm_hits,
            "pod_start_ms": a.pod_start_ms,
        })
    );
    Ok(())
}
