//! A small client for the RabbitMQ management HTTP API: the only way to read
//! the arguments an existing queue was declared with (AMQP's passive declare
//! does not return them), its bindings, and to list or close connections; and
//! to list and delete queues and exchanges by name prefix.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::AmqpError;

/// Management API client for one vhost. Built by [`Amqp::management`](crate::Amqp::management).
#[derive(Debug, Clone)]
pub struct Management {
    base: String,
    user: String,
    password: String,
    vhost: String,
    client: reqwest::Client,
}

/// A queue as the management API reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueInfo {
    /// Name.
    pub name: String,
    /// `classic`, `quorum` or `stream`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Durable.
    #[serde(default)]
    pub durable: bool,
    /// Declared arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// Ready messages (absent right after declaration).
    #[serde(default)]
    pub messages_ready: Option<u64>,
    /// Messages delivered and not yet acknowledged (absent right after declaration).
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    /// Messages in the queue, ready or not; for a stream, those retained.
    #[serde(default)]
    pub messages: Option<u64>,
    /// Subscribed consumers (absent right after declaration).
    #[serde(default)]
    pub consumers: Option<u64>,
}

/// An exchange as the management API reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeInfo {
    /// Name.
    pub name: String,
    /// `direct`, `fanout`, `topic`, `headers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Durable.
    #[serde(default)]
    pub durable: bool,
    /// Declared arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct BindingInfo {
    routing_key: String,
}

/// A consumer of a queue, with what its channel holds unacknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConsumer {
    /// The connection's client-given name (`sandfleet-worker@<host>#c1`), or
    /// the broker's name for it (`10.0.3.7:51234 -> 10.0.0.2:5672`).
    pub connection: String,
    /// The peer's address.
    pub peer: String,
    /// The consumer tag.
    pub tag: String,
    /// Prefetch limit of the consumer (0: unlimited or channel-wide).
    pub prefetch: u64,
    /// Deliveries not yet acknowledged on the consumer's channel: for a
    /// worker, the tasks it holds.
    pub unacked: u64,
}

#[derive(Deserialize)]
struct ConsumerEntry {
    consumer_tag: String,
    #[serde(default)]
    prefetch_count: u64,
    queue: NameRef,
    /// An object, or `[]` while the consumer's channel is going away.
    #[serde(default)]
    channel_details: serde_json::Value,
}

impl ConsumerEntry {
    fn channel_field(&self, key: &str) -> String {
        self.channel_details
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    }
}

#[derive(Deserialize)]
struct NameRef {
    name: String,
}

#[derive(Deserialize)]
struct ChannelEntry {
    name: String,
    #[serde(default)]
    messages_unacknowledged: u64,
}

#[derive(Deserialize)]
struct ConnectionInfo {
    name: String,
    #[serde(default)]
    client_properties: BTreeMap<String, serde_json::Value>,
}

impl Management {
    /// A client for `base` (e.g. `http://127.0.0.1:15672`).
    pub fn new(base: impl Into<String>, user: &str, password: &str, vhost: &str) -> Management {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Management {
            base: base.into(),
            user: user.to_owned(),
            password: password.to_owned(),
            vhost: vhost.to_owned(),
            client,
        }
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, AmqpError> {
        let url = format!("{}/api/{path}", self.base);
        let resp = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| AmqpError::Management(format!("GET {url}: {e}")))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(AmqpError::Management(format!(
                "GET {url}: HTTP {}",
                resp.status()
            )));
        }
        resp.json::<T>()
            .await
            .map(Some)
            .map_err(|e| AmqpError::Management(format!("GET {url}: {e}")))
    }

    /// A queue, or `None` if it does not exist.
    pub async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, AmqpError> {
        self.get(&format!("queues/{}/{}", enc(&self.vhost), enc(name)))
            .await
    }

    /// Every queue of the vhost whose name starts with `prefix`, by name.
    /// The figures are the management API's (refreshed every few seconds).
    pub async fn queues_with_prefix(&self, prefix: &str) -> Result<Vec<QueueInfo>, AmqpError> {
        self.named_with_prefix("queues", prefix, |q: &QueueInfo| &q.name)
            .await
    }

    /// The vhost's objects of `kind` (`queues`, `exchanges`) whose name,
    /// per `name`, starts with `prefix`, by name.
    async fn named_with_prefix<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        prefix: &str,
        name: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>, AmqpError> {
        let all: Option<Vec<T>> = self.get(&format!("{kind}/{}", enc(&self.vhost))).await?;
        let mut named: Vec<T> = all
            .unwrap_or_default()
            .into_iter()
            .filter(|o| name(o).starts_with(prefix))
            .collect();
        named.sort_by(|a, b| name(a).cmp(name(b)));
        Ok(named)
    }

    /// The consumers of `queue`, by connection name, each with the
    /// deliveries its channel holds unacknowledged.
    pub async fn queue_consumers(&self, queue: &str) -> Result<Vec<QueueConsumer>, AmqpError> {
        let (consumers, channels) = self.consumers_and_channels().await?;
        let connections: Vec<ConnectionInfo> = self.get("connections").await?.unwrap_or_default();
        let mut out: Vec<QueueConsumer> = consumers
            .into_iter()
            .filter(|c| c.queue.name == queue)
            .map(|c| {
                let channel = c.channel_field("name");
                let broker_name = c.channel_field("connection_name");
                let client_name = connections
                    .iter()
                    .find(|conn| conn.name == broker_name)
                    .and_then(|conn| conn.client_properties.get("connection_name"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                let unacked = channels
                    .iter()
                    .find(|ch| ch.name == channel)
                    .map_or(0, |ch| ch.messages_unacknowledged);
                QueueConsumer {
                    connection: client_name.unwrap_or(broker_name),
                    peer: c.channel_field("peer_host"),
                    tag: c.consumer_tag,
                    prefetch: c.prefetch_count,
                    unacked,
                }
            })
            .collect();
        out.sort_by(|a, b| a.connection.cmp(&b.connection).then(a.tag.cmp(&b.tag)));
        Ok(out)
    }

    /// How many consumers each queue of the vhost has on channels that are
    /// still open, by queue name (queues without any are absent). The queue
    /// listing's `consumers` lags, and for a stream it can outlive the
    /// connection its consumers were on; these are checked against the open
    /// channels.
    pub async fn live_consumers(&self) -> Result<BTreeMap<String, usize>, AmqpError> {
        let (consumers, channels) = self.consumers_and_channels().await?;
        let open: std::collections::HashSet<&str> =
            channels.iter().map(|c| c.name.as_str()).collect();
        let mut live = BTreeMap::new();
        for c in &consumers {
            if open.contains(c.channel_field("name").as_str()) {
                *live.entry(c.queue.name.clone()).or_default() += 1;
            }
        }
        Ok(live)
    }

    /// The vhost's consumers and its open channels.
    async fn consumers_and_channels(
        &self,
    ) -> Result<(Vec<ConsumerEntry>, Vec<ChannelEntry>), AmqpError> {
        let vhost = enc(&self.vhost);
        let consumers = self
            .get(&format!("consumers/{vhost}"))
            .await?
            .unwrap_or_default();
        let channels = self
            .get(&format!("vhosts/{vhost}/channels"))
            .await?
            .unwrap_or_default();
        Ok((consumers, channels))
    }

    /// An exchange, or `None` if it does not exist.
    pub async fn exchange(&self, name: &str) -> Result<Option<ExchangeInfo>, AmqpError> {
        self.get(&format!("exchanges/{}/{}", enc(&self.vhost), enc(name)))
            .await
    }

    /// Routing keys binding `queue` to `exchange`.
    pub async fn binding_keys(
        &self,
        exchange: &str,
        queue: &str,
    ) -> Result<Vec<String>, AmqpError> {
        let path = format!(
            "bindings/{}/e/{}/q/{}",
            enc(&self.vhost),
            enc(exchange),
            enc(queue)
        );
        let b: Option<Vec<BindingInfo>> = self.get(&path).await?;
        Ok(b.unwrap_or_default()
            .into_iter()
            .map(|b| b.routing_key)
            .collect())
    }

    /// Names of the broker's connections whose client-given name
    /// (`connection_name`) starts with `prefix`.
    pub async fn connections_named(&self, prefix: &str) -> Result<Vec<String>, AmqpError> {
        let all: Option<Vec<ConnectionInfo>> = self.get("connections").await?;
        Ok(all
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                c.client_properties
                    .get("connection_name")
                    .and_then(|v| v.as_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .map(|c| c.name)
            .collect())
    }

    /// Closes (server side) every connection whose `connection_name` starts
    /// with `prefix`; returns how many. For fault injection and operators.
    pub async fn close_connections_named(&self, prefix: &str) -> Result<usize, AmqpError> {
        let names = self.connections_named(prefix).await?;
        for n in &names {
            self.delete(
                &format!("connections/{}", enc(n)),
                Some("closed by sandfleet"),
            )
            .await?;
        }
        Ok(names.len())
    }

    /// Every exchange of the vhost whose name starts with `prefix`, by name.
    pub async fn exchanges_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ExchangeInfo>, AmqpError> {
        self.named_with_prefix("exchanges", prefix, |e: &ExchangeInfo| &e.name)
            .await
    }

    /// Deletes queue `name`, with its messages; one already gone is not an error.
    pub async fn delete_queue(&self, name: &str) -> Result<(), AmqpError> {
        self.delete(&format!("queues/{}/{}", enc(&self.vhost), enc(name)), None)
            .await
    }

    /// Deletes exchange `name` and its bindings; one already gone is not an error.
    pub async fn delete_exchange(&self, name: &str) -> Result<(), AmqpError> {
        self.delete(
            &format!("exchanges/{}/{}", enc(&self.vhost), enc(name)),
            None,
        )
        .await
    }

    /// `DELETE /api/{path}`; 404 (already gone) counts as done. `reason`
    /// (`X-Reason`) is what a closed connection's client is told.
    async fn delete(&self, path: &str, reason: Option<&str>) -> Result<(), AmqpError> {
        let url = format!("{}/api/{path}", self.base);
        let mut req = self
            .client
            .delete(&url)
            .basic_auth(&self.user, Some(&self.password));
        if let Some(reason) = reason {
            req = req.header("X-Reason", reason);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| AmqpError::Management(format!("DELETE {url}: {e}")))?;
        if !resp.status().is_success() && resp.status() != reqwest::StatusCode::NOT_FOUND {
            return Err(AmqpError::Management(format!(
                "DELETE {url}: HTTP {}",
                resp.status()
            )));
        }
        Ok(())
    }
}

/// Percent-encodes a path segment.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::enc;

    #[test]
    fn vhost_and_names_are_path_safe() {
        assert_eq!(enc("/"), "%2F");
        assert_eq!(enc("sandfleet.tasks"), "sandfleet.tasks");
        assert_eq!(enc("a b->c"), "a%20b-%3Ec");
    }
}
