//! Exit codes and the CLI's error type.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | failure (the operation failed, or `topology check` found a difference) |
//! | 2 | usage or configuration error (bad flag, bad setting, unreadable file, invalid task) |
//! | 3 | broker unavailable (cannot connect, or it did not confirm) |
//! | 4 | partial failure (some items of a batch failed, the rest succeeded) |
//! | 5 | topology missing (an exchange or queue the command needs does not exist: run `sandfleet topology apply`) |
//! | 130 | interrupted (a second Ctrl-C / SIGTERM) |

use std::process::ExitCode;

/// A meaningful process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok,
    /// 1: failure.
    Failure,
    /// 2: usage or configuration error.
    Usage,
    /// 3: broker unavailable.
    BrokerUnavailable,
    /// 4: partial failure.
    Partial,
    /// 5: an exchange or queue the command needs does not exist.
    TopologyMissing,
    /// 130: interrupted by a second signal.
    Interrupted,
}

impl Exit {
    /// The numeric exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::BrokerUnavailable => 3,
            Exit::Partial => 4,
            Exit::TopologyMissing => 5,
            Exit::Interrupted => 130,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// Why a command failed; each variant maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags, bad configuration, an unreadable or invalid input (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The broker could not be reached or did not confirm (exit 3).
    #[error("broker unavailable: {0}")]
    Broker(String),
    /// The operation failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// An exchange or queue the command needs does not exist (exit 5): the
    /// topology was never applied for this prefix, or was deleted.
    #[error(
        "{0} does not exist on the broker: the topology is not applied for this prefix. \
         Run `sandfleet topology apply` (with the same --prefix) to create it"
    )]
    TopologyMissing(String),
}

impl CliError {
    /// The exit status this error means.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Broker(_) => Exit::BrokerUnavailable,
            CliError::Failed(_) => Exit::Failure,
            CliError::TopologyMissing(_) => Exit::TopologyMissing,
        }
    }

    /// True when trying again later may succeed (the broker may come back).
    pub fn is_transient(&self) -> bool {
        matches!(self, CliError::Broker(_))
    }
}

/// Shorthand for command results.
pub type CliResult<T> = Result<T, CliError>;
