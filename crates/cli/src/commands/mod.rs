//! One module per subcommand.

pub mod cancel;
pub mod config_check;
pub mod console;
pub mod demo;
pub mod demo_rabbit;
pub mod dlq;
pub mod docs;
pub mod enqueue;
pub mod gateway;
pub mod replay;
pub mod results;
pub mod session;
pub mod sessions;
pub mod shell;
pub mod status;
pub mod task;
pub mod topology;
pub mod worker;
