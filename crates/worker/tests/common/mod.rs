//! What the worker's broker tests share: a connection to the real RabbitMQ
//! (127.0.0.1:5672, `AMQP_ADDR` overrides) and names no other test uses.

#![allow(dead_code, clippy::expect_used)]

use sandfleet_amqp::Amqp;
use sandfleet_settings::AmqpSettings;

/// `<kind>-<name>-<8 hex digits>`: a topology prefix of this test alone.
pub(crate) fn unique_prefix(kind: &str, name: &str) -> String {
    format!(
        "{kind}-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Connects as `connection_name` (what a test looks up to close the
/// connection), reconnecting after at most a second.
pub(crate) async fn connect(connection_name: &str, role: &str) -> Amqp {
    let settings = AmqpSettings {
        url: std::env::var("AMQP_ADDR")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        connection_name: Some(connection_name.to_owned()),
        reconnect_max_delay_secs: 1,
        ..AmqpSettings::default()
    };
    Amqp::connect(&settings, role)
        .await
        .expect("RabbitMQ must run on 127.0.0.1:5672 for these tests")
}
