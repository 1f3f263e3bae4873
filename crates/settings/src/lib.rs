//! sandfleet's configuration.
//!
//! One struct per component ([`AmqpSettings`], [`TopologySettings`],
//! [`WorkerSettings`], [`BreakerSettings`], [`RetrySettings`],
//! [`SandboxSettings`], [`GatewaySettings`], [`TelemetrySettings`], and the
//! task [`Limits`](sandfleet_proto::Limits)), gathered in [`Settings`]. Each
//! component is handed only its own section. Every field has
//! a default, so an empty configuration is a working one (local executor,
//! RabbitMQ on localhost).
//!
//! Loading (defaults → optional `sandfleet.toml` → `SANDFLEET__SECTION__KEY`
//! environment variables) and validation live in [`load()`]: start there.
//! `docs/configuration.md` lists every key, its default and its env var.

pub mod load;
mod sections;

pub use load::{SettingError, Settings, SettingsError, load};
pub use sections::*;
