//! `sandfleet status`: the fleet at a glance, like `celery inspect` and
//! `celery status` together.
//!
//! - **Queues** of the topology with ready, unacknowledged and consumer
//!   counts, from the RabbitMQ management API (no message is touched).
//! - **Consumers of the task queue**: every worker connected to the broker,
//!   named by its connection (`sandfleet-worker@<host>`), with the deliveries
//!   it holds unacknowledged: its tasks in flight. Needs nothing from the
//!   workers, so it also finds workers nobody listed.
//! - **Workers given with `--worker URL`**: readiness from `/readyz` (with the
//!   reasons a worker is not ready: breaker open, permission denied, draining),
//!   breaker state and in-flight count from `/metrics`, the attempts it runs
//!   from `/tasks`.

use std::time::Duration;

use sandfleet_amqp::{Amqp, ObjectKind, QueueConsumer, QueueInfo};
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::StatusArgs;
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

// Shared with the operator console.
pub use sandfleet_ops::workers::{WorkerStatus, breaker_name, metric_value, probe};

/// Runs `sandfleet status`.
pub async fn run(a: &StatusArgs, settings: &Settings, out: Output) -> CliResult<Exit> {
    let amqp = Amqp::lazy(&settings.amqp, "cli").map_err(broker::amqp_error)?;
    let amqp = match &a.management_url {
        Some(url) => amqp.with_management_url(url.trim_end_matches('/')),
        None => amqp,
    };
    let mgmt = amqp.management();
    let topology = broker::topology(settings);
    let unreachable = |e: sandfleet_amqp::AmqpError| {
        CliError::Broker(format!(
            "the RabbitMQ management API at {} did not answer ({e}); `sandfleet status` reads queue figures from it (--management-url to point elsewhere)",
            mgmt.base_url()
        ))
    };
    let queues = mgmt
        .queues_with_prefix(&format!("{}.", topology.prefix))
        .await
        .map_err(unreachable)?;
    let consumers = mgmt
        .queue_consumers(&topology.tasks_queue)
        .await
        .map_err(unreachable)?;
    let expected: Vec<String> = topology
        .declarations()
        .into_iter()
        .filter(|d| d.kind == ObjectKind::Queue)
        .map(|d| d.name)
        .collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|name| !queues.iter().any(|q| &q.name == *name))
        .collect();

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| CliError::Failed(format!("HTTP client: {e}")))?;
    let workers = probe_all(&client, &a.workers).await;

    if out.json {
        out.json(&json!({
            "prefix": topology.prefix,
            "queues": queues.iter().map(queue_json).collect::<Vec<_>>(),
            "missing_queues": missing,
            "consumers": consumers.iter().map(consumer_json).collect::<Vec<_>>(),
            "workers": workers,
        }));
    } else {
        out.human(render(
            &topology.prefix,
            &queues,
            &missing,
            &consumers,
            &workers,
        ));
    }
    let healthy = missing.is_empty() && workers.iter().all(|w| w.ready == Some(true));
    Ok(if healthy { Exit::Ok } else { Exit::Failure })
}

/// Probes the workers concurrently (their timeouts do not add up), in the
/// order given.
async fn probe_all(client: &reqwest::Client, urls: &[String]) -> Vec<WorkerStatus> {
    let mut set = tokio::task::JoinSet::new();
    for (i, url) in urls.iter().enumerate() {
        let client = client.clone();
        let url = url.clone();
        set.spawn(async move { (i, probe(&client, &url).await) });
    }
    let mut out = Vec::with_capacity(urls.len());
    while let Some(joined) = set.join_next().await {
        if let Ok(pair) = joined {
            out.push(pair);
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, s)| s).collect()
}

fn queue_json(q: &QueueInfo) -> serde_json::Value {
    json!({
        "name": q.name,
        "type": q.kind,
        "ready": q.messages_ready,
        "unacked": q.messages_unacknowledged,
        "messages": q.messages,
        "consumers": q.consumers,
    })
}

fn consumer_json(c: &QueueConsumer) -> serde_json::Value {
    json!({
        "connection": c.connection,
        "peer": c.peer,
        "tag": c.tag,
        "prefetch": c.prefetch,
        "unacked": c.unacked,
    })
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The human report.
pub fn render(
    prefix: &str,
    queues: &[QueueInfo],
    missing: &[&String],
    consumers: &[QueueConsumer],
    workers: &[WorkerStatus],
) -> String {
    let mut s = format!(
        "QUEUES ({prefix})\n{:<40} {:<8} {:>8} {:>8} {:>9}\n",
        "NAME", "TYPE", "READY", "UNACKED", "CONSUMERS"
    );
    for q in queues {
        // A stream keeps what it holds: its count is "retained", not "ready".
        let ready = if q.kind == "stream" {
            format!("{} kept", num(q.messages))
        } else {
            num(q.messages_ready)
        };
        s.push_str(&format!(
            "{:<40} {:<8} {:>8} {:>8} {:>9}\n",
            q.name,
            q.kind,
            ready,
            num(q.messages_unacknowledged),
            num(q.consumers)
        ));
    }
    for m in missing {
        s.push_str(&format!(
            "{m:<40} missing: run `sandfleet topology apply`\n"
        ));
    }
    s.push_str(&format!(
        "\nCONSUMERS OF THE TASK QUEUE ({})\n",
        consumers.len()
    ));
    if consumers.is_empty() {
        s.push_str("  none: no worker is consuming\n");
    } else {
        s.push_str(&format!(
            "{:<48} {:<22} {:>8} {:>8}\n",
            "CONNECTION", "PEER", "IN FLIGHT", "PREFETCH"
        ));
        for c in consumers {
            s.push_str(&format!(
                "{:<48} {:<22} {:>8} {:>8}\n",
                c.connection, c.peer, c.unacked, c.prefetch
            ));
        }
    }
    if !workers.is_empty() {
        s.push_str(&format!("\nWORKERS ({})\n", workers.len()));
        s.push_str(&format!(
            "{:<36} {:<10} {:<10} {:>9}  REASONS\n",
            "URL", "READY", "BREAKER", "IN FLIGHT"
        ));
        for w in workers {
            let ready = match (w.ready, &w.error) {
                (_, Some(_)) => "unreachable",
                (Some(true), _) => "yes",
                (Some(false), _) => "no",
                (None, None) => "-",
            };
            let reasons = match &w.error {
                Some(e) => e.clone(),
                None => w.reasons.join("; "),
            };
            s.push_str(&format!(
                "{:<36} {:<10} {:<10} {:>9}  {}\n",
                w.url,
                ready,
                w.breaker.as_deref().unwrap_or("-"),
                num(w.in_flight),
                reasons
            ));
        }
        for w in workers {
            for t in w.running.iter().flatten() {
                s.push_str(&format!(
                    "  {} runs {} attempt {} ({}) since {}\n",
                    w.url,
                    t.task_id,
                    t.attempt,
                    t.repository,
                    t.started_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
        }
    }
    s.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_unlabelled_samples_from_prometheus_text() {
        let text = "# HELP sandfleet_tasks_in_flight Tasks running\n\
                    # TYPE sandfleet_tasks_in_flight gauge\n\
                    sandfleet_tasks_in_flight 3\n\
                    sandfleet_breaker_state 2\n\
                    sandfleet_tasks_total{outcome=\"failed\"} 4\n";
        assert_eq!(metric_value(text, "sandfleet_tasks_in_flight"), Some(3.0));
        assert_eq!(
            metric_value(text, "sandfleet_breaker_state").map(breaker_name),
            Some("open".to_owned())
        );
        assert_eq!(metric_value(text, "sandfleet_tasks_total"), None);
    }
}
