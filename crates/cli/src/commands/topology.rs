//! `sandfleet topology apply | check | delete`.

use std::io::{BufRead, IsTerminal, Write};

use sandfleet_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sandfleet_amqp::{Amqp, AmqpError, ObjectKind, Topology};
use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::{TopologyCommand, TopologyDeleteArgs};
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::ledger;
use crate::output::{Output, diag};

/// Runs `topology apply`, `check` or `delete`.
pub async fn run(cmd: &TopologyCommand, settings: &Settings, out: Output) -> CliResult<Exit> {
    if let TopologyCommand::Delete(a) = cmd {
        // Asked before connecting: a refusal needs no broker.
        confirm_delete(a, &settings.topology.prefix)?;
    }
    let amqp = broker::connect(settings, "cli").await?;
    let topology = broker::topology(settings);
    match cmd {
        TopologyCommand::Delete(a) => delete(&amqp, &topology, a, out).await,
        TopologyCommand::Apply => {
            topology
                .apply(&amqp)
                .await
                .map_err(broker::topology_error)?;
            for d in topology.declarations() {
                out.emit(
                    format!("declared {} {}", d.kind, d.name),
                    &json!({"declared": d.kind.to_string(), "name": d.name}),
                );
            }
            out.human(format!("topology '{}' applied", topology.prefix));
            Ok(Exit::Ok)
        }
        TopologyCommand::Check => {
            let report = topology
                .check(&amqp)
                .await
                .map_err(broker::topology_error)?;
            for f in &report.findings {
                out.emit(format!("  {f}"), &json!({"finding": f.to_string()}));
            }
            let ok = report.is_ok();
            out.emit(
                if ok {
                    format!(
                        "topology '{}' matches{}",
                        topology.prefix,
                        if report.fully_verified() {
                            ""
                        } else {
                            " (arguments not verified)"
                        }
                    )
                } else {
                    format!(
                        "topology '{}' differs from the broker: run `sandfleet topology apply`",
                        topology.prefix
                    )
                },
                &json!({"ok": ok, "fully_verified": report.fully_verified()}),
            );
            if ok {
                Ok(Exit::Ok)
            } else {
                Err(CliError::Failed(
                    "topology check found differences".to_owned(),
                ))
            }
        }
    }
}

/// `1 message`, `3 messages`.
fn count_messages(n: u64) -> String {
    if n == 1 {
        "1 message".to_owned()
    } else {
        format!("{n} messages")
    }
}

/// `--yes`, or the prefix typed on a terminal.
fn confirm_delete(a: &TopologyDeleteArgs, prefix: &str) -> CliResult<()> {
    if a.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "refusing to delete the topology without confirmation: pass --yes (stdin is not a terminal)"
                .to_owned(),
        ));
    }
    eprint!("Delete every exchange and queue of topology '{prefix}'? Type the prefix to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if line.trim() == prefix {
        Ok(())
    } else {
        Err(CliError::Failed("not deleted".to_owned()))
    }
}

/// What a queue of the topology holds, as far as the broker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// It does not exist.
    Missing,
    /// This many messages (ready and unacknowledged, or retained by a stream).
    Messages(u64),
    /// A stream whose size the management API could not tell.
    Unknown,
}

/// The queues `delete` removes (name, queue type): the topology's, then the
/// replay ledger.
fn queues(topology: &Topology) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = topology
        .declarations()
        .into_iter()
        .filter(|d| d.kind == ObjectKind::Queue)
        .map(|d| (d.name, d.type_))
        .collect();
    out.push((ledger::queue_name(&topology.prefix), "stream".to_owned()));
    out
}

/// Ready messages from a passive declare (exact for quorum and classic
/// queues), plus what the management API adds when it answers: unacked
/// messages, and a stream's retained ones (a passive declare counts none).
async fn content(amqp: &Amqp, name: &str, stream: bool) -> CliResult<Content> {
    let ready = match amqp.queue_depth(name).await {
        Ok(n) => u64::from(n),
        Err(AmqpError::NotFound { .. }) => return Ok(Content::Missing),
        Err(e) => return Err(broker::amqp_error(e)),
    };
    match amqp.management().queue(name).await {
        Ok(Some(q)) => {
            let held = q
                .messages
                .unwrap_or(0)
                .max(q.messages_ready.unwrap_or(0) + q.messages_unacknowledged.unwrap_or(0));
            Ok(Content::Messages(ready.max(held)))
        }
        Ok(None) => Ok(Content::Messages(ready)),
        Err(_) if stream => Ok(Content::Unknown),
        Err(_) => Ok(Content::Messages(ready)),
    }
}

/// Deletes every queue and exchange of the topology (and the replay
/// ledger). Without `--force`, refuses when any queue holds messages, before
/// deleting anything; queues are deleted with `if-empty` then, so one that
/// fills meanwhile is kept.
async fn delete(
    amqp: &Amqp,
    topology: &Topology,
    a: &TopologyDeleteArgs,
    out: Output,
) -> CliResult<Exit> {
    let mut found = Vec::new();
    for (name, kind) in queues(topology) {
        let c = content(amqp, &name, kind == "stream").await?;
        if c != Content::Missing {
            found.push((name, kind, c));
        }
    }
    if !a.force {
        let busy: Vec<String> = found
            .iter()
            .filter_map(|(name, _, c)| match c {
                Content::Messages(0) | Content::Missing => None,
                Content::Messages(n) => Some(format!("{name} ({})", count_messages(*n))),
                Content::Unknown => Some(format!(
                    "{name} (a stream; its size is unknown without the management API)"
                )),
            })
            .collect();
        if !busy.is_empty() {
            return Err(CliError::Failed(format!(
                "refusing to delete topology '{}': not empty: {}. Nothing was deleted; \
                 pass --force to delete these queues with their messages",
                topology.prefix,
                busy.join(", ")
            )));
        }
    }
    let channel = amqp.channel().await.map_err(broker::amqp_error)?;
    for (name, kind, c) in &found {
        // if-empty guards against messages that arrived since the check, but
        // only classic queues take it (quorum queues and streams answer
        // NOT_IMPLEMENTED): for those the check just above is the guard.
        let opts = QueueDeleteOptions {
            if_empty: !a.force && kind == "classic",
            ..Default::default()
        };
        let deleted = channel
            .queue_delete(name.as_str().into(), opts)
            .await
            .map_err(|e| {
                CliError::Failed(format!(
                    "queue '{name}' was not deleted ({e}); it may have received messages since \
                     the check: run again, or pass --force"
                ))
            })?;
        let messages = match c {
            Content::Messages(n) => Some((*n).max(u64::from(deleted))),
            _ => None,
        };
        out.emit(
            match messages {
                Some(n) => format!("deleted queue {name} ({})", count_messages(n)),
                None => format!("deleted queue {name}"),
            },
            &json!({"deleted": "queue", "name": name, "messages": messages}),
        );
    }
    let mut exchanges = 0;
    for d in topology
        .declarations()
        .into_iter()
        .filter(|d| d.kind == ObjectKind::Exchange)
    {
        // exchange.delete of a missing exchange succeeds (RabbitMQ 3.x), so
        // whether it existed is asked first, for honest output.
        let management = amqp.management();
        let existed = match management.exchange(&d.name).await {
            Ok(found) => Some(found.is_some()),
            Err(_) => None,
        };
        channel
            .exchange_delete(d.name.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| CliError::Failed(format!("exchange '{}' was not deleted: {e}", d.name)))?;
        if existed != Some(false) {
            exchanges += 1;
            out.emit(
                format!("deleted exchange {}", d.name),
                &json!({"deleted": "exchange", "name": d.name}),
            );
        }
    }
    let _ = channel.close(200, "OK".into()).await;
    if found.is_empty() && exchanges == 0 {
        out.emit(
            format!(
                "topology '{}' not found: nothing to delete",
                topology.prefix
            ),
            &json!({"deleted_total": 0, "prefix": topology.prefix}),
        );
    } else {
        out.emit(
            format!(
                "topology '{}' deleted: {} queues, {exchanges} exchanges",
                topology.prefix,
                found.len()
            ),
            &json!({"deleted_total": found.len() + exchanges, "prefix": topology.prefix}),
        );
    }
    if a.force
        && found
            .iter()
            .any(|(_, _, c)| !matches!(c, Content::Messages(0)))
    {
        diag("sandfleet: --force: queues were deleted with their messages");
    }
    Ok(Exit::Ok)
}
