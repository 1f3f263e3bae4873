//! Where results go: the [`ResultSink`] trait, with the RabbitMQ results
//! publisher in production and [`MemoryResults`] for tests and the demo.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sandfleet_proto::TaskResult;
use tokio::sync::broadcast;

/// Why a result could not be published.
#[derive(Debug, Clone, thiserror::Error)]
#[error("result not published: {message}")]
pub struct SinkError {
    /// What went wrong.
    pub message: String,
}

impl SinkError {
    /// A sink error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        SinkError {
            message: message.into(),
        }
    }

    /// Always true: a result publish is worth retrying (the delivery is
    /// released and the redelivery republishes).
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// Publishes results; `Ok` means the broker confirmed it.
#[async_trait]
pub trait ResultSink: Send + Sync + 'static {
    /// Publishes one result with its trace context.
    async fn publish(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), SinkError>;
}

#[async_trait]
impl<S: ResultSink + ?Sized> ResultSink for Arc<S> {
    async fn publish(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), SinkError> {
        (**self).publish(result, traceparent).await
    }
}

/// A result with the trace context it was published with.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedResult {
    /// The result.
    pub result: TaskResult,
    /// Its `traceparent` header.
    pub traceparent: Option<String>,
}

/// An in-memory result log: keeps every published result and broadcasts it
/// to subscribers (the demo tails it).
#[derive(Debug, Clone)]
pub struct MemoryResults {
    log: Arc<Mutex<Vec<PublishedResult>>>,
    tx: broadcast::Sender<PublishedResult>,
}

impl Default for MemoryResults {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(1024);
        MemoryResults {
            log: Arc::default(),
            tx,
        }
    }
}

impl MemoryResults {
    /// An empty log.
    pub fn new() -> Self {
        MemoryResults::default()
    }

    /// Every result published so far, in order.
    pub fn all(&self) -> Vec<PublishedResult> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The results, without trace context.
    pub fn results(&self) -> Vec<TaskResult> {
        self.all().into_iter().map(|p| p.result).collect()
    }

    /// Results published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PublishedResult> {
        self.tx.subscribe()
    }
}

#[async_trait]
impl ResultSink for MemoryResults {
    async fn publish(
        &self,
        result: &TaskResult,
        traceparent: Option<&str>,
    ) -> Result<(), SinkError> {
        let p = PublishedResult {
            result: result.clone(),
            traceparent: traceparent.map(str::to_owned),
        };
        self.log
            .lock()
            .map_err(|_| SinkError::new("result log poisoned"))?
            .push(p.clone());
        // No subscriber is fine.
        let _ = self.tx.send(p);
        Ok(())
    }
}
