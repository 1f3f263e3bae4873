//! The operator console: the fleet on one web page, served by
//! `sandfleet console`.
//!
//! - [`fleet`] gathers what the pages show: queue depths from the broker,
//!   each worker's readiness, breaker and running attempts from its HTTP
//!   endpoints, sessions from the sessions service, and the results stream
//!   kept in memory. It publishes a fresh overview on a watch channel, which
//!   the overview page follows through server-sent events.
//! - [`auth`] decides who may read and who may act: tokens with roles
//!   (settings section `console`), a sign-in cookie (`HttpOnly`,
//!   `SameSite=Strict`) bound to a per-session CSRF token, and an `Origin`
//!   check on every form post.
//! - [`pages`] renders HTML on the server: every page works without
//!   JavaScript; a small script (embedded, like the stylesheet) only swaps in
//!   the live overview.
//! - [`server`] wires the routes. The actions (requeue, purge, replay) call
//!   `sandfleet_ops`, the same code as the CLI.
//!
//! Start with [`server::Console::start`].

pub mod auth;
pub mod fleet;
pub mod pages;
pub mod server;

pub use server::{Console, ConsoleError};
