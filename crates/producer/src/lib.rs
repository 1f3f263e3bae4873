//! Publish sandfleet tasks to RabbitMQ with publisher confirms.
