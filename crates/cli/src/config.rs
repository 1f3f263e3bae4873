//! Settings for a command: defaults → file → `SANDFLEET__*` env → flags.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sandfleet_settings::Settings;

use crate::args::GlobalArgs;
use crate::exit::{CliError, CliResult};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "sandfleet.toml";

/// Which file to read: `--config` (must exist), else `./sandfleet.toml` when present.
pub fn config_file(global: &GlobalArgs) -> CliResult<Option<PathBuf>> {
    match &global.config {
        Some(p) if p.is_file() => Ok(Some(p.clone())),
        Some(p) => Err(CliError::Usage(format!(
            "config file {} does not exist",
            p.display()
        ))),
        None => {
            let p = Path::new(DEFAULT_CONFIG_FILE);
            Ok(p.is_file().then(|| p.to_path_buf()))
        }
    }
}

/// Loads the settings with the given environment (the process's, or a test's
/// map), then applies the global flags, which win.
pub fn load(global: &GlobalArgs, env: &HashMap<String, String>) -> CliResult<Settings> {
    let file = config_file(global)?;
    let mut settings = sandfleet_settings::load(file.as_deref(), env)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(url) = &global.amqp_url {
        settings.amqp.url.clone_from(url);
    }
    if let Some(prefix) = &global.prefix {
        settings.topology.prefix.clone_from(prefix);
    }
    if let Some(filter) = &global.log {
        settings.telemetry.log_filter.clone_from(filter);
    }
    Ok(settings)
}
