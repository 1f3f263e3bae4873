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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn global(config: Option<PathBuf>, prefix: Option<&str>) -> GlobalArgs {
        GlobalArgs {
            config,
            json: false,
            amqp_url: None,
            prefix: prefix.map(str::to_owned),
            log: None,
        }
    }

    #[test]
    fn flags_override_env_which_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sandfleet.toml");
        std::fs::write(
            &file,
            "[topology]\nprefix = \"from-file\"\n[worker]\nconcurrency = 7\n",
        )
        .unwrap();
        let env: HashMap<String, String> = [(
            "SANDFLEET__TOPOLOGY__PREFIX".to_owned(),
            "from-env".to_owned(),
        )]
        .into_iter()
        .collect();

        let s = load(&global(Some(file.clone()), None), &HashMap::new()).unwrap();
        assert_eq!(
            (s.topology.prefix.as_str(), s.worker.concurrency),
            ("from-file", 7)
        );
        let s = load(&global(Some(file.clone()), None), &env).unwrap();
        assert_eq!(
            (s.topology.prefix.as_str(), s.worker.concurrency),
            ("from-env", 7)
        );
        let s = load(&global(Some(file), Some("from-flag")), &env).unwrap();
        assert_eq!(s.topology.prefix, "from-flag");
    }

    #[test]
    fn a_missing_or_invalid_config_is_a_usage_error() {
        let err = load(
            &global(Some("/nonexistent/sandfleet.toml".into()), None),
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err}");
        let env: HashMap<String, String> = [(
            "SANDFLEET__WORKER__CONCURRENCY".to_owned(),
            "many".to_owned(),
        )]
        .into_iter()
        .collect();
        let err = load(&global(None, None), &env).unwrap_err();
        assert_eq!(err.exit(), crate::exit::Exit::Usage);
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
    }
}
