//! Signal handling for the long-running commands.
//!
//! The first SIGTERM or SIGINT cancels the returned token: the process drains
//! (stops taking work, finishes what it holds). A second one exits at once
//! with status 130, saying so on stderr. Those messages are written so that
//! a closed stderr cannot stop the watcher (a panic here would leave the
//! process deaf to signals).

use tokio_util::sync::CancellationToken;

use crate::exit::Exit;

/// Spawns the signal watcher and returns the token it cancels on the first
/// signal; `what` names what the first signal starts (`draining` for the
/// long-running processes, `stopping` otherwise). Must be called inside a
/// tokio runtime.
pub fn shutdown_token(what: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let first = next_signal().await;
        crate::output::diag(format_args!(
            "sandfleet: received {first}; {what} (send it again to exit at once)"
        ));
        t.cancel();
        let second = next_signal().await;
        crate::output::diag(format_args!(
            "sandfleet: received {second} again; exiting now without draining"
        ));
        std::process::exit(i32::from(Exit::Interrupted.code()));
    });
    token
}

#[cfg(unix)]
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    // Installing a handler fails only when the OS refuses; then fall back to
    // Ctrl-C alone rather than ignoring signals.
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn next_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
