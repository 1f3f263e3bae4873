#!/usr/bin/env bash
# The project's test command: formatting, lints, tests, dependency policy.
#
#   scripts/test.sh                 # everything, in this order
#   scripts/test.sh clippy tests    # only some steps
#
# Steps: setup, fmt, clippy, tests, doctests, schemas, clients, deploy, deny. `setup`
# (scripts/setup.sh) installs what the tests need when it is missing and starts
# RabbitMQ (127.0.0.1:5672, guest/guest, management API on 15672); it also runs
# before `tests`, `schemas` or `clients` when only some steps are named. NEXTEST_PROFILE
# picks the nextest profile (.config/nextest.toml), `default` unless set.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

step() { printf '\n==> %s\n' "$*" >&2; }

run_setup() {
  step "scripts/setup.sh"
  "$repo/scripts/setup.sh"
}

run_fmt() {
  step "cargo fmt --all --check"
  cargo fmt --all --check
}

run_clippy() {
  step "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings
}

run_tests() {
  step "cargo nextest run --workspace (profile ${NEXTEST_PROFILE:-default})"
  # kube-sim records every Kubernetes call the tests make; the deploy step
  # checks them against the worker's Role (scripts/deploy_checks.py rbac).
  mkdir -p target
  : >target/rbac-observed.jsonl
  SANDFLEET_RBAC_OBSERVED="$repo/target/rbac-observed.jsonl" \
    cargo nextest run --workspace --profile "${NEXTEST_PROFILE:-default}"
}

run_doctests() {
  # nextest does not run doctests.
  step "cargo test --workspace --doc"
  cargo test --workspace --doc
}

run_schemas() {
  # The committed JSON Schemas, checked by a non-Rust validator against the
  # examples (the Rust side is checked by the proto crate's tests).
  step "scripts/check-schemas.py"
  python3 "$repo/scripts/check-schemas.py"
}

run_clients() {
  # The TypeScript and Python client packages (clients/), each against a small
  # real fleet that clients/with-fleet.sh starts and removes: RabbitMQ, a Rust
  # worker (local executor) on its own topology prefix, and `sandfleet sessions`
  # on its local backend. Both packages are installed before either suite runs: each
  # suite enqueues through the other language's client too.
  step "cargo build -p sandfleet-cli (the fleet's binary)"
  cargo build -p sandfleet-cli --bin sandfleet
  step "clients/typescript: npm ci, types drift check, build"
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent check:types && npm run --silent build)
  # A venv under target/: nothing installed globally. Reinstalled only when
  # the pinned requirements or the package metadata change.
  local venv="$repo/target/clients/venv" stamp
  stamp=$(cat clients/python/requirements-test.txt clients/python/pyproject.toml | sha256sum | cut -c1-64)
  if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.sandfleet-stamp" 2>/dev/null)" != "$stamp" ]]; then
    step "clients/python: venv at target/clients/venv, pinned test deps, the package (editable)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r clients/python/requirements-test.txt
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -e clients/python
    echo "$stamp" >"$venv/.sandfleet-stamp"
  fi
  step "clients/python: models drift check, mypy --strict"
  (cd clients/python && "$venv/bin/python" scripts/gen_models.py --check && "$venv/bin/mypy" src)
  step "clients/typescript: node --test (npm test)"
  (cd clients/typescript && SANDFLEET_PYTHON="$venv/bin/python" npm test)
  step "clients/python: pytest"
  (cd clients/python && ../with-fleet.sh "$venv/bin/python" -m pytest -ra tests)
}

run_deploy() {
  # Kubernetes manifests, Compose file, Dockerfile, dashboard and RBAC,
  # validated offline (installs its tools on first use).
  step "scripts/validate-deploy.sh"
  "$repo/scripts/validate-deploy.sh"
}

run_deny() {
  # The shared folder sits beside the clone: ../shared/tools/cargo-deny-offline
  # checks against an advisory-db snapshot without network. Elsewhere, fall
  # back to an installed cargo-deny (which fetches the advisory db).
  local offline
  offline="$(dirname "$repo")/shared/tools/cargo-deny-offline"
  # cargo-deny reads `cargo metadata` for every target platform, so crates
  # only other platforms use must be downloaded too (a no-op once they are).
  step "cargo fetch"
  cargo fetch --quiet
  if [[ -x "$offline" ]]; then
    step "$offline --hide-inclusion-graph"
    "$offline" --hide-inclusion-graph
  elif command -v cargo-deny >/dev/null 2>&1; then
    step "cargo deny check --hide-inclusion-graph"
    cargo deny check --hide-inclusion-graph
  else
    echo "test.sh: neither $offline nor cargo-deny is available (cargo install cargo-deny --locked)" >&2
    return 1
  fi
}

all_steps=(setup fmt clippy tests doctests schemas clients deploy deny)
steps=("$@")
if [[ ${#steps[@]} -eq 0 ]]; then
  steps=("${all_steps[@]}")
elif [[ " ${steps[*]} " =~ \ (tests|schemas|clients)\  && ! " ${steps[*]} " =~ \ setup\  ]]; then
  steps=(setup "${steps[@]}")
fi
for s in "${steps[@]}"; do
  case "$s" in
    setup | fmt | clippy | tests | doctests | schemas | clients | deploy | deny) "run_$s" ;;
    *)
      echo "test.sh: unknown step '$s' (steps: ${all_steps[*]})" >&2
      exit 2
      ;;
  esac
done
step "all passed: ${steps[*]}"
