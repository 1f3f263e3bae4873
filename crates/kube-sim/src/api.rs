//! The REST routes: Jobs (with the status subresource), Pods, pod logs, `pods/exec`,
//! `pods/attach` and `/version`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::admission;
use crate::deletion::{self, DeleteOptions, Deleted, ORPHAN_WARNING, Propagation};
use crate::meta;
use crate::pod_log::LogParams;
use crate::selector::{FieldSelector, LabelSelector};
use crate::shared::Shared;
use crate::status::{self, ApiError, Cause};
use crate::store::Kind;
use crate::watch::{self, WatchFault, WatchRequest};

type S = State<Arc<Shared>>;
type Query = HashMap<String, String>;
type ApiResult = Result<Response, ApiError>;

/// Builds the router over the shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/api", get(discovery_core_versions))
        .route("/apis", get(discovery_groups))
        .route("/api/v1", get(discovery_core_v1))
        .route("/apis/batch/v1", get(discovery_batch_v1))
        .route("/apis/batch/v1/jobs", get(list_all_jobs))
        .route("/api/v1/pods", get(list_all_pods))
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs",
            get(list_jobs).post(create_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
            get(get_job)
                .put(replace_job)
                .patch(patch_job)
                .delete(delete_job),
        )
        .route(
            "/apis/batch/v1/namespaces/{ns}/jobs/{name}/status",
            get(get_job).put(replace_job_status).patch(patch_job_status),
        )
        .route("/api/v1/namespaces/{ns}/pods", get(list_pods))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(get_pod).patch(patch_pod).delete(delete_pod),
        )
        .route("/api/v1/namespaces/{ns}/pods/{name}/status", get(get_pod))
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/exec",
            get(crate::exec::exec).post(crate::exec::exec),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/attach",
            get(crate::attach::attach).post(crate::attach::attach),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

async fn not_found() -> Response {
    let mut e = ApiError::bad_request("the server could not find the requested resource");
    e.code = 404;
    e.reason = "NotFound";
    e.into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}

async fn version() -> Json<Value> {
    Json(json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-kube-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }))
}

// Discovery, so `kubectl get jobs` works against the sim (debugging aid).

async fn discovery_core_versions() -> Json<Value> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
}

async fn discovery_groups() -> Json<Value> {
    let batch = json!({"groupVersion": "batch/v1", "version": "v1"});
    Json(json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [{"name": "batch", "versions": [batch], "preferredVersion": batch}],
    }))
}

fn resource(name: &str, singular: &str, kind: &str, verbs: &[&str], short: &[&str]) -> Value {
    let mut r = json!({
        "name": name,
        "singularName": singular,
        "namespaced": true,
        "kind": kind,
        "verbs": verbs,
    });
    if !short.is_empty() {
        r["shortNames"] = json!(short);
    }
    r
}

async fn discovery_core_v1() -> Json<Value> {
    Json(json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("pods", "pod", "Pod", &["delete", "get", "list", "patch", "watch"], &["po"]),
            resource("pods/log", "", "Pod", &["get"], &[]),
            resource("pods/status", "", "Pod", &["get"], &[]),
        ],
    }))
}

async fn discovery_batch_v1() -> Json<Value> {
    Json(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "batch/v1",
        "resources": [
            resource(
                "jobs",
                "job",
                "Job",
                &["create", "delete", "get", "list", "patch", "update", "watch"],
                &[],
            ),
            resource("jobs/status", "", "Job", &["get", "patch", "update"], &[]),
        ],
    }))
}

/// Writes must be JSON (a real server also speaks protobuf and YAML).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if ct.starts_with("application/json") || ct.contains("+json") {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(ct))
    }
}

fn parse_query(raw: Option<String>) -> Query {
    raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body could not be decoded as JSON: {e}"
        ))
    })
}

fn json_response(code: StatusCode, body: Value) -> Response {
    (code, Json(body)).into_response()
}

// ----- lists and watches -------------------------------------------------------------

async fn list_all_jobs(
    State(s): S,
    RawQuery(q): RawQuery,
    Extension(f): Extension<WatchFault>,
) -> ApiResult {
    list_or_watch(s, Kind::Job, None, parse_query(q), f)
}

async fn list_all_pods(
    State(s): S,
    RawQuery(q): RawQuery,
    Extension(f): Extension<WatchFault>,
) -> ApiResult {
    list_or_watch(s, Kind::Pod, None, parse_query(q), f)
}

async fn list_jobs(
    State(s): S,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
    Extension(f): Extension<WatchFault>,
) -> ApiResult {
    list_or_watch(s, Kind::Job, Some(ns), parse_query(q), f)
}

async fn list_pods(
    State(s): S,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
    Extension(f): Extension<WatchFault>,
) -> ApiResult {
    list_or_watch(s, Kind::Pod, Some(ns), parse_query(q), f)
}

fn list_or_watch(
    shared: Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    q: Query,
    fault: WatchFault,
) -> ApiResult {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rv = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))?,
        ),
    };
    if flag(&q, "watch") {
        let req = WatchRequest {
            kind,
            namespace: ns,
            labels,
            fields,
            since: rv,
            timeout: q
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map(Duration::from_secs),
            bookmarks: flag(&q, "allowWatchBookmarks"),
            send_initial_events: flag(&q, "sendInitialEvents"),
        };
        return Ok(watch::serve(shared, req, fault));
    }
    if let (Some(rv), Some("Exact")) = (rv, q.get("resourceVersionMatch").map(String::as_str))
        && shared.store.is_compacted(rv)
    {
        return Err(ApiError::gone(rv));
    }
    let (mut items, rev) = shared.store.list_matching(kind, ns.as_deref(), |o| {
        labels.matches_object(o) && fields.matches_object(o)
    });
    if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        let after = decode_continue(token)
            .ok_or_else(|| ApiError::bad_request(format!("invalid continue token {token:?}")))?;
        items.retain(|o| (meta::namespace(o).to_owned(), meta::name(o).to_owned()) > after);
    }
    let mut list_meta = json!({"resourceVersion": rev.to_string()});
    if let Some(limit) = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        let remaining = items.len() - limit;
        items.truncate(limit);
        if let Some(last) = items.last() {
            list_meta["continue"] = json!(encode_continue(meta::namespace(last), meta::name(last)));
            list_meta["remainingItemCount"] = json!(remaining);
        }
    }
    // Items of a list carry no kind/apiVersion on a real server.
    for item in &mut items {
        if let Some(m) = item.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
    }
    Ok(json_response(
        StatusCode::OK,
        json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": list_meta,
            "items": items,
        }),
    ))
}

fn encode_continue(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let (ns, name) = s.split_once('/')?;
    Some((ns.to_owned(), name.to_owned()))
}

// ----- single objects ----------------------------------------------------------------

async fn get_job(State(s): S, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    get_object(&s, Kind::Job, &ns, &name)
}

async fn get_pod(State(s): S, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    get_object(&s, Kind::Pod, &ns, &name)
}

fn get_object(shared: &Shared, kind: Kind, ns: &str, name: &str) -> ApiResult {
    shared
        .store
        .get(kind, ns, name)
        .map(|o| json_response(StatusCode::OK, o))
        .ok_or_else(|| ApiError::not_found(kind, name))
}

async fn create_job(
    State(s): S,
    Path(ns): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_json(&headers)?;
    let q = parse_query(q);
    let input = parse_json(&body)?;
    let generated = input
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty();
    let mut attempts = if generated { 3 } else { 1 };
    loop {
        let job = admission::prepare_job_create(&ns, input.clone())?;
        if q.get("dryRun").is_some_and(|v| !v.is_empty()) {
            return Ok(json_response(StatusCode::CREATED, job));
        }
        match s.store.create(Kind::Job, job) {
            Ok(created) => return Ok(json_response(StatusCode::CREATED, created)),
            // A generated name that clashes is retried with a new suffix.
            Err(e) if e.reason == "AlreadyExists" && attempts > 1 => attempts -= 1,
            Err(e) => return Err(e),
        }
    }
}

/// Applies a write of `new` over `cur`: the main resource ignores status changes, the
/// status subresource ignores everything but status.
fn apply_write(
    kind: Kind,
    cur: &mut Value,
    mut new: Value,
    status_only: bool,
) -> Result<(), ApiError> {
    let name = meta::name(cur).to_owned();
    let new_rv = new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !new_rv.is_empty() && new_rv.parse::<u64>().ok() != Some(meta::resource_version(cur)) {
        return Err(ApiError::conflict(kind, &name));
    }
    if status_only {
        cur["status"] = new.get("status").cloned().unwrap_or_else(|| json!({}));
        return Ok(());
    }
    match cur.get("status") {
        Some(st) => new["status"] = st.clone(),
        None => {
            if let Some(m) = new.as_object_mut() {
                m.remove("status");
            }
        }
    }
    let md = meta::metadata_mut(&mut new);
    for f in [
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "generateName",
    ] {
        match cur.pointer(&format!("/metadata/{f}")) {
            Some(v) => md.insert(f.into(), v.clone()),
            None => md.remove(f),
        };
    }
    if new.get("spec") != cur.get("spec") {
        let generation = cur
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta::metadata_mut(&mut new).insert("generation".into(), json!(generation + 1));
    }
    if kind == Kind::Job {
        admission::validate_job_update(cur, &new)?;
    }
    *cur = new;
    Ok(())
}

fn replace(
    shared: &Shared,
    kind: Kind,
    ns: &str,
    name: &str,
    body: &[u8],
    status_only: bool,
) -> ApiResult {
    let new = parse_json(body)?;
    let body_name = meta::name(&new);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let updated = shared.store.update(kind, ns, name, |cur| {
        if new
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            return Err(ApiError::invalid(
                kind,
                name,
                vec![Cause {
                    reason: "FieldValueInvalid",
                    message: "Invalid value: 0x0: must be specified for an update".into(),
                    field: "metadata.resourceVersion".into(),
                }],
            ));
        }
        apply_write(kind, cur, new.clone(), status_only)
    })?;
    Ok(json_response(StatusCode::OK, updated))
}

fn patch(
    shared: &Shared,
    kind: Kind,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
    status_only: bool,
) -> ApiResult {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let patch_doc = parse_json(body)?;
    let updated = shared.store.update(kind, ns, name, |cur| {
        let mut patched = cur.clone();
        match content_type.as_str() {
            // Strategic merge is treated as a JSON merge patch (no patchMergeKey lists).
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                json_patch::merge(&mut patched, &patch_doc);
            }
            "application/json-patch+json" => {
                let ops: json_patch::Patch = serde_json::from_value(patch_doc.clone())
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                json_patch::patch(&mut patched, &ops).map_err(|e| {
                    let mut err =
                        ApiError::bad_request(format!("the JSON patch could not be applied: {e}"));
                    err.code = 422;
                    err.reason = "Invalid";
                    err
                })?;
            }
            other => return Err(ApiError::unsupported_media_type(other)),
        }
        apply_write(kind, cur, patched, status_only)
    })?;
    Ok(json_response(StatusCode::OK, updated))
}

async fn replace_job(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_json(&headers)?;
    replace(&s, Kind::Job, &ns, &name, &body, false)
}

async fn replace_job_status(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require_json(&headers)?;
    replace(&s, Kind::Job, &ns, &name, &body, true)
}

async fn patch_job(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    patch(&s, Kind::Job, &ns, &name, &headers, &body, false)
}

async fn patch_job_status(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    patch(&s, Kind::Job, &ns, &name, &headers, &body, true)
}

async fn patch_pod(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    patch(&s, Kind::Pod, &ns, &name, &headers, &body, false)
}

// ----- deletion ----------------------------------------------------------------------

async fn delete_job(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let opts = DeleteOptions::parse(&parse_query(q), &body)?;
    let mut response = match deletion::delete_job(&s, &ns, &name, &opts)? {
        Deleted::Gone(last) => json_response(
            StatusCode::OK,
            status::deleted_status(Kind::Job, &name, meta::uid(&last)),
        ),
        Deleted::Terminating(obj) => json_response(StatusCode::ACCEPTED, obj),
    };
    if opts.propagation == Propagation::Unset {
        response
            .headers_mut()
            .insert(header::WARNING, HeaderValue::from_static(ORPHAN_WARNING));
    }
    Ok(response)
}

async fn delete_pod(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let opts = DeleteOptions::parse(&parse_query(q), &body)?;
    // Pods answer with the object, whether it is gone or terminating.
    let obj = match deletion::delete_pod(&s, &ns, &name, &opts)? {
        Deleted::Gone(o) | Deleted::Terminating(o) => o,
    };
    Ok(json_response(StatusCode::OK, obj))
}

// ----- logs --------------------------------------------------------------------------

async fn pod_log(
    State(s): S,
    Path((ns, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let q = parse_query(q);
    let pod = s
        .store
        .get(Kind::Pod, &ns, &name)
        .ok_or_else(|| ApiError::not_found(Kind::Pod, &name))?;
    let container = pod
        .pointer("/spec/containers/0/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if let Some(c) = q.get("container").filter(|c| !c.is_empty())
        && *c != container
    {
        return Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        )));
    }
    let params = LogParams {
        tail_lines: q.get("tailLines").and_then(|v| v.parse().ok()),
        limit_bytes: q.get("limitBytes").and_then(|v| v.parse().ok()),
        follow: flag(&q, "follow"),
        previous: flag(&q, "previous"),
    };
    let log = s.kubelet.log(&ns, &name);
    if params.previous {
        return match log.filter(|l| l.has_previous()) {
            Some(l) => Ok(text(l.read(&params))),
            None => Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            ))),
        };
    }
    let state = pod.pointer("/status/containerStatuses/0/state");
    let waiting = match state {
        None => Some("ContainerCreating".to_owned()),
        Some(st) => st.get("waiting").map(|w| {
            match w
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("ContainerCreating")
            {
                "ErrImagePull" | "ImagePullBackOff" => {
                    "trying and failing to pull image".to_owned()
                }
                other => other.to_owned(),
            }
        }),
    };
    if let Some(reason) = waiting {
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {reason}"
        )));
    }
    let Some(log) = log else {
        return Ok(text(Vec::new()));
    };
    if params.follow {
        let rx = log.follow(params, s.shutdown.clone());
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| Response::new(Body::empty())));
    }
    Ok(text(log.read(&params)))
}

fn text(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], bytes).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue("ns", "job-1");
        assert_eq!(decode_continue(&t), Some(("ns".into(), "job-1".into())));
        assert_eq!(decode_continue("zz"), None);
    }
}
