//! The sandfleet message contract, version 1.
//!
//! Everything that crosses the broker is defined here: the [`Task`] a producer
//! publishes, the [`TaskResult`] a worker publishes back, and the [`Outcome`]
//! taxonomy that decides, in one place, which failures are retried as new
//! attempts and which are final. The crate does no I/O: it knows serde, not
//! lapin or kube, so every other crate (and every non-Rust producer, through the
//! JSON Schema in `schemas/`) can depend on it.
//!
//! Start with [`Task`] and [`TaskResult`]; [`validate()`] checks a task against
//! the [`Limits`] that protect the fleet, and [`validate_intake`] adds the
//! consumer-timeout [`budget`] every intake checks before it publishes;
//! [`decode_task`] turns raw message bytes into a validated task or a
//! [`RejectReason`].

pub mod budget;
pub mod cancel;
pub mod decode;
pub mod fairness;
pub mod image;
pub mod limits;
pub mod outcome;
pub mod quantity;
pub mod result;
pub mod schema;
pub mod task;
pub mod validate;

pub use budget::{
    CONSUMER_TIMEOUT_MARGIN, DEADLINE_TOO_LONG_CODE, DeadlineTooLong, check_consumer_timeout,
};
pub use cancel::{
    CANCELLATION_MESSAGE_TYPE, CancelInfo, CancelTarget, Cancellation, supersede_key_for,
};
pub use decode::{RejectReason, decode_task, encode_task};
pub use fairness::{FairKey, Fairness, MAX_FAIRNESS_KEY_BYTES, default_tenant, shard_for};
pub use image::ImageRef;
pub use limits::Limits;
pub use outcome::Outcome;
pub use quantity::Quantity;
pub use result::{Artifact, StepResult, TaskResult, Timings};
pub use task::{
    InputFile, Provider, Resources, RetryPolicy, SandboxSpec, Source, Step, Task, TaskId, TaskKind,
};
pub use validate::{
    FieldError, RESERVED_ENV_NAMES, RESERVED_ENV_PREFIX, RESERVED_ENV_PREFIXES, ValidationErrors,
    is_reserved_env, validate, validate_intake,
};

/// The schema version this crate reads and writes. Messages carry it in
/// `schema_version`; any other value is rejected with a clear reason.
pub const SCHEMA_VERSION: u32 = 1;

/// AMQP `type` property of a task message.
pub const TASK_MESSAGE_TYPE: &str = "sandfleet.task.v1";
/// AMQP `type` property of a result message.
pub const RESULT_MESSAGE_TYPE: &str = "sandfleet.result.v1";
/// Content type of every sandfleet message.
pub const CONTENT_TYPE: &str = "application/json";
