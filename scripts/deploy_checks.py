#!/usr/bin/env python3
"""Offline checks of sandfleet's deployment files.

Run by scripts/validate-deploy.sh (which installs the tools and renders the
kustomize overlays); each subcommand can also be run on its own:

  deploy_checks.py k8s NAME RENDERED.yaml [--k8s-version V ...]
      Schema-validates every rendered object (kubernetes-validate, strict) and
      checks what the schemas cannot: the worker's drain vs grace period,
      probes, hardening, Secret-sourced credentials, config keys, Service and
      ServiceMonitor selectors, one autoscaler at most, the Role, the sandbox
      NetworkPolicy and RabbitMQ's consumer_timeout.
  deploy_checks.py compose docker-compose.yml
      What the Compose schema cannot check: start order, health checks,
      mounted files, config keys, stop grace period, consumer_timeout.
  deploy_checks.py grafana DASHBOARD.json
      The dashboard parses and queries only metrics sandfleet exports.
  deploy_checks.py dockerignore
      The Docker build context keeps every workspace member.
  deploy_checks.py rbac [--observed FILE] [--exact]
      The worker's Role (k8s/base/worker-rbac.yaml) against the Kubernetes
      calls the worker was observed making (see docs/deploy.md, "RBAC").
  deploy_checks.py sandbox-job RENDERED.yaml
      The Job the worker creates (crates/sandbox/tests/snapshots/job.json)
      is schema-valid, meets the sandbox namespace's Pod Security level, runs
      as its ServiceAccount and is selected by its egress NetworkPolicy.
  deploy_checks.py selftest RENDERED.yaml
      Feeds broken inputs to the checks above and fails unless each is caught.

Every failure is printed as `FAIL <where>: <what>`; the exit code is 1 when
any check failed.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import glob
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

WORKER_NS = "sandfleet"
SANDBOX_NS = "sandfleet-sandboxes"

# Custom resources the Kubernetes schemas do not describe. Their objects are
# not schema-validated (said so in the output) but are cross-checked below.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "RabbitmqCluster": "rabbitmq.com/v1beta1",
}

# The Kubernetes calls the worker makes, as (API group, resource, verb): the
# calls in crates/sandbox/src/kubernetes/api.rs and its watchers (jobs:
# create, get_opt, delete, list, watch; pods: list, watch; pods/log). `rbac`
# also compares the Role with `sandfleet_sandbox::REQUIRED_PERMISSIONS` and
# with what the code was observed sending (`--observed`).
WORKER_PERMISSIONS = {
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "delete"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
}

# The Kubernetes calls of the sessions service are read from the code
# (crates/sandbox/src/session/kubernetes: `SESSION_PERMISSIONS`, see
# `sessions_permissions`): its Role, k8s/base/sessions-rbac.yaml, must grant
# exactly these, and it is the only Role that may grant pods/exec and
# pods/attach (design decision 12).

# Metrics sandfleet exports (worker and gateway), without the `_bucket`,
# `_sum`, `_count` suffixes of histograms.
METRICS = {
    "sandfleet_tasks_total",
    "sandfleet_task_retries_total",
    "sandfleet_tasks_rejected_total",
    "sandfleet_tasks_dead_lettered_total",
    "sandfleet_tasks_in_flight",
    "sandfleet_queue_ready_messages",
    "sandfleet_task_duration_seconds",
    "sandfleet_breaker_state",
    "sandfleet_kube_api_request_duration_seconds",
    "sandfleet_kube_api_errors_total",
    "sandfleet_gateway_requests_total",
    "sandfleet_gateway_tasks_enqueued_total",
}

DEFAULT_DRAIN_TIMEOUT_SECS = 60


class Report:
    """Collects failures; prints passes and skips as it goes."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def fail(self, where: str, what: str) -> None:
        self.failures.append(f"{where}: {what}")
        print(f"  FAIL {where}: {what}")

    def ok(self, what: str) -> None:
        print(f"  ok   {what}")

    def skip(self, what: str) -> None:
        print(f"  skip {what}")

    def check(self, cond: bool, where: str, what: str) -> bool:
        if not cond:
            self.fail(where, what)
        return cond


# --------------------------------------------------------------------------
# Settings keys, read from the Rust structs so that a renamed or misspelt key
# in a manifest, a TOML file or an environment variable is caught.


class SettingsSchema:
    """The settings tree: struct name -> {field name: field type}."""

    STRUCT_RE = re.compile(r"pub struct (\w+)\s*\{(.*?)\n\}", re.S)
    FIELD_RE = re.compile(r"^\s*pub (\w+):\s*(.+?),\s*$", re.M)

    def __init__(self, root: Path = ROOT) -> None:
        self.structs: dict[str, dict[str, str]] = {}
        files = sorted(glob.glob(str(root / "crates/settings/src/**/*.rs"), recursive=True))
        files += sorted(glob.glob(str(root / "crates/proto/src/**/*.rs"), recursive=True))
        for f in files:
            text = Path(f).read_text()
            for name, body in self.STRUCT_RE.findall(text):
                fields = dict(self.FIELD_RE.findall(body))
                if fields:
                    self.structs.setdefault(name, fields)
        self.available = "Settings" in self.structs

    def _struct_of(self, ty: str) -> str | None:
        ty = ty.strip()
        m = re.fullmatch(r"Option<(.+)>", ty)
        if m:
            ty = m.group(1)
        ty = ty.split("::")[-1]
        return ty if ty in self.structs else None

    def check_path(self, path: list[str]) -> str | None:
        """None when `path` (lowercase keys) names a setting, else why not."""
        struct = "Settings"
        for i, key in enumerate(path):
            fields = self.structs.get(struct, {})
            if key not in fields:
                where = ".".join(path[:i]) or "top level"
                return f"no setting `{key}` in {where} (struct {struct})"
            nested = self._struct_of(fields[key])
            if i == len(path) - 1:
                return None
            if nested is None:
                return f"`{'.'.join(path[: i + 1])}` is a value, not a section"
            struct = nested
        return None

    def check_env(self, name: str) -> str | None:
        if not name.startswith("SANDFLEET__"):
            return None
        return self.check_path([p.lower() for p in name[len("SANDFLEET__"):].split("__")])

    def check_toml(self, doc: dict, prefix: list[str] | None = None) -> list[str]:
        errors = []
        prefix = prefix or []
        for key, value in doc.items():
            path = prefix + [key]
            why = self.check_path(path)
            if why:
                errors.append(why)
                continue
            struct = "Settings"
            for k in path:
                struct = self._struct_of(self.structs[struct][k]) or ""
            if isinstance(value, dict) and struct:
                errors.extend(self.check_toml(value, path))
        return errors


# --------------------------------------------------------------------------
# Kubernetes


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def obj_id(o: dict) -> str:
    md = o.get("metadata", {})
    ns = md.get("namespace")
    return f"{o.get('kind')}/{ns + '/' if ns else ''}{md.get('name')}"


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def schema_validate(objs: list[dict], versions: list[str], rep: Report, name: str) -> None:
    import kubernetes_validate as kv

    skipped: dict[str, int] = {}
    counted = 0
    for o in objs:
        kind = o.get("kind")
        if kind in CRD_KINDS:
            if rep.check(o.get("apiVersion") == CRD_KINDS[kind], obj_id(o),
                         f"apiVersion {o.get('apiVersion')}, expected {CRD_KINDS[kind]}"):
                skipped[kind] = skipped.get(kind, 0) + 1
            continue
        for v in versions:
            try:
                kv.validate(o, v, strict=True)
            except kv.SchemaNotFoundError:
                rep.fail(obj_id(o), f"no Kubernetes {v} schema for {o.get('apiVersion')} {kind} "
                         "(a custom resource? add it to CRD_KINDS with its own checks)")
                break
            except kv.ValidationError as e:
                rep.fail(obj_id(o), f"Kubernetes {v} schema: {e.message} at {'.'.join(map(str, e.path))}")
                break
        else:
            counted += 1
    rep.ok(f"{name}: {counted} objects valid against the Kubernetes {', '.join(versions)} schemas (strict)")
    if skipped:
        rep.skip(f"{name}: not schema-validated (custom resources, not in the Kubernetes schemas): "
                 + ", ".join(f"{k} x{n}" for k, n in sorted(skipped.items())) + "; cross-checked below")


def check_k8s(name: str, objs: list[dict], rep: Report, settings: SettingsSchema) -> None:
    where = name
    ns_names = {o["metadata"]["name"] for o in find(objs, "Namespace")}
    rep.check({WORKER_NS, SANDBOX_NS} <= ns_names, where, f"namespaces {WORKER_NS} and {SANDBOX_NS} must be defined")
    for ns in find(objs, "Namespace"):
        labels = ns["metadata"].get("labels", {})
        want = "restricted" if ns["metadata"]["name"] == SANDBOX_NS else "baseline"
        rep.check(labels.get("pod-security.kubernetes.io/enforce") == want, obj_id(ns),
                  f"Pod Security Admission must enforce `{want}`")
    for o in objs:
        if o["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            rep.check(o["kind"] == "Namespace", obj_id(o), "no cluster-scoped RBAC: the worker's Role is namespaced")
            continue
        rep.check(o["metadata"].get("namespace") in (WORKER_NS, SANDBOX_NS), obj_id(o),
                  f"namespace must be {WORKER_NS} or {SANDBOX_NS}")

    # --- ConfigMap with sandfleet.toml
    config_toml: dict = {}
    cms = [o for o in find(objs, "ConfigMap") if "sandfleet.toml" in o.get("data", {})]
    if rep.check(len(cms) == 1, where, "exactly one ConfigMap with sandfleet.toml"):
        try:
            config_toml = tomllib.loads(cms[0]["data"]["sandfleet.toml"])
        except tomllib.TOMLDecodeError as e:
            rep.fail(obj_id(cms[0]), f"sandfleet.toml does not parse: {e}")
        if settings.available:
            for err in settings.check_toml(config_toml):
                rep.fail(obj_id(cms[0]) + " sandfleet.toml", err)

    # --- worker Deployment
    workers = find(objs, "Deployment", "sandfleet-worker")
    drain = None
    if rep.check(len(workers) == 1, where, "one Deployment sandfleet-worker"):
        w = workers[0]
        wid = obj_id(w)
        pod = w["spec"]["template"]["spec"]
        rep.check("replicas" not in w["spec"], wid, "no spec.replicas: the autoscaler owns the count")
        c = pod["containers"][0]
        env = env_map(c)
        check_all_containers(wid, pod, cms, settings, rep)
        rep.check(env.get("SANDFLEET__WORKER__EXECUTOR", {}).get("value") == "kubernetes", wid,
                  "SANDFLEET__WORKER__EXECUTOR must be `kubernetes`")
        amqp = env.get("SANDFLEET__AMQP__URL", {})
        rep.check("secretKeyRef" in amqp.get("valueFrom", {}), wid, "SANDFLEET__AMQP__URL must come from a Secret key")
        drain = DEFAULT_DRAIN_TIMEOUT_SECS
        drain = int(config_toml.get("worker", {}).get("drain_timeout_secs", drain))
        if "value" in env.get("SANDFLEET__WORKER__DRAIN_TIMEOUT_SECS", {}):
            drain = int(env["SANDFLEET__WORKER__DRAIN_TIMEOUT_SECS"]["value"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        rep.check(grace > drain, wid,
                  f"terminationGracePeriodSeconds {grace} must exceed the drain timeout {drain}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        rep.check(ports.get("http") == 9090, wid, "container port 9090 named `http`")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            rep.check(get.get("path") == path and get.get("port") in ("http", 9090), wid,
                      f"{probe} must GET {path} on port http")
        rep.check(pod.get("serviceAccountName") == "sandfleet-worker", wid, "serviceAccountName sandfleet-worker")
        if settings.available:
            ns = env.get("SANDFLEET__SANDBOX__KUBERNETES__NAMESPACE", {}).get(
                "value", config_toml.get("sandbox", {}).get("kubernetes", {}).get("namespace", SANDBOX_NS))
            rep.check(ns == SANDBOX_NS, wid, f"sandbox namespace {ns}, but the Role is in {SANDBOX_NS}")
        rep.ok(f"{name}: worker Deployment (grace {grace}s > drain {drain}s, probes, hardening, secrets, config)")

    # --- gateway Deployment
    gateways = find(objs, "Deployment", "sandfleet-gateway")
    if rep.check(len(gateways) == 1, where, "one Deployment sandfleet-gateway"):
        g = gateways[0]
        gid = obj_id(g)
        pod = g["spec"]["template"]["spec"]
        c = pod["containers"][0]
        rep.check(pod.get("automountServiceAccountToken") is False, gid, "automountServiceAccountToken: false")
        rep.check(pod.get("serviceAccountName") == "sandfleet-gateway", gid, "serviceAccountName sandfleet-gateway")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        rep.check(ports.get("http") == 8080, gid, "container port 8080 named `http`")
        check_all_containers(gid, pod, cms, settings, rep)
        rep.ok(f"{name}: gateway Deployment (no token, hardening, secrets, config)")

    # --- Secrets referenced exist or are documented as user-created
    # --- Services select pods, ServiceMonitors select Services
    deployments = find(objs, "Deployment")
    for svc in find(objs, "Service"):
        sel = svc["spec"].get("selector", {})
        targets = [d for d in deployments if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
                   and selector_matches(sel, d["spec"]["template"]["metadata"].get("labels", {}))]
        if rep.check(bool(targets), obj_id(svc), f"selector {sel} matches no Deployment's pods"):
            names = {p.get("name") for d in targets for c in d["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                tp = p.get("targetPort")
                if isinstance(tp, str):
                    rep.check(tp in names, obj_id(svc), f"targetPort {tp} is no named container port")
    for sm in find(objs, "ServiceMonitor"):
        sel = sm["spec"]["selector"].get("matchLabels", {})
        svcs = [s for s in find(objs, "Service") if selector_matches(sel, s["metadata"].get("labels", {}))
                and s["metadata"]["namespace"] in sm["spec"].get("namespaceSelector", {}).get("matchNames", [])]
        if rep.check(len(svcs) >= 1, obj_id(sm), f"selector {sel} matches no Service"):
            port_names = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                rep.check(ep.get("port") in port_names, obj_id(sm), f"endpoint port {ep.get('port')} not on the Service")
    for pdb in find(objs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        rep.check(any(selector_matches(sel, d["spec"]["template"]["metadata"]["labels"]) for d in deployments),
                  obj_id(pdb), "selects no Deployment's pods")
    for ing in find(objs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                backend = p["backend"]["service"]["name"]
                rep.check(bool(find(objs, "Service", backend)), obj_id(ing), f"backend Service {backend} missing")

    # --- autoscaling: at most one scaler per Deployment
    scalers: dict[str, list[str]] = {}
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]["name"]
        scalers.setdefault(ref, []).append(obj_id(hpa))
        rep.check(bool(find(objs, "Deployment", ref)), obj_id(hpa), f"scaleTargetRef {ref} missing")
        ext = [m for m in hpa["spec"].get("metrics", []) if m["type"] == "External"]
        rep.check(any(m["external"]["metric"]["name"] == "sandfleet_queue_ready_messages"
                      and m["external"]["target"]["type"] == "AverageValue" for m in ext),
                  obj_id(hpa), "External metric sandfleet_queue_ready_messages with an AverageValue target")
        rep.check(any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "sandfleet_tasks_in_flight"
                      for m in hpa["spec"].get("metrics", [])), obj_id(hpa),
                  "Pods metric sandfleet_tasks_in_flight (keeps busy workers from being scaled away)")
        rep.check(all(m["type"] != "Resource" for m in hpa["spec"].get("metrics", [])), obj_id(hpa),
                  "no CPU/memory metric: queue depth is the signal")
        check_scale_down(obj_id(hpa), hpa["spec"].get("behavior", {}), drain, rep)
    for so in find(objs, "ScaledObject"):
        ref = so["spec"]["scaleTargetRef"]["name"]
        scalers.setdefault(ref, []).append(obj_id(so))
        rep.check(bool(find(objs, "Deployment", ref)), obj_id(so), f"scaleTargetRef {ref} missing")
        trig = [t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq"]
        if rep.check(len(trig) == 1, obj_id(so), "one rabbitmq trigger"):
            t = trig[0]
            rep.check(t["metadata"].get("mode") == "QueueLength", obj_id(so), "mode QueueLength")
            rep.check("host" not in t["metadata"], obj_id(so), "host must come from a TriggerAuthentication")
            auth = t.get("authenticationRef", {}).get("name")
            tas = find(objs, "TriggerAuthentication", auth)
            if rep.check(len(tas) == 1, obj_id(so), f"TriggerAuthentication {auth} missing"):
                params = {s["parameter"] for s in tas[0]["spec"].get("secretTargetRef", [])}
                rep.check("host" in params, obj_id(tas[0]), "secretTargetRef for `host`")
        behavior = so["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
        check_scale_down(obj_id(so), behavior, drain, rep)
    for ref, who in scalers.items():
        rep.check(len(who) == 1, where, f"Deployment {ref} has {len(who)} autoscalers ({', '.join(who)}): keep one")
    if scalers:
        rep.ok(f"{name}: autoscaling ({'; '.join(w for ws in scalers.values() for w in ws)})")
    else:
        rep.skip(f"{name}: no autoscaler in this overlay")

    # --- RBAC
    roles = find(objs, "Role", "sandfleet-worker")
    if rep.check(len(roles) == 1, where, "one Role sandfleet-worker"):
        role = roles[0]
        rep.check(role["metadata"]["namespace"] == SANDBOX_NS, obj_id(role), f"Role must be in {SANDBOX_NS}")
        for problem in rbac_problems(role_permissions(role), WORKER_PERMISSIONS, exact=True):
            rep.fail(obj_id(role), problem)
    sroles = find(objs, "Role", "sandfleet-sessions")
    if rep.check(len(sroles) == 1, where, "one Role sandfleet-sessions"):
        srole = sroles[0]
        rep.check(srole["metadata"]["namespace"] == SANDBOX_NS, obj_id(srole), f"Role must be in {SANDBOX_NS}")
        granted, used = role_permissions(srole), sessions_permissions()
        for g, r, v in sorted(used - granted):
            rep.fail(obj_id(srole), f"the sessions service calls {v} {r} (group '{g}') but its Role does not allow it")
        for g, r, v in sorted(granted - used):
            rep.fail(obj_id(srole), f"the Role allows {v} {r} (group '{g}') but the sessions service never calls it")
    for role in find(objs, "Role"):
        if role["metadata"]["name"] != "sandfleet-sessions":
            rep.check(not any(r in ("pods/exec", "pods/attach") for _, r, _ in role_permissions(role)),
                      obj_id(role), "only the sessions Role may grant pods/exec or pods/attach")
    # Each Role bound to its own ServiceAccount, and nothing else bound.
    bindings = {"sandfleet-worker": "sandfleet-worker", "sandfleet-sessions": "sandfleet-sessions"}
    rbs = [rb for rb in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding")]
    for rb in rbs:
        subjects = {(s.get("kind"), s.get("name"), s.get("namespace")) for s in rb.get("subjects", [])}
        role = rb["roleRef"]["name"]
        rep.check(rb["roleRef"]["kind"] == "Role" and role in bindings, obj_id(rb),
                  "must bind the Role sandfleet-worker or sandfleet-sessions")
        rep.check(subjects == {("ServiceAccount", bindings.get(role), WORKER_NS)}, obj_id(rb),
                  f"binds {sorted(subjects)}; only {role}'s own ServiceAccount may be bound")
    rep.check(sorted(rb["roleRef"]["name"] for rb in rbs) == sorted(bindings), where,
              f"{len(rbs)} role bindings; expected one for the worker and one for the sessions service")
    sas = {o["metadata"]["name"]: o for o in find(objs, "ServiceAccount")}
    for sa, ns, automount in (("sandfleet-worker", WORKER_NS, True), ("sandfleet-gateway", WORKER_NS, False),
                              ("sandfleet-sessions", WORKER_NS, True),
                              ("sandfleet-sandbox", SANDBOX_NS, False)):
        o = sas.get(sa)
        if rep.check(o is not None and o["metadata"]["namespace"] == ns, where, f"ServiceAccount {ns}/{sa}"):
            if not automount:
                rep.check(o.get("automountServiceAccountToken") is False, obj_id(o),
                          "automountServiceAccountToken: false")
    rep.ok(f"{name}: RBAC (Roles = the worker's and the sessions service's calls, exec only for sessions, "
           "gateway and sandbox accounts without tokens)")

    # --- NetworkPolicies
    netpols = {o["metadata"]["name"]: o for o in find(objs, "NetworkPolicy")}
    deny = [p for p in netpols.values() if p["metadata"]["namespace"] == SANDBOX_NS
            and p["spec"].get("podSelector") == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress") and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}]
    rep.check(len(deny) == 1, where, f"a default-deny (ingress and egress) NetworkPolicy in {SANDBOX_NS}")
    for p in netpols.values():
        if p["metadata"]["namespace"] != SANDBOX_NS:
            continue
        rep.check(not p["spec"].get("ingress"), obj_id(p), "sandbox pods take no ingress")
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", []) or [{}]:
                block = peer.get("ipBlock")
                if block and block["cidr"] == "0.0.0.0/0":
                    exc = block.get("except", [])
                    rep.check(any(ip_in("169.254.169.254", c) for c in exc), obj_id(p),
                              "egress to 0.0.0.0/0 must except the metadata service 169.254.169.254")
                    for private in ("10.0.0.0", "172.16.0.0", "192.168.0.0"):
                        rep.check(any(ip_in(private, c) for c in exc), obj_id(p),
                                  f"egress to 0.0.0.0/0 must except {private}/… (cluster networks)")
                rep.check(bool(rule.get("ports")), obj_id(p), "sandbox egress rules must name ports")
    for comp, want_ingress in (("sandfleet-worker", [9090]), ("sandfleet-gateway", [8080])):
        p = netpols.get(comp)
        if rep.check(p is not None, where, f"NetworkPolicy {comp}"):
            rep.check(set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}, obj_id(p),
                      "policyTypes Ingress and Egress")
            ing_ports = sorted(pt["port"] for r in p["spec"].get("ingress", []) for pt in r.get("ports", []))
            rep.check(ing_ports == want_ingress, obj_id(p), f"ingress ports {ing_ports}, expected {want_ingress}")
            eg_ports = {pt["port"] for r in p["spec"].get("egress", []) for pt in r.get("ports", [])}
            rep.check(all(r.get("ports") for r in p["spec"].get("egress", [])), obj_id(p),
                      "every egress rule names its ports")
            allowed = {53, 5671, 5672} | ({443, 6443} if comp == "sandfleet-worker" else set())
            rep.check(eg_ports <= allowed, obj_id(p), f"egress ports {sorted(eg_ports - allowed)} not expected")
            rep.check(5672 in eg_ports and 53 in eg_ports, obj_id(p), "egress to RabbitMQ (5672) and DNS (53)")
    rep.ok(f"{name}: NetworkPolicies (sandbox default-deny, metadata/cluster CIDRs excepted, worker/gateway ports)")

    # --- RabbitMQ consumer_timeout vs limits.broker_consumer_timeout_secs
    broker_secs = int(config_toml.get("limits", {}).get("broker_consumer_timeout_secs", 1800))
    timeouts = []
    for rc in find(objs, "RabbitmqCluster"):
        timeouts.append((obj_id(rc), rabbit_conf_value(rc["spec"].get("rabbitmq", {}).get("additionalConfig", ""),
                                                       "consumer_timeout")))
    for cm in find(objs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".conf") and "consumer_timeout" in text:
                timeouts.append((f"{obj_id(cm)} {key}", rabbit_conf_value(text, "consumer_timeout")))
    for who, ms in timeouts:
        rep.check(ms == broker_secs * 1000, who,
                  f"consumer_timeout {ms} ms must equal limits.broker_consumer_timeout_secs {broker_secs} s")
    if timeouts:
        rep.ok(f"{name}: RabbitMQ consumer_timeout {broker_secs * 1000} ms = limits.broker_consumer_timeout_secs")
    check_deadlines(where, config_toml, broker_secs, rep)


def check_deadlines(where: str, cfg: dict, broker_secs: int, rep: Report) -> None:
    """Every task deadline the config admits fits inside the broker's consumer_timeout."""
    max_deadline = cfg.get("limits", {}).get("max_deadline_secs")
    if rep.check(max_deadline is not None, where,
                 "set limits.max_deadline_secs explicitly so it can be checked against consumer_timeout"):
        rep.check(int(max_deadline) < broker_secs, where,
                  f"limits.max_deadline_secs {max_deadline} must be below the broker timeout {broker_secs} s")
        template = int(cfg.get("gateway", {}).get("template", {}).get("deadline_secs", 1200))
        rep.check(template <= int(max_deadline), where,
                  f"gateway.template.deadline_secs {template} exceeds limits.max_deadline_secs {max_deadline}")
        # The worker's (and the intakes') budget: deadline + pending timeout
        # within the consumer timeout less the 60 s margin.
        pending = int(cfg.get("gateway", {}).get("template", {}).get("pending_timeout_secs", 300))
        rep.check(template + pending <= broker_secs - 60, where,
                  f"gateway.template deadline {template} s + pending {pending} s must fit "
                  f"limits.broker_consumer_timeout_secs {broker_secs} s less 60 s")


def check_all_containers(wid: str, pod: dict, cms: list[dict], settings: SettingsSchema, rep: Report) -> None:
    """Hardening, settings env names, Secret-sourced credentials and the
    config mount of every container, init containers included."""
    for c in pod.get("initContainers", []) + pod["containers"]:
        where = f"{wid} container {c['name']}"
        for n, e in env_map(c).items():
            if settings.available:
                why = settings.check_env(n)
                rep.check(why is None, where, f"env {n}: {why}")
            if any(s in n for s in ("URL", "SECRET", "TOKEN", "PASSWORD")):
                rep.check("secretKeyRef" in e.get("valueFrom", {}), where, f"{n} must come from a Secret key")
        check_hardening(where, pod, c, rep)
        check_config_mount(where, pod, c, cms, rep)


def check_hardening(wid: str, pod: dict, c: dict, rep: Report) -> None:
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    rep.check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, wid, "runAsNonRoot")
    rep.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
              or csc.get("seccompProfile", {}).get("type") == "RuntimeDefault", wid, "RuntimeDefault seccomp")
    rep.check(csc.get("readOnlyRootFilesystem") is True, wid, "readOnlyRootFilesystem")
    rep.check(csc.get("allowPrivilegeEscalation") is False, wid, "allowPrivilegeEscalation: false")
    rep.check(csc.get("capabilities", {}).get("drop") == ["ALL"], wid, "capabilities drop ALL")
    res = c.get("resources", {})
    rep.check(bool(res.get("requests")) and bool(res.get("limits", {}).get("memory")), wid,
              "resource requests and a memory limit")


def check_config_mount(wid: str, pod: dict, c: dict, cms: list[dict], rep: Report) -> None:
    args = c.get("args", [])
    if not rep.check("--config" in args, wid, "--config <file> in args"):
        return
    cfg = args[args.index("--config") + 1]
    mounts = [m for m in c.get("volumeMounts", []) if cfg.startswith(m["mountPath"].rstrip("/") + "/")]
    if not rep.check(len(mounts) == 1, wid, f"--config {cfg} is not under a volume mount"):
        return
    vol = next((v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]), {})
    cm_name = vol.get("configMap", {}).get("name")
    rep.check(any(cm["metadata"]["name"] == cm_name for cm in cms), wid,
              f"--config {cfg} comes from ConfigMap {cm_name}, which holds no sandfleet.toml")
    rep.check(cfg.rsplit("/", 1)[-1] == "sandfleet.toml", wid, f"--config {cfg}: key sandfleet.toml")


def check_scale_down(who: str, behavior: dict, drain: int | None, rep: Report) -> None:
    down = behavior.get("scaleDown", {})
    window = down.get("stabilizationWindowSeconds", 300)
    rep.check(window >= 300, who, f"scaleDown stabilizationWindowSeconds {window} < 300: scale down slowly")
    pods = [p for p in down.get("policies", []) if p["type"] == "Pods"]
    rep.check(bool(pods) and all(p["value"] <= 2 for p in pods), who, "scaleDown removes at most 2 pods per period")
    if drain is not None:
        rep.check(all(p["periodSeconds"] >= drain for p in down.get("policies", [])), who,
                  f"scaleDown policy periods must be at least the drain timeout ({drain} s)")


def ip_in(ip: str, cidr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)
    except ValueError:
        return False


def rabbit_conf_value(text: str, key: str) -> int | None:
    m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------
# RBAC


def role_permissions(role: dict) -> set[tuple[str, str, str]]:
    perms = set()
    for rule in role.get("rules", []):
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    perms.add((g, r, v))
    return perms


def rbac_problems(granted: set, used: set, exact: bool) -> list[str]:
    """What is wrong with `granted` for a worker that makes the calls `used`."""
    problems = []
    for g, r, v in sorted(granted):
        if "*" in (g, r, v):
            problems.append(f"wildcard rule ({g or 'core'}, {r}, {v}): grant the worker's verbs one by one")
        if r.split("/")[0] in ("secrets", "configmaps") or r in ("pods/exec", "pods/attach"):
            problems.append(f"grants {v} on {r}: the worker never needs it")
    for g, r, v in sorted(used - granted):
        problems.append(f"the worker calls {v} {r} (group '{g}') but the Role does not allow it")
    if exact:
        for g, r, v in sorted(granted - used):
            problems.append(f"the Role allows {v} {r} (group '{g}') but the worker never calls it")
    return problems


def code_permissions(const: str = "REQUIRED_PERMISSIONS") -> tuple[set[tuple[str, str, str]] | None, str]:
    """A permissions constant of the sandbox crate (`REQUIRED_PERMISSIONS`,
    the worker's; `SESSION_PERMISSIONS`, the sessions service's) as (group,
    resource, verb) triples, read from the crate's source; None when not
    defined.

    Understood forms: a slice of `("batch", "jobs", "create")` tuples, or of
    structs with `group: "batch", resource: "jobs", verbs: &["create", ...]`.
    """
    for f in sorted(glob.glob(str(ROOT / "crates/sandbox/src/**/*.rs"), recursive=True)):
        text = Path(f).read_text()
        m = re.search(const + r"\s*:[^=]*=\s*&?\[(.*?)\];", text, re.S)
        if not m:
            continue
        body = m.group(1)
        where = str(Path(f).relative_to(ROOT))
        perms = set(re.findall(r'\(\s*"([^"]*)"\s*,\s*"([^"]+)"\s*,\s*"([^"]+)"\s*\)', body))
        for g, r, verbs in re.findall(
                r'group:\s*"([^"]*)"\s*,\s*resource:\s*"([^"]+)"\s*,\s*verbs:\s*&?\[([^\]]*)\]', body):
            perms |= {(g, r, v) for v in re.findall(r'"([^"]+)"', verbs)}
        return perms, where
    return None, ""


def sessions_permissions() -> set[tuple[str, str, str]]:
    """The sessions service's calls, `SESSION_PERMISSIONS` in the code."""
    perms, where = code_permissions("SESSION_PERMISSIONS")
    if not perms:
        raise SystemExit("deploy_checks: SESSION_PERMISSIONS not found or not understood in crates/sandbox/src")
    return perms


def parse_observed(path: Path, sessions: bool = False) -> tuple[set[tuple[str, str, str]], int]:
    """(group, resource, verb) triples from a kube-sim observation log.

    One JSON object per line: {"verb": "create", "group": "batch",
    "resource": "jobs", ...}; `resource` may carry the subresource
    (`pods/log`) or it may come as "subresource": "log".
    """
    seen = set()
    n = 0
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        # Non-resource paths (/version, /apis discovery) need no Role rule.
        if not rec.get("verb") or not rec.get("resource"):
            continue
        # kube-sim's own tests play every client, not the worker.
        if rec.get("package") == "sandfleet-kube-sim":
            continue
        # The sessions service's own tests, and session tests elsewhere
        # (namespaces named `*sessions*`), play the sessions service, whose
        # calls `cmd_rbac` compares with its own Role.
        is_sessions = rec.get("package") == "sandfleet-sessions" or "sessions" in (rec.get("namespace") or "")
        if sessions != is_sessions:
            continue
        n += 1
        resource = rec["resource"]
        if rec.get("subresource"):
            resource = f"{resource}/{rec['subresource']}"
        group = rec.get("group")
        if group is None:
            group = {"jobs": "batch"}.get(resource.split("/")[0], "")
        seen.add((group, resource, rec["verb"]))
    return seen, n


def cmd_rbac(args: argparse.Namespace) -> int:
    rep = Report()
    role_file = Path(args.role_file)
    roles = [d for d in load_docs(role_file) if d.get("kind") == "Role"]
    if len(roles) != 1:
        print(f"  FAIL {role_file}: expected one Role, found {len(roles)}")
        return 1
    granted = role_permissions(roles[0])
    print(f"RBAC: Role {roles[0]['metadata']['name']} in {role_file} grants {len(granted)} (group, resource, verb)")
    for problem in rbac_problems(granted, WORKER_PERMISSIONS, exact=True):
        rep.fail(f"{role_file} vs the declared permissions", problem)
    declared, where = code_permissions()
    if declared is None:
        rep.skip("RBAC: crates/sandbox defines no REQUIRED_PERMISSIONS yet")
    elif not declared:
        rep.fail(where, "REQUIRED_PERMISSIONS found but not understood: use (group, resource, verb) tuples")
    else:
        print(f"RBAC: {where} declares {len(declared)} (group, resource, verb)")
        for problem in rbac_problems(granted, declared, exact=True):
            rep.fail(f"{role_file} vs {where} REQUIRED_PERMISSIONS", problem)
    if args.observed:
        path = Path(args.observed)
        if not path.exists():
            rep.fail(str(path), "no observation log; run the tests with SANDFLEET_RBAC_OBSERVED set "
                     "(docs/deploy.md, RBAC)")
        else:
            used, n = parse_observed(path)
            print(f"RBAC: {n} observed API requests, {len(used)} distinct (group, resource, verb): "
                  + ", ".join(f"{v} {r}" for _, r, v in sorted(used)))
            for problem in rbac_problems(granted, used, exact=args.exact):
                rep.fail(f"{role_file} vs {path}", problem)
            s_used, s_n = parse_observed(path, sessions=True)
            print(f"RBAC: {s_n} observed sessions-service requests: "
                  + ", ".join(f"{v} {r}" for _, r, v in sorted(s_used)))
            for g, r, v in sorted(s_used - sessions_permissions()):
                rep.fail(f"k8s/base/sessions-rbac.yaml vs {path}",
                         f"the sessions service calls {v} {r} (group '{g}') but its Role does not allow it")
    if not rep.failures:
        rep.ok("RBAC: the Role matches the worker's Kubernetes calls")
    return 1 if rep.failures else 0


# --------------------------------------------------------------------------
# Compose


def cmd_compose(path: Path, rep: Report, settings: SettingsSchema) -> None:
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services", {})
    for name, svc in services.items():
        where = f"{path.name} service {name}"
        for dep, cond in (svc.get("depends_on") or {}).items():
            if not rep.check(dep in services, where, f"depends_on unknown service {dep}"):
                continue
            cond = cond.get("condition", "service_started") if isinstance(cond, dict) else "service_started"
            if cond == "service_healthy":
                rep.check("healthcheck" in services[dep], where, f"waits for {dep} to be healthy, which has no healthcheck")
            if cond == "service_completed_successfully":
                rep.check(services[dep].get("restart", "no") == "no", where,
                          f"waits for {dep} to complete, which restarts")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("./"):
                rep.check((path.parent / src).exists(), where, f"mounts {src}, which does not exist")
        env = svc.get("environment", {}) or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
        if settings.available:
            for n in env:
                why = settings.check_env(n)
                rep.check(why is None, where, f"env {n}: {why}")
        for n, v in env.items():
            # An empty SANDFLEET__ value is a setting, not an absent one, and
            # the loader rejects empty secrets: leave the variable out instead.
            rep.check(not n.startswith("SANDFLEET__") or str(v or "").strip() not in ("", "${" + n + ":-}")
                      and not re.fullmatch(r"\$\{\w+:-\}", str(v)), where, f"env {n} may be empty")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.endswith(".toml") and (path.parent / src).exists():
                try:
                    cfg = tomllib.loads((path.parent / src).read_text())
                except tomllib.TOMLDecodeError as e:
                    rep.fail(f"{src}", f"does not parse: {e}")
                    continue
                if settings.available:
                    for err in settings.check_toml(cfg):
                        rep.fail(src, err)
    worker = services.get("worker")
    if rep.check(worker is not None, path.name, "a worker service"):
        cmd = worker.get("command", [])
        rep.check("worker" in cmd, path.name, "worker runs `sandfleet worker`")
        conds = {d: (c.get("condition") if isinstance(c, dict) else None)
                 for d, c in (worker.get("depends_on") or {}).items()}
        rep.check(conds.get("rabbitmq") == "service_healthy", path.name, "worker waits for a healthy rabbitmq")
        rep.check(conds.get("topology") == "service_completed_successfully", path.name,
                  "worker starts after `sandfleet topology apply` completed")
        cfg, drain, broker = compose_worker_config(path, worker)
        grace = parse_duration(worker.get("stop_grace_period", "10s"))
        rep.check(grace > drain, path.name, f"worker stop_grace_period {grace}s must exceed the drain timeout {drain}s")
        conf = ROOT / "deploy/rabbitmq/rabbitmq.conf"
        ms = rabbit_conf_value(conf.read_text(), "consumer_timeout")
        rep.check(ms == broker * 1000, str(conf.relative_to(ROOT)),
                  f"consumer_timeout {ms} ms must equal limits.broker_consumer_timeout_secs {broker} s")
        check_deadlines(path.name, cfg, broker, rep)
        executor = (worker.get("environment") or {}).get("SANDFLEET__WORKER__EXECUTOR",
                                                         cfg.get("worker", {}).get("executor"))
        rep.check(executor == "local", path.name, "compose worker uses the local executor")
    topo = services.get("topology")
    if rep.check(topo is not None, path.name, "a one-shot topology service"):
        rep.check(topo.get("command", [])[-2:] == ["topology", "apply"], path.name, "topology runs `topology apply`")
    otel = services.get("otel-collector")
    if rep.check(otel is not None, path.name, "an otel-collector service"):
        check_otel_config(path, otel, cfg if worker is not None else {}, rep)
    rabbit = services.get("rabbitmq", {})
    rep.check(str(rabbit.get("image", "")).startswith("rabbitmq:3.13") and "management" in rabbit.get("image", ""),
              path.name, "rabbitmq:3.13-management")
    rep.ok(f"{path.name}: start order, health checks, mounts, settings keys, drain and consumer_timeout")


def check_otel_config(path: Path, otel: dict, sandfleet_cfg: dict, rep: Report) -> None:
    """The collector's pipelines use only components it defines, and
    sandfleet's OTLP endpoint is the collector's OTLP/HTTP port."""
    src = next((v.split(":")[0] for v in otel.get("volumes", []) if isinstance(v, str) and v.endswith(":ro")
                and v.split(":")[0].endswith(".yaml")), None)
    if not rep.check(src is not None, path.name, "otel-collector mounts its config file"):
        return
    conf = yaml.safe_load((path.parent / src).read_text())
    where = src
    service = conf.get("service", {})
    for ext in service.get("extensions", []):
        rep.check(ext in conf.get("extensions", {}), where, f"extension {ext} is not defined")
    pipelines = service.get("pipelines", {})
    rep.check("traces" in pipelines, where, "a traces pipeline")
    for pname, pipe in pipelines.items():
        for section in ("receivers", "processors", "exporters"):
            for comp in pipe.get(section, []):
                rep.check(comp in (conf.get(section) or {}), where, f"pipeline {pname}: {section[:-1]} {comp} undefined")
    http = conf.get("receivers", {}).get("otlp", {}).get("protocols", {}).get("http", {}).get("endpoint", "")
    endpoint = sandfleet_cfg.get("telemetry", {}).get("otlp_endpoint", "")
    port = http.rsplit(":", 1)[-1]
    rep.check(bool(port) and endpoint.rstrip("/").endswith(f"otel-collector:{port}"), where,
              f"telemetry.otlp_endpoint {endpoint!r} is not the collector's OTLP/HTTP receiver (port {port})")


def compose_worker_config(path: Path, worker: dict) -> tuple[dict, int, int]:
    cfg: dict = {}
    for vol in worker.get("volumes", []):
        src = vol.split(":")[0] if isinstance(vol, str) else ""
        if src.endswith(".toml"):
            cfg = tomllib.loads((path.parent / src).read_text())
    env = worker.get("environment") or {}
    drain = int(env.get("SANDFLEET__WORKER__DRAIN_TIMEOUT_SECS",
                        cfg.get("worker", {}).get("drain_timeout_secs", DEFAULT_DRAIN_TIMEOUT_SECS)))
    broker = int(env.get("SANDFLEET__LIMITS__BROKER_CONSUMER_TIMEOUT_SECS",
                         cfg.get("limits", {}).get("broker_consumer_timeout_secs", 1800)))
    return cfg, drain, broker


def parse_duration(s: str | int) -> float:
    if isinstance(s, (int, float)):
        return float(s)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", s):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total


# --------------------------------------------------------------------------
# Grafana


def cmd_grafana(path: Path, rep: Report) -> None:
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        rep.fail(str(path), f"not JSON: {e}")
        return
    exprs = []

    def walk(panels: list) -> None:
        for p in panels:
            exprs.extend((p.get("title", "?"), t["expr"]) for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if isinstance(q, str) and "sandfleet_" in q:
            exprs.append((f"variable {v['name']}", q))
    ids = [p["id"] for p in dash.get("panels", [])]
    rep.check(len(ids) == len(set(ids)), str(path), "panel ids must be unique")
    rep.check(bool(dash.get("uid")) and bool(dash.get("title")), str(path), "uid and title")
    used = set()
    for title, expr in exprs:
        for m in re.findall(r"\bsandfleet_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            used.add(base)
            rep.check(base in METRICS, f"{path.name} panel {title!r}", f"unknown metric {m}")
    missing = {m for m in METRICS if not m.startswith("sandfleet_gateway_")} - used
    rep.check(not missing, str(path), f"worker metrics not on the dashboard: {sorted(missing)}")
    # Cross-check against the code once the worker registers its metrics.
    sources = "".join(Path(f).read_text() for f in glob.glob(str(ROOT / "crates/*/src/**/*.rs"), recursive=True))
    if "sandfleet_tasks_in_flight" in sources or '"sandfleet_tasks"' in sources:
        for m in sorted(used):
            stem = re.sub(r"_total$", "", m)
            rep.check(stem in sources, str(path), f"metric {m} is not registered anywhere under crates/")
        rep.ok(f"{path.name}: {len(exprs)} queries, metrics registered in crates/")
    else:
        rep.skip(f"{path.name}: metric names checked against the interface list only "
                 "(no metric registrations under crates/ yet)")
    rep.ok(f"{path.name}: {len(exprs)} queries over {len(used)} sandfleet metrics")


# --------------------------------------------------------------------------
# .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or
                  (pat.startswith("**/") and fnmatch.fnmatch("/".join(parts[j: i + 1]), pat[3:]))
                  for i in range(len(parts)) for j in range(i + 1))
        if hit:
            out = not neg
    return out


def cmd_dockerignore(rep: Report) -> None:
    patterns = dockerignore_patterns()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    members = []
    for m in cargo["workspace"]["members"]:
        members += [str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / m)) if (Path(p) / "Cargo.toml").exists()]
    needed = ["Cargo.toml", "Cargo.lock"] + [f"{m}/Cargo.toml" for m in members] + [f"{m}/src" for m in members]
    for p in needed:
        rep.check(not excluded(p, patterns), ".dockerignore", f"excludes {p}, which `cargo build --locked` needs")
    rep.check(excluded("target", patterns) and excluded(".git", patterns), ".dockerignore", "excludes target/ and .git")
    # Files compiled into the binary (include_str!/include_bytes!) must be in the context too.
    included = 0
    for m in members:
        for f in glob.glob(str(ROOT / m / "src/**/*.rs"), recursive=True):
            for rel in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', Path(f).read_text()):
                target = (Path(f).parent / rel).resolve()
                try:
                    p = str(target.relative_to(ROOT))
                except ValueError:
                    rep.fail(".dockerignore", f"{f} includes {rel}, outside the build context")
                    continue
                included += 1
                rep.check(not excluded(p, patterns), ".dockerignore", f"excludes {p}, which {Path(f).name} includes")
    rep.ok(f".dockerignore keeps the {len(members)} workspace members, Cargo.toml, Cargo.lock and "
           f"the {included} files compiled in with include_str!/include_bytes!")


# --------------------------------------------------------------------------
# The sandbox Job the worker creates (the sandbox crate's committed snapshot)
# fits the cluster the manifests build.

SANDBOX_JOB_SNAPSHOT = ROOT / "crates/sandbox/tests/snapshots/job.json"


def cmd_sandbox_job(rendered: Path, versions: list[str], rep: Report) -> None:
    import kubernetes_validate as kv

    if not SANDBOX_JOB_SNAPSHOT.exists():
        rep.skip(f"sandbox Job: no {SANDBOX_JOB_SNAPSHOT.relative_to(ROOT)} yet")
        return
    job = json.loads(SANDBOX_JOB_SNAPSHOT.read_text())
    failures_before = len(rep.failures)
    where = f"sandbox Job ({SANDBOX_JOB_SNAPSHOT.relative_to(ROOT)})"
    for v in versions:
        try:
            kv.validate(job, v, strict=True)
        except kv.ValidationError as e:
            rep.fail(where, f"Kubernetes {v} schema: {e.message} at {'.'.join(map(str, e.path))}")
    objs = load_docs(rendered)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    rep.check(job["metadata"].get("namespace") in (None, SANDBOX_NS), where, f"namespace must be {SANDBOX_NS}")
    rep.check(spec.get("backoffLimit") == 0, where, "backoffLimit 0 (retries are the worker's)")
    rep.check("activeDeadlineSeconds" in spec, where, "activeDeadlineSeconds")
    # The NetworkPolicy that lets sandboxes reach DNS and the web must select the pod.
    egress = find(objs, "NetworkPolicy", "sandfleet-sandbox-egress")
    if rep.check(len(egress) == 1, where, "the sandbox egress NetworkPolicy is rendered"):
        sel = egress[0]["spec"]["podSelector"].get("matchLabels", {})
        rep.check(selector_matches(sel, labels), where,
                  f"pod labels {labels} do not match the egress NetworkPolicy's podSelector {sel}: no DNS, no web")
    sa = pod.get("serviceAccountName", "default")
    sas = [o for o in find(objs, "ServiceAccount", sa) if o["metadata"]["namespace"] == SANDBOX_NS]
    rep.check(len(sas) == 1, where, f"serviceAccountName {sa} is not a ServiceAccount of {SANDBOX_NS}")
    rep.check(pod.get("automountServiceAccountToken") is False, where, "automountServiceAccountToken: false")
    # Pod Security `restricted`, which the sandbox namespace enforces.
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        rep.check(not pod.get(key), where, f"{key} breaks PSA restricted")
    rep.check(not any("hostPath" in v for v in pod.get("volumes", [])), where, "hostPath volumes break PSA restricted")
    for c in pod.get("initContainers", []) + pod["containers"]:
        csc = c.get("securityContext", {})
        cw = f"{where} container {c['name']}"
        rep.check(csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cw, "runAsNonRoot (PSA restricted)")
        rep.check(csc.get("runAsUser", psc.get("runAsUser")) != 0, cw, "runAsUser 0 (PSA restricted)")
        rep.check(csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") in ("RuntimeDefault", "Localhost"),
                  cw, "seccompProfile RuntimeDefault (PSA restricted)")
        rep.check(csc.get("allowPrivilegeEscalation") is False, cw, "allowPrivilegeEscalation: false (PSA restricted)")
        rep.check(not csc.get("privileged"), cw, "privileged (PSA baseline)")
        caps = csc.get("capabilities", {})
        rep.check(caps.get("drop") == ["ALL"] and set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, cw,
                  "capabilities: drop ALL, add at most NET_BIND_SERVICE (PSA restricted)")
        rep.check(bool(c.get("resources", {}).get("limits")), cw, "resource limits")
    if len(rep.failures) == failures_before:
        rep.ok(f"sandbox Job snapshot: valid against Kubernetes {', '.join(versions)} (strict), PSA restricted, "
               "selected by the egress NetworkPolicy, runs as the token-less sandbox ServiceAccount")


# --------------------------------------------------------------------------
# Self-test: each check must catch a broken input.


def cmd_selftest(rendered: Path, settings: SettingsSchema) -> int:
    base = load_docs(rendered)
    quiet = open(os.devnull, "w")

    def run(mutate, label: str) -> bool:
        objs = copy.deepcopy(base)
        mutate(objs)
        rep = Report()
        stdout, sys.stdout = sys.stdout, quiet
        try:
            schema_validate(objs, ["1.30"], rep, "selftest")
            check_k8s("selftest", objs, rep, settings)
        finally:
            sys.stdout = stdout
        caught = bool(rep.failures)
        print(f"  {'ok  ' if caught else 'FAIL'} selftest: {label} -> "
              f"{rep.failures[0] if caught else 'NOT caught'}")
        return caught

    def worker(objs):
        return find(objs, "Deployment", "sandfleet-worker")[0]["spec"]["template"]["spec"]

    def role(objs):
        return find(objs, "Role", "sandfleet-worker")[0]

    cases = [
        (lambda o: worker(o)["containers"][0].__setitem__("readinessProbes", {}), "unknown field (strict schema)"),
        (lambda o: worker(o).__setitem__("terminationGracePeriodSeconds", 30), "grace period below the drain"),
        (lambda o: role(o)["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}),
         "Role grants Secrets"),
        (lambda o: role(o)["rules"][0]["verbs"].remove("delete"), "Role misses a verb the worker uses"),
        (lambda o: worker(o)["containers"][0]["env"].append({"name": "SANDFLEET__WORKER__DRAIN_TIMEOUT", "value": "1"}),
         "misspelt settings env var"),
        (lambda o: worker(o)["containers"][0]["securityContext"].__setitem__("readOnlyRootFilesystem", False),
         "writable root filesystem"),
        (lambda o: o.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w",
                                                                                          "namespace": WORKER_NS}}),
         "unknown custom resource kind"),
    ]
    ok = all([run(m, label) for m, label in cases])
    # The observed-calls comparison, both directions.
    role = role_permissions(find(base, "Role", "sandfleet-worker")[0])
    for used, label in ((WORKER_PERMISSIONS | {("batch", "jobs", "patch")}, "worker calls a verb the Role lacks"),
                        (WORKER_PERMISSIONS - {("", "pods", "list")}, "Role allows a call never observed")):
        problems = rbac_problems(role, used, exact=True)
        print(f"  {'ok  ' if problems else 'FAIL'} selftest: {label} -> {problems[0] if problems else 'NOT caught'}")
        ok = ok and bool(problems)
    rep = Report()
    stdout, sys.stdout = sys.stdout, quiet
    try:
        check_k8s("selftest", copy.deepcopy(base), rep, settings)
    finally:
        sys.stdout = stdout
    if rep.failures:
        print(f"  FAIL selftest: the unmodified input does not pass: {rep.failures[0]}")
        ok = False
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("k8s")
    k.add_argument("name")
    k.add_argument("rendered")
    k.add_argument("--k8s-version", action="append", dest="versions")
    c = sub.add_parser("compose")
    c.add_argument("file")
    g = sub.add_parser("grafana")
    g.add_argument("file")
    sub.add_parser("dockerignore")
    r = sub.add_parser("rbac")
    r.add_argument("--role-file", default=str(ROOT / "k8s/base/worker-rbac.yaml"))
    r.add_argument("--observed", help="JSON-lines log of the API requests kube-sim saw")
    r.add_argument("--exact", action="store_true", help="also fail on permissions never observed")
    s = sub.add_parser("selftest")
    s.add_argument("rendered")
    sj = sub.add_parser("sandbox-job")
    sj.add_argument("rendered", help="a rendered overlay (for the sandbox namespace's objects)")
    sj.add_argument("--k8s-version", action="append", dest="versions")
    args = ap.parse_args()

    settings = SettingsSchema()
    if args.cmd == "rbac":
        return cmd_rbac(args)
    if args.cmd == "selftest":
        return cmd_selftest(Path(args.rendered), settings)
    rep = Report()
    if not settings.available:
        rep.skip("settings keys not checked: crates/settings/src has no `Settings` struct")
    if args.cmd == "k8s":
        objs = load_docs(Path(args.rendered))
        schema_validate(objs, args.versions or ["1.30"], rep, args.name)
        check_k8s(args.name, objs, rep, settings)
    elif args.cmd == "compose":
        cmd_compose(Path(args.file), rep, settings)
    elif args.cmd == "grafana":
        cmd_grafana(Path(args.file), rep)
    elif args.cmd == "dockerignore":
        cmd_dockerignore(rep)
    elif args.cmd == "sandbox-job":
        cmd_sandbox_job(Path(args.rendered), args.versions or ["1.30"], rep)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
