//! Reading the results stream: one consumer from an offset or a time, one
//! decoded result at a time.

use std::time::Duration;

use sandfleet_amqp::{Amqp, Consumer, ConsumerOptions, StreamOffset};
use sandfleet_proto::TaskResult;
use tokio_util::sync::CancellationToken;

use crate::OpsError;

/// What [`StreamReader::next`] found.
#[derive(Debug)]
pub enum Next {
    /// A decoded result.
    Result(Box<TaskResult>),
    /// The idle timeout passed without a message: caught up with the stream.
    Idle,
    /// Shutdown (a signal, or stdout's reader left) or the consumer ended.
    End,
}

/// A results-stream reader: one consumer, read one message at a time.
/// Undecodable messages are skipped with a warning.
pub struct StreamReader {
    consumer: Consumer,
}

impl StreamReader {
    /// Subscribes to `stream` at `offset`; `tag` names the consumer in the
    /// management UI.
    pub async fn open(
        amqp: &Amqp,
        stream: &str,
        offset: StreamOffset,
        tag: &str,
    ) -> Result<StreamReader, OpsError> {
        let opts = ConsumerOptions::new(stream, 500)
            .stream_offset(offset)
            .tag(tag);
        let consumer = Consumer::start(amqp, opts).await?;
        Ok(StreamReader { consumer })
    }

    /// The next result; [`Next::Idle`] after `idle` without a message (when
    /// set), [`Next::End`] once `shutdown` fires.
    pub async fn next(&mut self, idle: Option<Duration>, shutdown: &CancellationToken) -> Next {
        loop {
            let next = async {
                match idle {
                    Some(d) => tokio::time::timeout(d, self.consumer.next_delivery()).await,
                    None => Ok(self.consumer.next_delivery().await),
                }
            };
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Next::End,
                d = next => d,
            };
            let d = match delivery {
                Err(_elapsed) => return Next::Idle,
                Ok(None) => return Next::End,
                Ok(Some(d)) => d,
            };
            // Stream consumers must ack to receive more (credit); acking
            // does not remove anything.
            let _ = d.ack().await;
            match serde_json::from_slice::<TaskResult>(d.body()) {
                Ok(r) => return Next::Result(Box::new(r)),
                Err(e) => {
                    tracing::warn!(offset = ?d.stream_offset(), error = %e, "skipping a message that is not a result")
                }
            }
        }
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.consumer.cancel();
    }
}
