//! `sandfleet topology apply | check`.

use sandfleet_settings::Settings;
use serde_json::json;

use crate::args::TopologyCommand;
use crate::broker;
use crate::exit::{CliError, CliResult, Exit};
use crate::output::Output;

/// Runs `topology apply` or `topology check`.
pub async fn run(cmd: &TopologyCommand, settings: &Settings, out: Output) -> CliResult<Exit> {
    let amqp = broker::connect(settings, "cli").await?;
    let topology = broker::topology(settings);
    match cmd {
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
