#!/usr/bin/env bash
# Runs a command against a small, real sandfleet fleet of its own, then takes
# the fleet down:
#
#   clients/with-fleet.sh node --test test/
#
# It starts, from target/debug (build it first: `cargo build -p sandfleet-cli`):
#   - `sandfleet sessions --backend local` on a free port with a fresh token:
#     the real service (routes, tokens, limits, reaper) with its sessions run
#     as local child processes, so no Kubernetes API is needed;
#   - `sandfleet worker --executor local` on a topology prefix of its own, so
#     tasks the clients enqueue are really run and their results published.
# RabbitMQ must run on 127.0.0.1:5672 (scripts/setup.sh starts it). The command
# sees SANDFLEET_AMQP_URL, SANDFLEET_PREFIX, SANDFLEET_SESSIONS_URL and
# SANDFLEET_SESSIONS_TOKEN. At exit the processes are stopped and every
# exchange and queue of the prefix is deleted (`sandfleet topology delete`).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$repo/target/debug"
[[ -x "$bin/sandfleet" ]] || {
  echo "with-fleet: $bin/sandfleet is missing (cargo build -p sandfleet-cli)" >&2
  exit 2
}

suffix="$(date +%s)-$$-$RANDOM"
prefix="sf-clients-$suffix"
dir="$repo/target/clients/fleet-$suffix"
mkdir -p "$dir"
amqp_url="amqp://guest:guest@127.0.0.1:5672/%2f"

pids=()
cleanup() {
  local rc=$?
  # Both drain on SIGTERM; the sessions service ends its local sessions.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  "$bin/sandfleet" topology delete --yes --force --prefix "$prefix" --amqp-url "$amqp_url" \
    >/dev/null 2>"$dir/topology-delete.log" ||
    echo "with-fleet: could not delete topology $prefix (see $dir/topology-delete.log)" >&2
  if ((rc == 0)); then rm -rf "$dir"; else echo "with-fleet: logs kept in $dir" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for <seconds> <what> <command...>: polls a condition up to a deadline.
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "with-fleet: timed out waiting for $what (logs in $dir)" >&2
      return 1
    fi
    sleep 0.2
  done
}

token="clients-$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
printf '%s\n' "$token" >"$dir/tokens"
sessions_port=$(free_port)
"$bin/sandfleet" sessions --backend local --listen "127.0.0.1:$sessions_port" \
  --tokens-file "$dir/tokens" --max-file-bytes 1048576 --reap-interval-secs 2 \
  2>"$dir/sessions.log" &
pids+=($!)

worker_port=$(free_port)
"$bin/sandfleet" worker --executor local --prefix "$prefix" --amqp-url "$amqp_url" \
  --http-addr "127.0.0.1:$worker_port" --concurrency 2 2>"$dir/worker.log" >/dev/null &
pids+=($!)

wait_for 60 "the sessions service" curl -fsS "http://127.0.0.1:$sessions_port/readyz"
wait_for 60 "the worker" curl -fsS "http://127.0.0.1:$worker_port/readyz"

export SANDFLEET_AMQP_URL="$amqp_url" SANDFLEET_PREFIX="$prefix" \
  SANDFLEET_SESSIONS_URL="http://127.0.0.1:$sessions_port" SANDFLEET_SESSIONS_TOKEN="$token"
"$@"
