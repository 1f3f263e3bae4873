#!/usr/bin/env bash
# Makes this machine ready for the test suite, and is a no-op when it already is:
#
#   - the shells the script generator is tested under (dash, bash, busybox sh),
#     bubblewrap for the local executor's optional isolation, patch that the
#     example fix attempts run, curl, python's jsonschema for the schema check,
#     chromium and chromium-driver for the console's browser tests;
#     Node.js 20+ with npm and python3-venv for the client packages (clients/);
#   - RabbitMQ on 127.0.0.1:5672, started when it is installed but stopped, with
#     the management API on 15672 (tests close connections through it);
#   - cargo-nextest.
#
# Missing Debian packages are installed with apt-get when running as root;
# otherwise the script names what to install and fails. `scripts/test.sh`
# runs it first (its `setup` step), so the README's test command works on a
# fresh machine as written.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

AMQP_PORT=5672
MGMT_URL="http://127.0.0.1:15672/api/overview"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for <seconds> <description> <command...>
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then
      log "timed out waiting for $what"
      return 1
    fi
    sleep 1
  done
}

mgmt_answers() { curl -fsS -o /dev/null -u guest:guest "$MGMT_URL"; }

ensure_rabbitmq() {
  if ! port_open "$AMQP_PORT"; then
    if ! command -v rabbitmq-server >/dev/null 2>&1; then
      log "RabbitMQ is not running on 127.0.0.1:$AMQP_PORT and not installed; the broker tests need it"
      return 1
    fi
    log "starting RabbitMQ"
    rabbitmq-server -detached
    # await_startup needs the node to exist first; the port check covers
    # nodes rabbitmqctl cannot reach (other user's cookie).
    wait_for 120 "RabbitMQ to start" bash -c \
      "rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1 || (exec 3<>/dev/tcp/127.0.0.1/$AMQP_PORT) 2>/dev/null"
    wait_for 60 "port $AMQP_PORT" port_open "$AMQP_PORT"
  fi
  if ! mgmt_answers; then
    if command -v rabbitmq-plugins >/dev/null 2>&1; then
      log "enabling rabbitmq_management"
      rabbitmq-plugins enable rabbitmq_management >/dev/null
    fi
    wait_for 60 "the management API on 15672" mgmt_answers
  fi
  # Broker behaviour (delivery-count on nack vs reject, delivery-limit
  # defaults) changed across versions; record which one the tests ran on.
  if command -v rabbitmqctl >/dev/null 2>&1; then
    log "RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '(version unknown)')"
  fi
}

ensure_nextest() {
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install cargo-nextest --locked
  fi
}

# Shells the script generator is tested under (dash, bash, busybox sh),
# bubblewrap for the local executor's optional isolation, and patch/node/python3
# that the example fix attempts run; python's jsonschema for the schema check.
ensure_packages() {
  local missing=()
  command -v dash >/dev/null 2>&1 || missing+=(dash)
  command -v bash >/dev/null 2>&1 || missing+=(bash)
  command -v busybox >/dev/null 2>&1 || missing+=(busybox)
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  command -v patch >/dev/null 2>&1 || missing+=(patch)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # The console's browser tests drive Debian's headless Chromium through its
  # chromedriver; Chromium offers no other download that runs here.
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  # The client packages (clients/): Node.js 20+ with npm, and python's venv
  # module for their test venv under target/.
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
      log "the tests need: ${missing[*]} (Debian: sudo apt-get install -y ${missing[*]})"
      return 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if (($(node -p 'process.versions.node.split(".")[0]') < 20)); then
    log "the TypeScript client needs Node.js 20 or later; node is $(node --version)"
    return 1
  fi
  if ! python3 -c 'import jsonschema' 2>/dev/null; then
    log "installing python jsonschema"
    python3 -m pip install -q jsonschema
  fi
}

ensure_packages
ensure_rabbitmq
ensure_nextest
