//! Deletion: `DeleteOptions`, graceful pod deletion, and the three Job propagation
//! policies. The garbage collection that follows a Job's removal lives in the
//! controller ([`crate::controller`]), which sees the `DELETED` event.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::meta;
use crate::shared::Shared;
use crate::status::ApiError;
use crate::store::Kind;

/// The finalizer that holds a Job during Foreground deletion.
pub(crate) const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// `propagationPolicy` of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    Background,
    Foreground,
    Orphan,
    /// No policy given: batch/v1 Jobs orphan their pods (with a warning).
    Unset,
}

/// Parsed `DeleteOptions` (body or query).
#[derive(Debug, Clone)]
pub(crate) struct DeleteOptions {
    pub(crate) propagation: Propagation,
    pub(crate) grace_period_seconds: Option<i64>,
    precondition_uid: Option<String>,
    precondition_rv: Option<String>,
    pub(crate) dry_run: bool,
}

impl DeleteOptions {
    /// Options from the JSON body, falling back to query parameters.
    pub(crate) fn parse(query: &HashMap<String, String>, body: &[u8]) -> Result<Self, ApiError> {
        let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        let policy = body
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| query.get("propagationPolicy").cloned());
        let propagation = match policy.as_deref() {
            None | Some("") => Propagation::Unset,
            Some("Background") => Propagation::Background,
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy: Unsupported value: \"{other}\": supported values: \
                     \"Foreground\", \"Background\", \"Orphan\""
                )));
            }
        };
        let grace_period_seconds = body
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| query.get("gracePeriodSeconds").and_then(|v| v.parse().ok()));
        let dry_run = body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
            || query.get("dryRun").is_some_and(|v| !v.is_empty());
        Ok(Self {
            propagation,
            grace_period_seconds,
            precondition_uid: body
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_owned),
            precondition_rv: body
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_owned),
            dry_run,
        })
    }

    fn check_preconditions(&self, kind: Kind, object: &Value) -> Result<(), ApiError> {
        let name = meta::name(object);
        if let Some(uid) = &self.precondition_uid
            && uid != meta::uid(object)
        {
            let mut e = ApiError::conflict(kind, name);
            e.message = format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta::uid(object)
            );
            return Err(e);
        }
        if let Some(rv) = &self.precondition_rv
            && rv.parse::<u64>().ok() != Some(meta::resource_version(object))
        {
            return Err(ApiError::conflict(kind, name));
        }
        Ok(())
    }
}

/// What a delete did.
pub(crate) enum Deleted {
    /// The object is gone; its last state.
    Gone(Value),
    /// The object is terminating (finalizers or grace period pending).
    Terminating(Value),
}

/// Deletes a Job with the given propagation.
pub(crate) fn delete_job(
    shared: &Shared,
    ns: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<Deleted, ApiError> {
    let store = &shared.store;
    let job = store
        .get(Kind::Job, ns, name)
        .ok_or_else(|| ApiError::not_found(Kind::Job, name))?;
    opts.check_preconditions(Kind::Job, &job)?;
    if meta::is_deleting(&job) || opts.dry_run {
        return Ok(Deleted::Terminating(job));
    }
    shared.record_propagation(meta::uid(&job), opts.propagation);
    let foreground = opts.propagation == Propagation::Foreground;
    if !foreground && meta::finalizers(&job).is_empty() {
        return Ok(match store.remove(Kind::Job, ns, name) {
            Some(last) => Deleted::Gone(last),
            None => return Err(ApiError::not_found(Kind::Job, name)),
        });
    }
    let updated = store.update(Kind::Job, ns, name, |j| {
        let mut fins = meta::finalizers(j);
        if foreground && !fins.iter().any(|f| f == FOREGROUND_FINALIZER) {
            fins.push(FOREGROUND_FINALIZER.to_owned());
        }
        meta::set_finalizers(j, &fins);
        let md = meta::metadata_mut(j);
        md.insert("deletionTimestamp".into(), json!(meta::now()));
        md.insert("deletionGracePeriodSeconds".into(), json!(0));
        Ok(())
    })?;
    Ok(if meta::ready_to_remove(&updated) {
        Deleted::Gone(updated)
    } else {
        Deleted::Terminating(updated)
    })
}

/// Deletes a pod gracefully: it gets a deletionTimestamp and the kubelet stops its
/// container; pods that never started or already ended go at once (modulo
/// finalizers).
pub(crate) fn delete_pod(
    shared: &Shared,
    ns: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<Deleted, ApiError> {
    let store = &shared.store;
    let pod = store
        .get(Kind::Pod, ns, name)
        .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
    opts.check_preconditions(Kind::Pod, &pod)?;
    if meta::is_deleting(&pod) || opts.dry_run {
        return Ok(Deleted::Terminating(pod));
    }
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    let scheduled = pod.pointer("/spec/nodeName").is_some_and(|v| !v.is_null());
    let grace = if !scheduled || phase == "Succeeded" || phase == "Failed" {
        0
    } else {
        opts.grace_period_seconds
            .or_else(|| {
                pod.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0)
    };
    let updated = store.update(Kind::Pod, ns, name, |p| {
        let md = meta::metadata_mut(p);
        md.insert("deletionTimestamp".into(), json!(meta::now()));
        md.insert("deletionGracePeriodSeconds".into(), json!(grace));
        Ok(())
    })?;
    Ok(if meta::ready_to_remove(&updated) {
        Deleted::Gone(updated)
    } else {
        Deleted::Terminating(updated)
    })
}

/// The `Warning` header a delete of a Job without a propagation policy gets.
pub(crate) const ORPHAN_WARNING: &str = "299 - \"child pods are preserved by default when jobs are deleted; set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress this warning\"";
