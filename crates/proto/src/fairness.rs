//! Fairness keys: who a task's service is accounted to.
//!
//! Every task belongs to a *key* (its repository by default) and, above it,
//! a *tenant* (the repository's owner or top-level group by default). When the
//! fleet is saturated, workers share service by weight first between tenants
//! and then between the keys of one tenant (`docs/fairness.md`), so a tenant
//! that spreads its backlog over many repositories gains nothing by it.
//!
//! Producers may set both explicitly ([`Fairness`] on the task); the gateway
//! sets them from the webhook event. [`FairKey::of`] resolves the defaults in
//! one place; [`FairKey::peek`] reads them from raw message bytes without a
//! full decode (the worker's scheduler looks at deliveries before it decodes
//! them); [`shard_for`] maps a key onto one of the task queue shards with a
//! hash every producer, in any language, can compute.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Task;

/// Longest tenant or key, in bytes.
pub const MAX_FAIRNESS_KEY_BYTES: usize = 200;

/// The fairness key and tenant a producer chose for a task. Both are
/// optional: a missing key is the task's repository, a missing tenant the
/// repository's owner (the part before the first `/`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fairness {
    /// The organisation or tenant the key belongs to; service is shared
    /// between tenants first. Default: the repository's owner or top-level group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The key service is shared between within a tenant, and the key of
    /// per-key concurrency caps. Default: `source.repository`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A task's resolved fairness identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FairKey {
    /// The tenant.
    pub tenant: String,
    /// The key within the tenant.
    pub key: String,
}

impl FairKey {
    /// The identity of `task`, defaults applied.
    pub fn of(task: &Task) -> FairKey {
        resolve(task.fairness.as_ref(), &task.source.repository)
    }

    /// The identity read from raw task message bytes, without validating the
    /// rest of the message; `None` when the bytes are not a JSON object with
    /// a `source.repository` or an explicit `fairness.key` (such a message is
    /// rejected by the full decode anyway).
    pub fn peek(body: &[u8]) -> Option<FairKey> {
        #[derive(Deserialize)]
        struct PeekSource {
            repository: Option<String>,
        }
        #[derive(Deserialize)]
        struct Peek {
            source: Option<PeekSource>,
            fairness: Option<PeekFairness>,
        }
        #[derive(Deserialize)]
        struct PeekFairness {
            tenant: Option<String>,
            key: Option<String>,
        }
        let p: Peek = serde_json::from_slice(body).ok()?;
        let repo = p.source.and_then(|s| s.repository).unwrap_or_default();
        let f = p.fairness.map(|f| Fairness {
            tenant: f.tenant,
            key: f.key,
        });
        let k = resolve(f.as_ref(), &repo);
        (!k.key.is_empty()).then_some(k)
    }
}

fn resolve(f: Option<&Fairness>, repository: &str) -> FairKey {
    let key = f
        .and_then(|f| f.key.clone())
        .unwrap_or_else(|| repository.to_owned());
    let tenant = f
        .and_then(|f| f.tenant.clone())
        .unwrap_or_else(|| default_tenant(&key));
    FairKey { tenant, key }
}

/// The tenant of a key with no explicit tenant: its owner or top-level group
/// (`acme/web` → `acme`, `group/sub/project` → `group`), the key itself when
/// it has no `/`.
pub fn default_tenant(key: &str) -> String {
    key.split('/').next().unwrap_or(key).to_owned()
}

/// The task queue shard (`0..shards`) of a fairness key: FNV-1a (64 bit) of
/// the key's UTF-8 bytes, modulo `shards`. Stable across versions and easy to
/// reproduce in any language, so every producer routes a key to the same
/// shard. `shards == 0` gives 0.
pub fn shard_for(key: &str, shards: u16) -> u16 {
    if shards == 0 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards)) as u16
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_are_the_repository_and_its_owner() {
        let k = resolve(None, "acme/web");
        assert_eq!(k.key, "acme/web");
        assert_eq!(k.tenant, "acme");
        assert_eq!(resolve(None, "group/sub/p").tenant, "group");
        let f = Fairness {
            tenant: Some("bigco".into()),
            key: None,
        };
        let k = resolve(Some(&f), "acme/web");
        assert_eq!((k.tenant.as_str(), k.key.as_str()), ("bigco", "acme/web"));
        let f = Fairness {
            tenant: None,
            key: Some("team-a/nightly".into()),
        };
        assert_eq!(resolve(Some(&f), "acme/web").tenant, "team-a");
    }

    #[test]
    fn peek_reads_keys_without_a_full_decode() {
        let body = br#"{"source":{"repository":"acme/web","commit":"x"},"steps":"not checked"}"#;
        let k = FairKey::peek(body).unwrap();
        assert_eq!((k.tenant.as_str(), k.key.as_str()), ("acme", "acme/web"));
        let body = br#"{"source":{"repository":"acme/web"},"fairness":{"tenant":"t","key":"k"}}"#;
        let k = FairKey::peek(body).unwrap();
        assert_eq!((k.tenant.as_str(), k.key.as_str()), ("t", "k"));
        assert_eq!(FairKey::peek(b"not json"), None);
        assert_eq!(FairKey::peek(b"{}"), None);
    }

    #[test]
    fn shards_are_stable_fnv1a() {
        // Reference values: FNV-1a 64 of "" and "a" (published test vectors).
        assert_eq!(
            shard_for("", u16::MAX),
            (0xcbf2_9ce4_8422_2325u64 % 65535) as u16
        );
        assert_eq!(
            shard_for("a", u16::MAX),
            (0xaf63_dc4c_8601_ec8cu64 % 65535) as u16
        );
        assert_eq!(shard_for("acme/web", 0), 0);
        assert!((0..100).all(|i| shard_for(&format!("r{i}"), 16) < 16));
    }
}
