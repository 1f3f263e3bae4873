//! `sandfleet sessions`: the sessions service, until SIGTERM/SIGINT, over
//! Kubernetes (`sessions.backend = "kubernetes"`, the default) or on this
//! host (`local`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sandfleet_sandbox::session::{KubeSessions, LocalSessions};
use sandfleet_sessions::auth::Tokens;
use sandfleet_sessions::{Limits, Service};
use sandfleet_settings::{SessionBackendKind, Settings};
use tokio_util::sync::CancellationToken;

use crate::exit::{CliError, CliResult, Exit};

/// `sandfleet sessions`.
#[derive(Debug, Clone, Args)]
pub struct SessionsArgs {
    /// Where sessions run: `kubernetes` or `local`; overrides `sessions.backend`.
    #[arg(long, value_name = "KIND")]
    pub backend: Option<String>,
    /// Listen address.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8081")]
    pub listen: String,
    /// File with the accepted bearer tokens, one per line (a mounted Secret).
    #[arg(long, value_name = "FILE", env = "SANDFLEET_SESSIONS_TOKENS_FILE")]
    pub tokens_file: PathBuf,
    /// Sessions one token may hold at once.
    #[arg(long, default_value_t = Limits::default().sessions_per_token)]
    pub max_sessions_per_token: usize,
    /// Longest max lifetime a session may ask for, in seconds.
    #[arg(long, default_value_t = Limits::default().max_lifetime.as_secs())]
    pub max_lifetime_secs: u64,
    /// Longest idle timeout a session may ask for, in seconds.
    #[arg(long, default_value_t = Limits::default().max_idle_timeout.as_secs())]
    pub max_idle_timeout_secs: u64,
    /// Largest file written or read in one request, in bytes.
    #[arg(long, default_value_t = Limits::default().max_file_bytes)]
    pub max_file_bytes: usize,
    /// Longest command timeout, in seconds.
    #[arg(long, default_value_t = Limits::default().max_command_timeout.as_secs())]
    pub max_command_timeout_secs: u64,
    /// Warm-pool claims this replica has under way at once; more wait their
    /// turn, in arrival order.
    #[arg(long, default_value_t = Limits::default().claims_in_flight)]
    pub max_claims_in_flight: usize,
    /// How often ended sessions are deleted, in seconds.
    #[arg(long, default_value_t = 30)]
    pub reap_interval_secs: u64,
}

/// Serves the sessions API over the cluster of `sandbox.kubernetes`, or
/// with local sessions.
pub async fn run(
    a: &SessionsArgs,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> CliResult<Exit> {
    if let Some(b) = &a.backend {
        settings.sessions.backend = match b.as_str() {
            "kubernetes" => SessionBackendKind::Kubernetes,
            "local" => SessionBackendKind::Local,
            other => {
                return Err(CliError::Usage(format!(
                    "--backend {other:?}: expected kubernetes or local"
                )));
            }
        };
    }
    // Warm pools with the local backend are refused here, before anything starts.
    settings
        .validate()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let text = std::fs::read_to_string(&a.tokens_file)
        .map_err(|e| CliError::Usage(format!("--tokens-file {}: {e}", a.tokens_file.display())))?;
    let tokens = Tokens::from_tokens(text.lines());
    if tokens.is_empty() {
        return Err(CliError::Usage(format!(
            "--tokens-file {} holds no token: every request would be refused",
            a.tokens_file.display()
        )));
    }
    if a.max_claims_in_flight == 0 {
        return Err(CliError::Usage(
            "--max-claims-in-flight must be at least 1: no warm-pool claim could start".into(),
        ));
    }
    let limits = Limits {
        sessions_per_token: a.max_sessions_per_token,
        max_lifetime: Duration::from_secs(a.max_lifetime_secs),
        max_idle_timeout: Duration::from_secs(a.max_idle_timeout_secs),
        max_file_bytes: a.max_file_bytes,
        max_command_timeout: Duration::from_secs(a.max_command_timeout_secs),
        claims_in_flight: a.max_claims_in_flight,
        ..Limits::default()
    };
    let token_count = tokens.len();
    let service = match settings.sessions.backend {
        SessionBackendKind::Kubernetes => {
            let backend = KubeSessions::infer(settings.sandbox.kubernetes.clone())
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
            let pools = sandfleet_sessions::pool::templates(&settings.sessions);
            for p in &pools {
                tracing::info!(pool = %p.name, size = p.size, image = %p.image, "warm pool");
            }
            Service::with_pools(backend, tokens, limits, pools)
        }
        SessionBackendKind::Local => {
            tracing::warn!(
                "local backend: sessions run as child processes of this service, with no isolation"
            );
            Service::local(LocalSessions::new(), tokens, limits)
        }
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {}: {e}", a.listen)))?;
    tracing::info!(
        listen = %a.listen,
        tokens = token_count,
        backend = ?settings.sessions.backend,
        "sessions service listening"
    );
    service
        .run(
            listener,
            Duration::from_secs(a.reap_interval_secs.max(1)),
            shutdown,
        )
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!("sessions service stopped");
    Ok(Exit::Ok)
}
