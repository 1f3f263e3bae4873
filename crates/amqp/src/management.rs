//! A small client for the RabbitMQ management HTTP API: the only way to read
//! the arguments an existing queue was declared with (AMQP's passive declare
//! does not return them), its bindings, and to list or close connections.

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
        let all: Option<Vec<QueueInfo>> = self.get(&format!("queues/{}", enc(&self.vhost))).await?;
        let mut queues: Vec<QueueInfo> = all
            .unwrap_or_default()
            .into_iter()
            .filter(|q| q.name.starts_with(prefix))
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(queues)
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
            let url = format!("{}/api/connections/{}", self.base, enc(n));
            let resp = self
                .client
                .delete(&url)
                .basic_auth(&self.user, Some(&self.password))
                .header("X-Reason", "closed by sandfleet")
                .send()
                .await
                .map_err(|e| AmqpError::Management(format!("DELETE {url}: {e}")))?;
            if !resp.status().is_success() && resp.status() != reqwest::StatusCode::NOT_FOUND {
                return Err(AmqpError::Management(format!(
                    "DELETE {url}: HTTP {}",
                    resp.status()
                )));
            }
        }
        Ok(names.len())
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
