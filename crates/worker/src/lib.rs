//! The sandfleet worker: dispatch loop, retries, circuit breaker, shutdown, health and metrics.
