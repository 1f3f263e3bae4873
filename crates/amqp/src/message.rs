//! Messages going out: [`OutgoingMessage`], the AMQP properties and the
//! sandfleet headers it sets.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::PublishError;

/// Header: the attempt number of a task (1-based).
pub const HEADER_ATTEMPT: &str = "x-sandfleet-attempt";
/// Header: the producer's idempotency key of a task.
pub const HEADER_IDEMPOTENCY_KEY: &str = "x-idempotency-key";
/// Header: W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header on dead-lettered messages: why sandfleet rejected the message (human text).
pub const HEADER_REJECT_REASON: &str = "x-sandfleet-reject-reason";
/// Header on dead-lettered messages: the machine code of the reason (`oversize`, `invalid`, ...).
pub const HEADER_REJECT_CODE: &str = "x-sandfleet-reject-code";
/// Header: publish time in milliseconds since the epoch (the `timestamp`
/// property has only second resolution). Set when
/// [`OutgoingMessage::stamp_published_at_ms`] is on (results).
pub const HEADER_PUBLISHED_AT_MS: &str = "x-sandfleet-published-at-ms";

/// One message to publish with [`Publisher`](crate::Publisher).
///
/// Defaults: persistent (`delivery_mode = 2`), `mandatory` (an unroutable
/// message is an error, not a silent drop), timestamp = publish time.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// Exchange to publish to (`""` is the default exchange: routing key = queue name).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub body: Vec<u8>,
    /// `message_id` property. Republishes of the same logical message keep it.
    pub message_id: Option<String>,
    /// `type` property (e.g. `sandfleet.task.v1`).
    pub kind: Option<String>,
    /// `content_type` property.
    pub content_type: Option<String>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `timestamp` property; the publish time when `None`.
    pub timestamp: Option<DateTime<Utc>>,
    /// `x-sandfleet-attempt` header.
    pub attempt: Option<u32>,
    /// `x-idempotency-key` header.
    pub idempotency_key: Option<String>,
    /// `traceparent` header.
    pub traceparent: Option<String>,
    /// Per-message TTL (`expiration` property), whole milliseconds.
    pub expiration: Option<Duration>,
    /// Further headers (copied first; the named fields above override them).
    pub headers: FieldTable,
    /// Adds [`HEADER_PUBLISHED_AT_MS`]. Off by default: the broker parses
    /// every header of every message, so tasks carry only what they need.
    pub stamp_published_at_ms: bool,
    /// Persistent (`delivery_mode = 2`). Default true.
    pub persistent: bool,
    /// `mandatory` flag. Default true.
    pub mandatory: bool,
}

impl OutgoingMessage {
    /// A persistent, mandatory message with no properties set yet.
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>, body: Vec<u8>) -> Self {
        OutgoingMessage {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            message_id: None,
            kind: None,
            content_type: None,
            correlation_id: None,
            timestamp: None,
            attempt: None,
            idempotency_key: None,
            traceparent: None,
            expiration: None,
            headers: FieldTable::default(),
            stamp_published_at_ms: false,
            persistent: true,
            mandatory: true,
        }
    }

    /// Sets `message_id`.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }
    /// Sets `type`.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Sets `content_type`.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.content_type = Some(ct.into());
        self
    }
    /// Sets `correlation_id`.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Sets the `x-sandfleet-attempt` header.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }
    /// Sets the `x-idempotency-key` header.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    /// Sets the `traceparent` header (no-op for `None`).
    pub fn traceparent(mut self, tp: Option<&str>) -> Self {
        self.traceparent = tp.map(str::to_owned);
        self
    }
    /// Sets a per-message TTL.
    pub fn expiration(mut self, ttl: Duration) -> Self {
        self.expiration = Some(ttl);
        self
    }
    /// Adds a string header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        let v: String = value.into();
        self.headers
            .insert(name.into(), AMQPValue::LongString(LongString::from(v)));
        self
    }

    /// The AMQP properties for this message. Fails on a property longer
    /// than 255 bytes.
    pub(crate) fn properties(&self, now: DateTime<Utc>) -> Result<BasicProperties, PublishError> {
        let mut headers = self.headers.clone();
        if let Some(a) = self.attempt {
            headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(a)));
        }
        if let Some(k) = &self.idempotency_key {
            headers.insert(
                HEADER_IDEMPOTENCY_KEY.into(),
                AMQPValue::LongString(k.as_str().into()),
            );
        }
        if let Some(tp) = &self.traceparent {
            headers.insert(
                HEADER_TRACEPARENT.into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        if self.stamp_published_at_ms {
            headers.insert(
                HEADER_PUBLISHED_AT_MS.into(),
                AMQPValue::LongLongInt(now.timestamp_millis()),
            );
        }
        let ts = self.timestamp.unwrap_or(now).timestamp().max(0) as u64;
        let mut props = BasicProperties::default()
            .with_timestamp(ts)
            .with_delivery_mode(if self.persistent { 2 } else { 1 });
        if !headers.inner().is_empty() {
            props = props.with_headers(headers);
        }
        if let Some(v) = &self.message_id {
            props = props.with_message_id(short("message_id", v)?);
        }
        if let Some(v) = &self.kind {
            props = props.with_type(short("type", v)?);
        }
        if let Some(v) = &self.content_type {
            props = props.with_content_type(short("content_type", v)?);
        }
        if let Some(v) = &self.correlation_id {
            props = props.with_correlation_id(short("correlation_id", v)?);
        }
        if let Some(ttl) = self.expiration {
            props = props.with_expiration(ttl.as_millis().to_string().into());
        }
        Ok(props)
    }
}

fn short(field: &'static str, v: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(v).map_err(|_| PublishError::InvalidProperty {
        field,
        reason: format!("{} bytes; AMQP allows at most 255", v.len()),
    })
}

/// Reads a header as a string (long or short string), if present.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Reads a header as an integer of any AMQP integer type, if present.
pub fn header_i64(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    amqp_int(headers?.inner().get(name)?)
}

/// An AMQP value as an integer, when it is one (any width, or a timestamp).
pub fn amqp_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => i64::from(*x),
        AMQPValue::ShortShortUInt(x) => i64::from(*x),
        AMQPValue::ShortInt(x) => i64::from(*x),
        AMQPValue::ShortUInt(x) => i64::from(*x),
        AMQPValue::LongInt(x) => i64::from(*x),
        AMQPValue::LongUInt(x) => i64::from(*x),
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => i64::try_from(*x).ok()?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn properties_carry_ids_headers_and_persistence() {
        let now = Utc::now();
        let m = OutgoingMessage::new("ex", "rk", b"{}".to_vec())
            .message_id("m-1")
            .kind("sandfleet.task.v1")
            .content_type("application/json")
            .correlation_id("c-1")
            .attempt(2)
            .idempotency_key("idem")
            .traceparent(Some(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ))
            .expiration(Duration::from_secs(10));
        let p = m.properties(now).unwrap();
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "sandfleet.task.v1");
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "10000");
        assert_eq!(*p.timestamp(), Some(now.timestamp() as u64));
        let h = p.headers().as_ref();
        assert_eq!(header_i64(h, HEADER_ATTEMPT), Some(2));
        assert_eq!(header_str(h, HEADER_IDEMPOTENCY_KEY), Some("idem"));
        assert!(
            header_str(h, HEADER_TRACEPARENT)
                .unwrap()
                .starts_with("00-")
        );
        assert_eq!(
            header_i64(h, HEADER_PUBLISHED_AT_MS),
            None,
            "only on request"
        );
        let mut stamped = m.clone();
        stamped.stamp_published_at_ms = true;
        let p = stamped.properties(now).unwrap();
        assert_eq!(
            header_i64(p.headers().as_ref(), HEADER_PUBLISHED_AT_MS),
            Some(now.timestamp_millis())
        );
    }

    #[test]
    fn overlong_property_is_an_error_not_a_panic() {
        let m = OutgoingMessage::new("", "q", vec![]).message_id("x".repeat(300));
        let err = m.properties(Utc::now()).unwrap_err();
        assert!(matches!(
            err,
            PublishError::InvalidProperty {
                field: "message_id",
                ..
            }
        ));
    }
}
