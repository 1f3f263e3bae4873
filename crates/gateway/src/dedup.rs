//! Deduplication of webhook deliveries by their delivery id.
//!
//! Providers redeliver when they did not see a 2xx in time, so the same
//! delivery can arrive twice, even concurrently. The first one claims the key
//! and enqueues; a duplicate that arrives after the task was confirmed gets the
//! same task id back, and one that arrives while the first is still in flight
//! gets 409 so the provider retries later.
//!
//! What this does **not** cover: it is an in-memory set per gateway process
//! with a TTL. Two gateway replicas, or a restart, can each enqueue the same
//! delivery once. Every task carries the delivery id as its idempotency key
//! (`x-idempotency-key` header), so a consumer can deduplicate downstream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sandfleet_proto::TaskId;
use tokio::time::Instant;

/// The state of one delivery key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// New key: the caller must enqueue, then [`DeliveryDedup::complete`] or
    /// [`DeliveryDedup::release`].
    Claimed,
    /// Another request with this key is enqueueing right now.
    InFlight,
    /// Already enqueued as this task.
    Done(TaskId),
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    InFlight,
    Done(TaskId, Instant),
}

/// A TTL set of delivery keys (uses tokio's clock, so tests can pause time).
#[derive(Debug)]
pub struct DeliveryDedup {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<String, Entry>>,
}

impl DeliveryDedup {
    /// A set that remembers keys for `ttl`, and at most `max_entries` of them
    /// (the oldest expire first when it is full).
    pub fn new(ttl: Duration, max_entries: usize) -> DeliveryDedup {
        DeliveryDedup {
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves a consistent map; keep going.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key`, or reports who holds it.
    pub fn claim(&self, key: &str) -> Claim {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(key) {
            Some(Entry::InFlight) => return Claim::InFlight,
            Some(Entry::Done(id, at)) if now.duration_since(*at) < self.ttl => {
                return Claim::Done(*id);
            }
            _ => {}
        }
        if map.len() >= self.max_entries {
            map.retain(|_, e| {
                matches!(e, Entry::InFlight)
                    || matches!(e, Entry::Done(_, at) if now.duration_since(*at) < self.ttl)
            });
            if map.len() >= self.max_entries {
                // Still full: drop the oldest completed entry.
                let oldest = map
                    .iter()
                    .filter_map(|(k, e)| match e {
                        Entry::Done(_, at) => Some((k.clone(), *at)),
                        Entry::InFlight => None,
                    })
                    .min_by_key(|(_, at)| *at)
                    .map(|(k, _)| k);
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
        }
        map.insert(key.to_owned(), Entry::InFlight);
        Claim::Claimed
    }

    /// Records that `key` was enqueued as `task`.
    pub fn complete(&self, key: &str, task: TaskId) {
        self.lock()
            .insert(key.to_owned(), Entry::Done(task, Instant::now()));
    }

    /// Forgets a claim whose enqueue failed, so the provider's retry can succeed.
    pub fn release(&self, key: &str) {
        let mut map = self.lock();
        if matches!(map.get(key), Some(Entry::InFlight)) {
            map.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test(start_paused = true)]
    async fn a_key_is_claimed_once_until_its_ttl_runs_out() {
        let d = DeliveryDedup::new(Duration::from_secs(60), 100);
        let id = Uuid::now_v7();
        assert_eq!(d.claim("a"), Claim::Claimed);
        assert_eq!(d.claim("a"), Claim::InFlight);
        d.complete("a", id);
        assert_eq!(d.claim("a"), Claim::Done(id));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            d.claim("a"),
            Claim::Claimed,
            "expired keys can be claimed again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_enqueue_releases_the_key() {
        let d = DeliveryDedup::new(Duration::from_secs(60), 100);
        assert_eq!(d.claim("a"), Claim::Claimed);
        d.release("a");
        assert_eq!(d.claim("a"), Claim::Claimed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_set_is_bounded() {
        let d = DeliveryDedup::new(Duration::from_secs(600), 3);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(d.claim(k), Claim::Claimed);
            d.complete(k, Uuid::now_v7());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(d.lock().len() <= 3);
        assert_eq!(d.claim("a"), Claim::Claimed, "the oldest entry was evicted");
    }
}
