//! The connection pool: [`Amqp`] hands out channels on pooled connections and
//! reopens them, with jittered exponential backoff, after the broker or the
//! network dropped them.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use deadpool_lapin::{PoolConfig, Runtime, Timeouts};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, ConnectionProperties};
use sandfleet_settings::AmqpSettings;

use crate::error::{AmqpError, REPLY_NOT_FOUND, reply_code};
use crate::management::Management;

/// A handle on RabbitMQ: pools of connections (deadpool-lapin) that open
/// channels. Cheap to clone; clones share the pools.
///
/// Publishing and consuming use separate connections (two pools of up to
/// `amqp.pool_size` each): when the broker blocks a publishing connection
/// (memory or disk alarm, flow control) it stops reading from it, and acks
/// of consumers on the same connection would be stuck behind the publishes.
/// Channels share a connection; a pool grows only under concurrent opens.
///
/// Connections are named `sandfleet-<component>@<host>#p<n>` (publishing) and
/// `...#c<n>` (consuming, declaring), or `<amqp.connection_name>#p<n>`, so an
/// operator can tell in the management UI which process holds which
/// connection, and tests can close exactly theirs.
/// Heartbeats (`amqp.heartbeat_secs`) detect dead peers; a connection the
/// broker or the network closed is discarded by the pool and replaced on the
/// next [`channel`](Amqp::channel). TLS is used when the URL is `amqps://`.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

struct Inner {
    /// Consumers and declarations.
    pool: deadpool_lapin::Pool,
    /// Publishers.
    publish_pool: deadpool_lapin::Pool,
    settings: AmqpSettings,
    name: String,
    uri: AMQPUri,
    /// Overrides the management API base URL derived from the AMQP URL.
    management_url: Option<String>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp")
            .field("endpoint", &self.endpoint())
            .field("connection_name", &self.inner.name)
            .finish()
    }
}

impl Amqp {
    /// Builds the pool and opens one connection to prove the broker is
    /// reachable with these settings. Fails fast (one attempt, bounded by
    /// `amqp.connect_timeout_secs`); callers that must wait for the broker
    /// retry while [`AmqpError::is_transient`] holds, or use
    /// [`Amqp::lazy`] and [`Amqp::channel_with_retry`].
    ///
    /// Must be called inside a tokio runtime.
    pub async fn connect(settings: &AmqpSettings, component: &str) -> Result<Amqp, AmqpError> {
        let amqp = Amqp::lazy(settings, component)?;
        amqp.channel().await?;
        Ok(amqp)
    }

    /// Builds the pool without connecting; the first [`channel`](Amqp::channel)
    /// connects. Must be called inside a tokio runtime.
    pub fn lazy(settings: &AmqpSettings, component: &str) -> Result<Amqp, AmqpError> {
        let mut uri = AMQPUri::from_str(&settings.url).map_err(AmqpError::InvalidUrl)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(settings.heartbeat_secs);
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(FRAME_MAX_BYTES);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(settings.connect_timeout_secs.saturating_mul(1000));
        }
        let name = settings
            .connection_name
            .clone()
            .unwrap_or_else(|| default_connection_name(component));
        let connect_timeout = Duration::from_secs(settings.connect_timeout_secs.max(1));
        let pool_config = PoolConfig {
            max_size: settings.pool_size.max(1),
            timeouts: Timeouts {
                wait: Some(connect_timeout),
                create: Some(connect_timeout),
                recycle: Some(connect_timeout),
            },
            ..PoolConfig::default()
        };
        let config = deadpool_lapin::Config {
            url: Some(uri.to_string()),
            pool: Some(pool_config),
        };
        let pool = make_pool(&config, &name, 'c')?;
        let publish_pool = make_pool(&config, &name, 'p')?;
        Ok(Amqp {
            inner: Arc::new(Inner {
                pool,
                publish_pool,
                settings: settings.clone(),
                name,
                uri,
                management_url: None,
            }),
        })
    }

    /// The base name of this process's connections (each gets `#<n>` appended).
    pub fn connection_name(&self) -> &str {
        &self.inner.name
    }

    /// The settings this handle was built from.
    pub fn settings(&self) -> &AmqpSettings {
        &self.inner.settings
    }

    /// `host:port/vhost`, for messages (never the credentials).
    pub fn endpoint(&self) -> String {
        let a = &self.inner.uri.authority;
        format!("{}:{}/{}", a.host, a.port, self.inner.uri.vhost)
    }

    /// True when the URL is `amqps://`.
    pub fn is_tls(&self) -> bool {
        self.inner.uri.scheme == AMQPScheme::AMQPS
    }

    /// The vhost of the URL.
    pub fn vhost(&self) -> &str {
        &self.inner.uri.vhost
    }

    /// A client for the management HTTP API of the same broker
    /// (`http://<host>:15672`, same credentials, unless overridden with
    /// [`with_management_url`](Amqp::with_management_url)), used to read
    /// queue arguments and bindings.
    pub fn management(&self) -> Management {
        let a = &self.inner.uri.authority;
        let scheme = if self.is_tls() { "https" } else { "http" };
        let base = self
            .inner
            .management_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}:15672", a.host));
        Management::new(
            base,
            &a.userinfo.username,
            &a.userinfo.password,
            &self.inner.uri.vhost,
        )
    }

    /// The same pools, with the management API at `url` (e.g.
    /// `https://rabbit.example:443`) instead of `<host>:15672`.
    pub fn with_management_url(&self, url: impl Into<String>) -> Amqp {
        let i = &self.inner;
        Amqp {
            inner: Arc::new(Inner {
                pool: i.pool.clone(),
                publish_pool: i.publish_pool.clone(),
                settings: i.settings.clone(),
                name: i.name.clone(),
                uri: i.uri.clone(),
                management_url: Some(url.into()),
            }),
        }
    }

    /// Opens a channel on a pooled consumer/admin connection: one attempt.
    /// The connection goes back to the pool at once and is shared by other
    /// channels; the channel keeps it alive.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        self.open_on(&self.inner.pool).await
    }

    /// Opens a channel on a pooled *publishing* connection: one attempt.
    pub async fn publish_channel(&self) -> Result<Channel, AmqpError> {
        self.open_on(&self.inner.publish_pool).await
    }

    async fn open_on(&self, pool: &deadpool_lapin::Pool) -> Result<Channel, AmqpError> {
        let conn = pool.get().await.map_err(|e| AmqpError::Connect {
            endpoint: self.endpoint(),
            reason: e.to_string(),
        })?;
        let channel = conn.create_channel().await;
        match channel {
            Ok(c) => Ok(c),
            Err(e) => {
                // The pooled connection may have died since it was recycled.
                let _ = deadpool_lapin::Object::take(conn);
                Err(AmqpError::broker("channel.open", e))
            }
        }
    }

    /// The reconnect backoff: exponential from 100 ms, doubling, capped at
    /// `amqp.reconnect_max_delay_secs`, with full jitter so a fleet that lost
    /// the broker together does not reconnect in lockstep.
    pub fn reconnect_backoff(&self) -> ExponentialBuilder {
        reconnect_backoff(self.inner.settings.reconnect_max_delay_secs)
    }

    /// Opens a channel, retrying transient failures with
    /// [`reconnect_backoff`](Amqp::reconnect_backoff). Gives up after
    /// `give_up_after` of waiting in total (`None`: never).
    pub async fn channel_with_retry(
        &self,
        give_up_after: Option<Duration>,
    ) -> Result<Channel, AmqpError> {
        self.retry(give_up_after, || self.channel()).await
    }

    /// [`publish_channel`](Amqp::publish_channel) with retries, like
    /// [`channel_with_retry`](Amqp::channel_with_retry).
    pub async fn publish_channel_with_retry(
        &self,
        give_up_after: Option<Duration>,
    ) -> Result<Channel, AmqpError> {
        self.retry(give_up_after, || self.publish_channel()).await
    }

    async fn retry<F, Fut>(
        &self,
        give_up_after: Option<Duration>,
        open: F,
    ) -> Result<Channel, AmqpError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Channel, AmqpError>>,
    {
        let backoff = self
            .reconnect_backoff()
            .without_max_times()
            .with_total_delay(give_up_after);
        let log = std::sync::Mutex::new(OutageLog::default());
        let result = open
            .retry(backoff)
            .when(AmqpError::is_transient)
            .notify(|e, delay| {
                let said = log
                    .lock()
                    .map(|mut l| l.failed(&e.to_string(), std::time::Instant::now()));
                if let Ok(Some(said)) = said {
                    tracing::warn!(error = %e, ?delay, connection = %self.inner.name, failed_attempts = said.attempts, "RabbitMQ unavailable; retrying{}", said.suffix());
                }
            })
            .await;
        if result.is_ok()
            && let Ok(Some(attempts)) = log.lock().map(|mut l| l.recovered())
        {
            tracing::info!(connection = %self.inner.name, failed_attempts = attempts, "RabbitMQ reachable again");
        }
        result
    }

    /// Ready messages in `queue` (a passive declare). For the worker's queue
    /// depth metric and the autoscaler.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let channel = self.channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                if reply_code(&e) == Some(REPLY_NOT_FOUND) {
                    AmqpError::NotFound {
                        kind: "queue",
                        name: queue.to_owned(),
                    }
                } else {
                    AmqpError::broker("queue.declare", e)
                }
            })?;
        let _ = channel.close(200, "OK".into()).await;
        Ok(q.message_count())
    }

    /// Closes the pools: idle connections are closed, and no new ones are made.
    pub fn close(&self) {
        self.inner.pool.close();
        self.inner.publish_pool.close();
    }
}

/// Decides which failures of a retry loop are worth a log line, so that a
/// broker that stays away (wrong credentials, a long outage) is reported
/// once per [`OUTAGE_LOG_INTERVAL`], not on every attempt: the first failure,
/// then a line when the interval has passed or the error changed (say, from
/// "connection refused" to "access refused"). Pure: the clock comes in.
#[derive(Debug, Default)]
pub struct OutageLog {
    attempts: u32,
    /// When the last line was written, and the error it quoted.
    last: Option<(std::time::Instant, String)>,
}

/// Largest AMQP frame this client asks for (the broker's, 128 KiB by
/// default, when it is smaller); a URL's `frame_max` query parameter wins.
/// lapin keeps a send and a receive ring buffer of 32 frames per connection:
/// asked for up front they are allocated zeroed by the kernel and become
/// resident only as traffic passes through them, where growing them to the
/// broker's size after the handshake wrote every byte (8 MiB per connection,
/// most of an idle worker's memory). 16 KiB frames bound each connection's
/// buffers to 1 MiB; task and result bodies larger than a frame are split.
pub(crate) const FRAME_MAX_BYTES: u32 = 16 * 1024;

/// How often a continuing outage is reported.
pub const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// A failure worth a line: how many attempts have failed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutageLine {
    /// Failed attempts in this outage, this one included.
    pub attempts: u32,
    /// True when earlier failures were not logged.
    pub summarises: bool,
}

impl OutageLine {
    /// Text appended to the log message.
    pub fn suffix(&self) -> String {
        if self.summarises {
            format!(
                " (still; {} attempts so far, said once per {}s)",
                self.attempts,
                OUTAGE_LOG_INTERVAL.as_secs()
            )
        } else {
            String::new()
        }
    }
}

impl OutageLog {
    /// Records a failed attempt with `error` at `now`; returns the line to log, if any.
    pub fn failed(&mut self, error: &str, now: std::time::Instant) -> Option<OutageLine> {
        self.attempts = self.attempts.saturating_add(1);
        let due = match &self.last {
            None => true,
            Some((at, said)) => {
                now.saturating_duration_since(*at) >= OUTAGE_LOG_INTERVAL || said != error
            }
        };
        if !due {
            return None;
        }
        self.last = Some((now, error.to_owned()));
        Some(OutageLine {
            attempts: self.attempts,
            summarises: self.attempts > 1,
        })
    }

    /// Records success; the number of failed attempts when there were any.
    pub fn recovered(&mut self) -> Option<u32> {
        let attempts = std::mem::take(&mut self.attempts);
        self.last = None;
        (attempts > 0).then_some(attempts)
    }
}

/// A pool whose connections are named `<name>#<tag><n>`.
fn make_pool(
    config: &deadpool_lapin::Config,
    name: &str,
    tag: char,
) -> Result<deadpool_lapin::Pool, AmqpError> {
    let counter = Arc::new(AtomicU32::new(0));
    let name = name.to_owned();
    config
        .create_pool(
            move || {
                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                ConnectionProperties::default()
                    .with_connection_name(format!("{name}#{tag}{n}").into())
                    .with_client_property("product".into(), "sandfleet".into())
                    .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into())
                    .with_client_property("pid".into(), std::process::id().to_string().into())
            },
            Runtime::Tokio1,
        )
        .map_err(|e| AmqpError::InvalidUrl(e.to_string()))
}

/// See [`Amqp::reconnect_backoff`].
pub(crate) fn reconnect_backoff(max_delay_secs: u64) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(max_delay_secs.max(1)))
        .with_jitter()
}

/// `sandfleet-<component>@<host>`.
fn default_connection_name(component: &str) -> String {
    format!("sandfleet-{component}@{}", host_name())
}

/// The host (pod) name, from the kernel, then `$HOSTNAME`.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn lazy_names_connections_and_applies_heartbeat() {
        let settings = AmqpSettings {
            url: "amqps://u:secret@broker.example:5671/prod".into(),
            heartbeat_secs: 15,
            ..AmqpSettings::default()
        };
        let amqp = Amqp::lazy(&settings, "worker").unwrap();
        assert!(amqp.connection_name().starts_with("sandfleet-worker@"));
        assert!(amqp.is_tls());
        assert_eq!(amqp.endpoint(), "broker.example:5671/prod");
        assert!(!format!("{amqp:?}").contains("secret"));
        assert_eq!(amqp.inner.uri.query.heartbeat, Some(15));
    }

    #[test]
    fn an_outage_is_reported_once_per_interval_and_when_its_error_changes() {
        let t0 = std::time::Instant::now();
        let mut log = OutageLog::default();
        let refused = "ACCESS_REFUSED - Login was refused";
        let first = log.failed(refused, t0).unwrap();
        assert_eq!((first.attempts, first.suffix()), (1, String::new()));
        // Retries every few seconds for most of a minute: quiet.
        for s in [1, 3, 7, 15, 30, 59] {
            assert_eq!(log.failed(refused, t0 + Duration::from_secs(s)), None);
        }
        let again = log.failed(refused, t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(again.attempts, 8);
        assert!(again.suffix().contains("8 attempts"), "{}", again.suffix());
        // A different error is news at once.
        let down = log.failed("connection refused", t0 + Duration::from_secs(61));
        assert!(down.is_some());
        assert_eq!(log.recovered(), Some(9));
        assert_eq!(log.recovered(), None, "a new outage starts from zero");
        assert_eq!(
            log.failed(refused, t0 + Duration::from_secs(62))
                .unwrap()
                .attempts,
            1
        );
    }

    #[tokio::test]
    async fn bad_url_is_a_config_error() {
        let settings = AmqpSettings {
            url: "http://nope".into(),
            ..AmqpSettings::default()
        };
        let err = Amqp::lazy(&settings, "x").unwrap_err();
        assert!(matches!(err, AmqpError::InvalidUrl(_)));
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn unreachable_broker_is_transient() {
        let settings = AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            connect_timeout_secs: 1,
            ..AmqpSettings::default()
        };
        let err = Amqp::connect(&settings, "x").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}
