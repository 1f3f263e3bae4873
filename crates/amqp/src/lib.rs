//! RabbitMQ for sandfleet: connection pool, topology, confirmed publisher, consumer.
