//! sandfleet's executors: where a task's steps actually run.
//!
//! A task becomes one POSIX `sh` script ([`script`]) that writes the input
//! files, runs each step with its own timeout and reports per-step exit codes
//! and bounded output. Two executors run that same script behind the
//! [`Executor`] trait:
//!
//! - [`LocalExecutor`]: a child process in a temp directory (the embedded
//!   default, and the fast way to test the script for real);
//! - [`KubeExecutor`]: one Kubernetes Job per attempt, built by the pure
//!   [`job`] module, watched by one shared watcher, its API calls passing an
//!   [`ApiGate`] (the worker's circuit breaker).
//!
//! What an attempt did is decided by the pure [`classify`] module; whether
//! that is retried is [`sandfleet_proto::Outcome::is_retryable`]'s call.
//! Start with [`Executor`], then [`script`].
//!
//! Interactive sessions — a sandbox that stays up and takes commands one at a
//! time through `pods/exec`, from the same hardened pod builder — are the
//! [`session`] module.

pub mod classify;
mod executor;
pub mod gate;
pub mod kubernetes;
pub mod local;
pub mod report;
mod rundir;
pub mod script;
pub mod session;

pub use executor::{Clearance, ExecError, Execution, Executor, RunContext};
pub use gate::{ApiGate, CallClass, GateClosed, NoGate, RecordingGate};
pub use kubernetes::{ApiRetry, KubeApi, KubeExecutor, REQUIRED_PERMISSIONS, job};
pub use local::LocalExecutor;
