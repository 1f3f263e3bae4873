//! The sessions service: sandfleet's interactive sandboxes over HTTP.
//!
//! An agent opens a session (`POST /v1/sessions`), runs commands in it
//! (`POST /v1/sessions/{id}/run`, also streamed as NDJSON), moves files
//! (`PUT`/`GET /v1/sessions/{id}/files?path=`), and deletes it. Every request
//! carries a bearer token; a session is visible only to the token that made
//! it ([`auth`]). The service keeps no state of its own: a session is a Job
//! labelled with the owner's token hash (never the token), so any replica
//! serves any session and a restart loses none. Sessions that end by
//! themselves (idle timeout, max lifetime) are deleted by a periodic reaper.
//!
//! Warm pools ([`pool`]) keep idle sandboxes ready: a create that names a
//! pool claims one instead of waiting for a pod to start.
//!
//! Sessions run on Kubernetes in production; the [`backend`] can also run
//! them as local child processes of a single replica (no pools, no
//! isolation), for trying the service out and for the client packages' tests.
//!
//! Where to start: [`server::Service`], then [`client::SessionsClient`] (the
//! same [`SessionBackend`](sandfleet_sandbox::session::SessionBackend)
//! contract, over HTTP). Limits are in [`limits`], metrics in [`metrics`].

pub mod auth;
pub mod backend;
pub mod client;
mod error;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod wire;

pub use client::SessionsClient;
pub use error::ApiError;
pub use limits::Limits;
pub use server::Service;
