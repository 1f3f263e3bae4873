# Commands people run. `just --list` shows them; each is a thin wrapper so
# the scripts stay usable without just.

# Everything CI checks: fmt, clippy, tests, doctests, schemas, deny.
test *steps:
    scripts/test.sh {{steps}}

# The CI entry point (starts RabbitMQ if needed, installs nextest, runs the tests).
ci:
    .ci/run

# Regenerate schemas/*.v1.schema.json after changing the message types.
bless-schemas:
    SANDFLEET_BLESS=1 cargo test -p sandfleet-proto --test schema

# Dependency policy only (licences, advisories, bans, sources).
deny:
    scripts/test.sh deny

# Format the whole workspace.
fmt:
    cargo fmt --all
