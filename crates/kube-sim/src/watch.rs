//! Watches: `?watch=true` on a list path answers with one long chunked response of
//! JSON lines, `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{…}}`.
//!
//! Without a resourceVersion (or with `0`) the watch starts with synthetic `ADDED`
//! events for the current objects; with one, it replays the history after it, or sends
//! a 410 `ERROR` event when that history is gone. A label-filtered watch sends
//! `DELETED` when an object stops matching and `ADDED` when it starts matching.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::selector::{FieldSelector, LabelSelector};
use crate::shared::Shared;
use crate::status::ApiError;
use crate::store::{Event, EventType, Kind};

/// A watch request, parsed.
pub(crate) struct WatchRequest {
    pub(crate) kind: Kind,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
    /// `None` for "start from now, with the current objects".
    pub(crate) since: Option<u64>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) bookmarks: bool,
    pub(crate) send_initial_events: bool,
}

/// An injected watch misbehaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchFault {
    None,
    /// Send one 410 ERROR event and end.
    Gone,
    /// End after the initial/replayed events.
    EndEarly,
    /// Send a 410 ERROR event after this long, then end.
    GoneAfter(Duration),
}

impl WatchRequest {
    fn selects(&self, kind: Kind, object: &Value) -> bool {
        kind == self.kind
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| crate::meta::namespace(object) == ns)
            && self.labels.matches_object(object)
            && self.fields.matches_object(object)
    }

    /// The event this watcher should see for a store event, if any.
    fn translate<'a>(&self, ev: &'a Event) -> Option<(&'static str, &'a Value)> {
        if ev.kind != self.kind {
            return None;
        }
        let now = self.selects(ev.kind, &ev.object);
        let before = ev.old.as_ref().is_some_and(|o| self.selects(ev.kind, o));
        let ty = match ev.ty {
            EventType::Added => now.then_some("ADDED"),
            EventType::Modified => match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
            EventType::Deleted => (before || now).then_some("DELETED"),
        }?;
        Some((ty, &ev.object))
    }
}

/// One watch event as it goes on the wire, borrowing the stored object:
/// `json!` would deep-copy it (with the script a sandbox Job carries) for
/// every event and every watcher, and sort `object` before `type`, which
/// makes a client's decoder buffer the object before it knows the event.
#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    object: &'a Value,
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&Line { ty, object }).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(kind: Kind, rev: u64, initial_end: bool) -> Bytes {
    let mut object = json!({
        "kind": kind.kind_name(),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rev.to_string()},
    });
    if initial_end {
        object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &object)
}

fn error_line(err: &ApiError) -> Bytes {
    line("ERROR", &err.body())
}

/// Starts a watch and returns the streaming response.
pub(crate) fn serve(shared: Arc<Shared>, req: WatchRequest, fault: WatchFault) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        if fault == WatchFault::Gone {
            let _ = tx
                .send(error_line(&ApiError::gone(req.since.unwrap_or(0))))
                .await;
            return;
        }
        let sub = match shared.store.watch_from(req.since) {
            Ok(sub) => sub,
            Err(e) => {
                let _ = tx.send(error_line(&e)).await;
                return;
            }
        };
        let mut last_rev = sub.rev;
        for (kind, object) in &sub.snapshot {
            if req.selects(*kind, object) && tx.send(line("ADDED", object)).await.is_err() {
                return;
            }
        }
        if req.send_initial_events && req.since.is_none() {
            let _ = tx.send(bookmark(req.kind, sub.rev, true)).await;
        }
        for ev in &sub.backlog {
            if let Some((ty, object)) = req.translate(ev)
                && tx.send(line(ty, object)).await.is_err()
            {
                return;
            }
        }
        if fault == WatchFault::EndEarly {
            return;
        }
        let mut rx = sub.rx;
        let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
        let gone_at = match fault {
            WatchFault::GoneAfter(d) => Some(tokio::time::Instant::now() + d),
            _ => None,
        };
        let mut ticker = tokio::time::interval(shared.options.bookmark_interval);
        ticker.tick().await;
        loop {
            let timeout = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let gone = async {
                match gone_at {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tx.closed() => return,
                () = shared.shutdown.cancelled() => return,
                () = timeout => return,
                () = gone => {
                    let _ = tx.send(error_line(&ApiError::gone(last_rev))).await;
                    return;
                }
                _ = ticker.tick(), if req.bookmarks => {
                    if tx.send(bookmark(req.kind, last_rev, false)).await.is_err() {
                        return;
                    }
                }
                r = rx.recv() => match r {
                    Ok(ev) => {
                        last_rev = last_rev.max(ev.rev);
                        if let Some((ty, object)) = req.translate(&ev)
                            && tx.send(line(ty, object)).await.is_err() {
                                return;
                            }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // This watcher fell too far behind: like an expired watch cache.
                        let _ = tx.send(error_line(&ApiError::gone(last_rev))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(selector: &str) -> WatchRequest {
        WatchRequest {
            kind: Kind::Job,
            namespace: Some("ns".into()),
            labels: LabelSelector::parse(selector).unwrap(),
            fields: FieldSelector::default(),
            since: None,
            timeout: None,
            bookmarks: false,
            send_initial_events: false,
        }
    }

    fn job(app: &str) -> Value {
        json!({"metadata": {"name": "j", "namespace": "ns", "labels": {"app": app}}})
    }

    fn event(ty: EventType, old: Option<Value>, new: Value) -> Event {
        Event {
            rev: 2,
            kind: Kind::Job,
            ty,
            object: new,
            old,
        }
    }

    #[test]
    fn label_transitions_become_added_and_deleted() {
        let r = req("app=a");
        let ty = |e: &Event| r.translate(e).map(|(t, _)| t);
        assert_eq!(ty(&event(EventType::Added, None, job("a"))), Some("ADDED"));
        assert_eq!(ty(&event(EventType::Added, None, job("b"))), None);
        assert_eq!(
            ty(&event(EventType::Modified, Some(job("a")), job("a"))),
            Some("MODIFIED")
        );
        assert_eq!(
            ty(&event(EventType::Modified, Some(job("b")), job("a"))),
            Some("ADDED")
        );
        assert_eq!(
            ty(&event(EventType::Modified, Some(job("a")), job("b"))),
            Some("DELETED")
        );
        assert_eq!(
            ty(&event(EventType::Modified, Some(job("b")), job("c"))),
            None
        );
        assert_eq!(
            ty(&event(EventType::Deleted, Some(job("a")), job("a"))),
            Some("DELETED")
        );
    }

    #[test]
    fn other_namespaces_and_kinds_are_not_seen() {
        let r = req("");
        let mut other_ns = job("a");
        other_ns["metadata"]["namespace"] = json!("elsewhere");
        assert!(
            r.translate(&event(EventType::Added, None, other_ns))
                .is_none()
        );
        let pod = Event {
            kind: Kind::Pod,
            ..event(EventType::Added, None, job("a"))
        };
        assert!(r.translate(&pod).is_none());
    }
}
