#!/usr/bin/env bash
# Checks that the worker's Role (k8s/base/worker-rbac.yaml) allows exactly the
# Kubernetes calls the worker's code makes.
#
# The sandbox, worker and end-to-end tests run against kube-sim, the fake API
# server; with SANDFLEET_RBAC_OBSERVED set, kube-sim appends every resource
# request it serves (verb, resource) to that file. The check then fails if the
# code made a call the Role does not allow, or if the Role allows a call no
# test observed.
#
#   scripts/check-rbac.sh                 # run the tests, then compare
#   scripts/check-rbac.sh --no-tests      # compare an existing target/rbac-observed.jsonl
#
# Extra arguments after `--` go to cargo nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

log="$PWD/target/rbac-observed.jsonl"
run_tests=1
nextest_args=()
while (($#)); do
  case "$1" in
    --no-tests) run_tests=0 ;;
    --) shift; nextest_args=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

if ((run_tests)); then
  packages=(-p sandfleet-sandbox -p sandfleet-worker)
  [[ -f tests/Cargo.toml ]] && packages+=(-p sandfleet-e2e)
  mkdir -p target
  : >"$log"
  echo "recording the worker's Kubernetes calls into $log"
  SANDFLEET_RBAC_OBSERVED="$log" cargo nextest run "${packages[@]}" "${nextest_args[@]}"
fi

if [[ ! -s "$log" ]]; then
  echo "FAIL: $log is empty: kube-sim recorded no requests (is SANDFLEET_RBAC_OBSERVED supported?)" >&2
  exit 1
fi
# The Python that scripts/validate-deploy.sh set up (it has PyYAML), else python3.
PY=${PYTHON:-python3}
[[ -x target/deploy-tools/venv/bin/python ]] && PY=target/deploy-tools/venv/bin/python
"$PY" scripts/deploy_checks.py rbac --observed "$log" --exact
