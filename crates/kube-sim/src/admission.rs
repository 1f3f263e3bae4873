//! Server-side defaulting and validation of Jobs, as the real API server does them on
//! create and update. Callers that round-trip objects or compare specs depend on the
//! defaults being there, and a Job name over 63 characters must fail with 422.

use serde_json::{Map, Value, json};

use crate::meta;
use crate::selector::{is_dns1123_label, is_dns1123_subdomain, label_key_error, label_value_error};
use crate::status::{ApiError, Cause};
use crate::store::Kind;

/// Label keys the Job controller puts on the template (old and new spellings).
pub(crate) const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
const LEGACY_CONTROLLER_UID_LABEL: &str = "controller-uid";
pub(crate) const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
const LEGACY_JOB_NAME_LABEL: &str = "job-name";

/// Prepares a Job for creation in `namespace`: name (from generateName), uid,
/// defaults, cleared status. Returns 400/422 errors like the API server.
pub(crate) fn prepare_job_create(namespace: &str, mut job: Value) -> Result<Value, ApiError> {
    if !job.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let body_ns = meta::namespace(&job).to_owned();
    if !body_ns.is_empty() && body_ns != namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let md = meta::metadata_mut(&mut job);
    md.insert("namespace".into(), json!(namespace));
    // Read-only fields are reset by the server.
    for f in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "selfLink",
        "managedFields",
    ] {
        md.remove(f);
    }
    let name = md
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if name.is_empty() {
        let prefix = md.get("generateName").and_then(Value::as_str).unwrap_or("");
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                Kind::Job,
                "",
                vec![Cause {
                    reason: "FieldValueRequired",
                    message: "Required value: name or generateName is required".into(),
                    field: "metadata.name".into(),
                }],
            ));
        }
        md.insert("name".into(), json!(meta::generate_name(prefix, 63)));
    }
    let uid = uuid::Uuid::new_v4().to_string();
    md.insert("uid".into(), json!(uid));
    md.insert("generation".into(), json!(1));

    default_job_spec(&mut job, &uid);
    job["status"] = json!({});
    validate_job(&job)?;
    Ok(job)
}

fn default_job_spec(job: &mut Value, uid: &str) {
    if !job["spec"].is_object() {
        job["spec"] = json!({});
    }
    let name = meta::name(job).to_owned();
    let spec = &mut job["spec"];
    let parallelism_set = spec.get("parallelism").is_some_and(|v| !v.is_null());
    let completions_set = spec.get("completions").is_some_and(|v| !v.is_null());
    if !parallelism_set {
        spec["parallelism"] = json!(1);
    }
    if !completions_set && !parallelism_set {
        spec["completions"] = json!(1);
    }
    default_field(spec, "backoffLimit", json!(6));
    default_field(spec, "completionMode", json!("NonIndexed"));
    default_field(spec, "suspend", json!(false));
    default_field(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));

    let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
    if !spec["template"].is_object() {
        spec["template"] = json!({});
    }
    if !manual {
        spec["selector"] = json!({"matchLabels": {CONTROLLER_UID_LABEL: uid}});
        let labels = object_at(&mut spec["template"], "metadata");
        let labels = object_entry(labels, "labels");
        labels.insert(CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(LEGACY_CONTROLLER_UID_LABEL.into(), json!(uid));
        labels.insert(JOB_NAME_LABEL.into(), json!(name));
        labels.insert(LEGACY_JOB_NAME_LABEL.into(), json!(name));
    }
    default_pod_spec(&mut spec["template"]["spec"]);

    // A Job without labels of its own gets its template's labels.
    let template_labels = job
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let md = meta::metadata_mut(job);
    let has_labels = md
        .get("labels")
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty());
    if !has_labels {
        md.insert("labels".into(), template_labels);
    }
}

/// Pod spec defaults applied to Job templates.
pub(crate) fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    default_field(spec, "restartPolicy", json!("Always"));
    default_field(spec, "terminationGracePeriodSeconds", json!(30));
    default_field(spec, "dnsPolicy", json!("ClusterFirst"));
    default_field(spec, "schedulerName", json!("default-scheduler"));
    default_field(spec, "securityContext", json!({}));
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in containers {
            if !c.is_object() {
                continue;
            }
            default_field(c, "terminationMessagePath", json!("/dev/termination-log"));
            default_field(c, "terminationMessagePolicy", json!("File"));
            default_field(c, "resources", json!({}));
            let image = c
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            default_field(c, "imagePullPolicy", json!(image_pull_policy(&image)));
        }
    }
}

/// `Always` for `:latest` or an untagged image, otherwise `IfNotPresent`.
fn image_pull_policy(image: &str) -> &'static str {
    let without_digest = image.split('@').next().unwrap_or("");
    let last = without_digest.rsplit('/').next().unwrap_or("");
    match last.split_once(':') {
        _ if image.contains('@') => "IfNotPresent",
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_field(object: &mut Value, key: &str, value: Value) {
    if object.get(key).is_none_or(Value::is_null) {
        object[key] = value;
    }
}

fn object_at<'a>(parent: &'a mut Value, key: &str) -> &'a mut Value {
    if !parent[key].is_object() {
        parent[key] = json!({});
    }
    &mut parent[key]
}

fn object_entry<'a>(parent: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let v = object_at(parent, key);
    match v {
        Value::Object(m) => m,
        // object_at made it an object.
        _ => unreachable!("object_at returns an object"),
    }
}

fn invalid(field: &str, value: &str, message: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: \"{value}\": {message}"),
        field: field.to_owned(),
    }
}

fn required(field: &str) -> Cause {
    Cause {
        reason: "FieldValueRequired",
        message: "Required value".into(),
        field: field.to_owned(),
    }
}

/// Validates a (defaulted) Job; every failed field becomes a `details.causes[]` entry.
pub(crate) fn validate_job(job: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let name = meta::name(job);
    if !is_dns1123_subdomain(name) {
        causes.push(invalid(
            "metadata.name",
            name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        ));
    }
    // The Job name becomes a label value on its pods, hence the 63-character limit.
    if name.len() > 63 {
        causes.push(invalid(
            "metadata.name",
            name,
            "must be no more than 63 characters",
        ));
    }
    validate_labels(
        job.pointer("/metadata/labels"),
        "metadata.labels",
        &mut causes,
    );
    validate_labels(
        job.pointer("/spec/template/metadata/labels"),
        "spec.template.metadata.labels",
        &mut causes,
    );
    if let Some(annotations) = job
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        for k in annotations.keys() {
            if let Some(e) = label_key_error(k) {
                causes.push(invalid("metadata.annotations", k, &e));
            }
        }
    }
    for (field, min) in [
        ("backoffLimit", 0),
        ("parallelism", 0),
        ("completions", 0),
        ("activeDeadlineSeconds", 1),
        ("ttlSecondsAfterFinished", 0),
    ] {
        if let Some(v) = job["spec"].get(field).filter(|v| !v.is_null()) {
            match v.as_i64() {
                Some(n) if n >= min => {}
                _ => causes.push(invalid(
                    &format!("spec.{field}"),
                    &v.to_string(),
                    if min == 0 {
                        "must be greater than or equal to 0"
                    } else {
                        "must be greater than 0"
                    },
                )),
            }
        }
    }
    let pod_spec = &job["spec"]["template"]["spec"];
    let restart = pod_spec
        .get("restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always");
    if restart != "Never" && restart != "OnFailure" {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: \"{restart}\": supported values: \"OnFailure\", \"Never\""
            ),
            field: "spec.template.spec.restartPolicy".into(),
        });
    }
    validate_containers(pod_spec, "spec.template.spec", &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(Kind::Job, name, causes))
    }
}

fn validate_labels(labels: Option<&Value>, field: &str, causes: &mut Vec<Cause>) {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in labels {
        if let Some(e) = label_key_error(k) {
            causes.push(invalid(field, k, &e));
        }
        match v.as_str() {
            Some(v) => {
                if let Some(e) = label_value_error(v) {
                    causes.push(invalid(field, v, &e));
                }
            }
            None => causes.push(invalid(
                field,
                &v.to_string(),
                "label values must be strings",
            )),
        }
    }
}

fn validate_containers(pod_spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = pod_spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        causes.push(required(&format!("{path}.containers")));
    }
    let volumes: Vec<String> = pod_spec
        .get("volumes")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (i, c) in containers.iter().enumerate() {
        let at = format!("{path}.containers[{i}]");
        match c.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(required(&format!("{at}.name"))),
            Some(n) if !is_dns1123_label(n) => causes.push(invalid(
                &format!("{at}.name"),
                n,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
                 '-', and must start and end with an alphanumeric character",
            )),
            Some(_) => {}
        }
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .is_empty()
        {
            causes.push(required(&format!("{at}.image")));
        }
        if let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) {
            for (j, m) in mounts.iter().enumerate() {
                let vname = m.get("name").and_then(Value::as_str).unwrap_or("");
                if !volumes.iter().any(|v| v == vname) {
                    causes.push(Cause {
                        reason: "FieldValueNotFound",
                        message: format!("Not found: \"{vname}\""),
                        field: format!("{at}.volumeMounts[{j}].name"),
                    });
                }
                if m.get("mountPath")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push(required(&format!("{at}.volumeMounts[{j}].mountPath")));
                }
            }
        }
        if let Some(env) = c.get("env").and_then(Value::as_array) {
            for (j, e) in env.iter().enumerate() {
                if e.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push(required(&format!("{at}.env[{j}].name")));
                }
            }
        }
    }
}

/// Checks an update of a Job against the stored one: spec.selector and spec.template
/// are immutable; other fields are validated as on create.
pub(crate) fn validate_job_update(old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = meta::name(old);
    let mut causes = Vec::new();
    for field in ["selector", "template", "completionMode"] {
        if old["spec"].get(field) != new["spec"].get(field) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: "Invalid value: ...: field is immutable".into(),
                field: format!("spec.{field}"),
            });
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(Kind::Job, name, causes));
    }
    validate_job(new)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn minimal(name: &str) -> Value {
        json!({
            "metadata": {"name": name},
            "spec": {"template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox"}],
            }}},
        })
    }

    #[test]
    fn create_applies_defaults() {
        let job = prepare_job_create("ns", minimal("j")).unwrap();
        assert_eq!(job["spec"]["backoffLimit"], 6);
        assert_eq!(job["spec"]["completions"], 1);
        assert_eq!(job["spec"]["parallelism"], 1);
        assert_eq!(job["spec"]["completionMode"], "NonIndexed");
        assert_eq!(job["spec"]["suspend"], false);
        let uid = job["metadata"]["uid"].as_str().unwrap();
        assert_eq!(
            job["spec"]["selector"]["matchLabels"][CONTROLLER_UID_LABEL],
            uid
        );
        let labels = &job["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["job-name"], "j");
        assert_eq!(labels[JOB_NAME_LABEL], "j");
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["terminationMessagePath"], "/dev/termination-log");
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(
            job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            30
        );
        assert_eq!(job["metadata"]["generation"], 1);
        assert_eq!(job["metadata"]["labels"]["job-name"], "j");
    }

    #[test]
    fn long_and_malformed_names_are_invalid() {
        let err = prepare_job_create("ns", minimal(&"a".repeat(64))).unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(err.reason, "Invalid");
        assert!(err.causes.iter().any(|c| c.field == "metadata.name"));
        assert!(prepare_job_create("ns", minimal("Bad_Name")).is_err());
        assert!(prepare_job_create("ns", minimal(&"a".repeat(63))).is_ok());
    }

    #[test]
    fn restart_policy_and_containers_are_checked() {
        let mut j = minimal("j");
        j["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
        j["spec"]["template"]["spec"]["containers"] = json!([{"name": ""}]);
        let err = prepare_job_create("ns", j).unwrap_err();
        let fields: Vec<&str> = err.causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"spec.template.spec.restartPolicy"));
        assert!(fields.contains(&"spec.template.spec.containers[0].name"));
        assert!(fields.contains(&"spec.template.spec.containers[0].image"));
    }

    #[test]
    fn image_pull_policy_follows_tag() {
        assert_eq!(image_pull_policy("busybox"), "Always");
        assert_eq!(image_pull_policy("busybox:latest"), "Always");
        assert_eq!(image_pull_policy("reg:5000/busybox:1.36"), "IfNotPresent");
        assert_eq!(image_pull_policy("reg:5000/busybox"), "Always");
    }
}
