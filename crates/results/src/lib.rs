//! Publish and subscribe to sandfleet results (RabbitMQ stream).
