//! `sandfleet demo --amqp-url ...`: the same three samples through a real
//! RabbitMQ: a throw-away topology (`sandfleet-demo-<random>`), the real
//! worker with the local executor, the confirmed publisher, and the results
//! stream. The topology is deleted afterwards.

use std::sync::Arc;
use std::time::Duration;

use sandfleet_amqp::StreamOffset;
use sandfleet_gateway::{BrokerSink, TaskSink};
use sandfleet_proto::{TaskId, TaskResult};
use sandfleet_settings::{ExecutorKind, Settings};
use tokio_util::sync::CancellationToken;

use crate::broker;
use crate::commands::demo::Sample;
use crate::commands::results::read_stream;
use crate::exit::{CliError, CliResult};
use crate::output::Output;

/// Runs the samples through RabbitMQ and returns their final results, in order.
pub async fn run(
    samples: &[Sample],
    settings: &Settings,
    wait: Duration,
    out: Output,
) -> CliResult<Vec<TaskResult>> {
    let mut settings = settings.clone();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    settings.topology.prefix = format!("sandfleet-demo-{}", &suffix[..8]);
    settings.worker.executor = ExecutorKind::Local;
    settings.worker.http_addr = "127.0.0.1:0".to_owned();
    settings.worker.name = Some("demo".to_owned());
    out.human(format!(
        "sandfleet demo: RabbitMQ at {}, topology '{}', local executor",
        settings.amqp.url.split('@').next_back().unwrap_or(""),
        settings.topology.prefix
    ));
    let amqp = broker::connect(&settings, "demo").await?;
    let topology = broker::topology(&settings);
    topology
        .apply(&amqp)
        .await
        .map_err(broker::topology_error)?;
    let result = async {
        let stop = CancellationToken::new();
        let worker = tokio::spawn(sandfleet_worker::run(settings.clone(), stop.clone()));
        let sink = Arc::new(
            BrokerSink::new(&amqp, &topology, settings.limits.clone())
                .await
                .map_err(broker::producer_error)?,
        );
        for s in samples {
            sink.enqueue(&s.task)
                .await
                .map_err(|e| CliError::Broker(e.to_string()))?;
            out.human(format!(
                "  enqueued {:<11} {} (confirmed)",
                s.name, s.task.id
            ));
        }
        let ids: Vec<TaskId> = samples.iter().map(|s| s.task.id).collect();
        let mut finals: Vec<Option<TaskResult>> = vec![None; ids.len()];
        let reading = read_stream(
            &amqp,
            &topology.results_stream,
            StreamOffset::First,
            None,
            &stop,
            |r| {
                if r.is_final
                    && let Some(i) = ids.iter().position(|id| *id == r.task_id)
                {
                    finals[i] = Some(r);
                }
                finals.iter().any(Option::is_none)
            },
        );
        let timed_out = tokio::time::timeout(wait, reading).await.is_err();
        stop.cancel();
        match worker.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the demo worker stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "the demo worker panicked"),
            Ok(Ok(())) => {}
        }
        if timed_out {
            return Err(CliError::Failed(format!(
                "the demo did not finish within {wait:?}"
            )));
        }
        Ok(finals.into_iter().flatten().collect())
    }
    .await;
    if let Err(e) = topology.delete(&amqp).await {
        crate::output::diag(format_args!(
            "sandfleet: could not delete the demo topology '{}': {e}",
            topology.prefix
        ));
    }
    result
}
