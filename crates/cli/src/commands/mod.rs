//! One module per subcommand.

pub mod demo;
pub mod demo_rabbit;
pub mod dlq;
pub mod enqueue;
pub mod gateway;
pub mod replay;
pub mod results;
pub mod topology;
pub mod worker;
