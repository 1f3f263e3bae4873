//! Asking a worker how it is doing, through its HTTP endpoints: readiness
//! (`/readyz`, with the reasons), breaker state and in-flight count
//! (`/metrics`), and the attempts it runs now (`/tasks`).

pub use sandfleet_worker::health::RunningTask;
use serde::Serialize;

/// What one worker's HTTP endpoints said.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkerStatus {
    /// The URL given.
    pub url: String,
    /// `/readyz` answered 200; `None` when it could not be asked.
    pub ready: Option<bool>,
    /// Why it is not ready, one reason per line of `/readyz`.
    pub reasons: Vec<String>,
    /// `closed`, `half-open` or `open`, from `sandfleet_breaker_state`.
    pub breaker: Option<String>,
    /// Tasks running now, from `sandfleet_tasks_in_flight`.
    pub in_flight: Option<u64>,
    /// The attempts it runs now, from `/tasks`; `None` when it could not
    /// say (an older worker without `/tasks`).
    pub running: Option<Vec<RunningTask>>,
    /// Why the worker could not be reached.
    pub error: Option<String>,
}

/// The value of an unlabelled sample `name` in Prometheus text format.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (metric, value) = l.split_once(' ')?;
        (metric == name).then(|| value.split_whitespace().next()?.parse().ok())?
    })
}

/// The breaker gauge as a word (0 closed, 1 half-open, 2 open).
pub fn breaker_name(v: f64) -> String {
    match v as i64 {
        0 => "closed",
        1 => "half-open",
        2 => "open",
        _ => "unknown",
    }
    .to_owned()
}

/// `url` with a scheme and without a trailing slash.
pub fn base_url(url: &str) -> String {
    let base = url.trim_end_matches('/');
    if base.contains("://") {
        base.to_owned()
    } else {
        format!("http://{base}")
    }
}

/// Asks one worker's `/readyz`, `/metrics` and `/tasks`.
pub async fn probe(client: &reqwest::Client, url: &str) -> WorkerStatus {
    probe_with_metrics(client, url).await.0
}

/// [`probe`], and the `/metrics` text it read (`None` when the worker could
/// not be reached or did not answer it), for callers that read more of it.
pub async fn probe_with_metrics(
    client: &reqwest::Client,
    url: &str,
) -> (WorkerStatus, Option<String>) {
    let base = base_url(url);
    let mut status = WorkerStatus {
        url: url.to_owned(),
        ..WorkerStatus::default()
    };
    match client.get(format!("{base}/readyz")).send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let body = resp.text().await.unwrap_or_default();
            status.ready = Some(ok);
            if !ok {
                status.reasons = body
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
        }
        Err(e) => {
            status.error = Some(format!("GET {base}/readyz: {e}"));
            return (status, None);
        }
    }
    let mut metrics = None;
    if let Ok(resp) = client.get(format!("{base}/metrics")).send().await
        && resp.status().is_success()
        && let Ok(text) = resp.text().await
    {
        status.breaker = metric_value(&text, "sandfleet_breaker_state").map(breaker_name);
        status.in_flight = metric_value(&text, "sandfleet_tasks_in_flight").map(|v| v as u64);
        metrics = Some(text);
    }
    status.running = running(client, url).await.ok();
    (status, metrics)
}

/// The attempts a worker runs now, from its `/tasks`.
pub async fn running(client: &reqwest::Client, url: &str) -> Result<Vec<RunningTask>, String> {
    let base = base_url(url);
    let resp = client
        .get(format!("{base}/tasks"))
        .send()
        .await
        .map_err(|e| format!("GET {base}/tasks: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {base}/tasks: {}", resp.status()));
    }
    resp.json()
        .await
        .map_err(|e| format!("GET {base}/tasks: {e}"))
}
