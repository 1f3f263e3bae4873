#!/usr/bin/env python3
"""Validates the example messages against the committed JSON Schemas with an
independent (non-Rust) validator, the way a TypeScript or Python producer
would: valid examples must pass; invalid ones whose problem is structural
(unknown field, missing field, wrong schema_version) must fail.

Needs the `jsonschema` package (pip install jsonschema). Run from anywhere.
"""
import json
import pathlib
import sys

try:
    import jsonschema
except ImportError:
    sys.exit("check-schemas: the python `jsonschema` package is missing (pip install jsonschema)")

repo = pathlib.Path(__file__).resolve().parent.parent
schemas = {name: json.loads((repo / "schemas" / f"{name}.v1.schema.json").read_text()) for name in ("task", "result")}
validators = {}
for name, schema in schemas.items():
    jsonschema.Draft202012Validator.check_schema(schema)
    validators[name] = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())

failures = []
checked = 0


def errors(kind, path):
    return sorted(validators[kind].iter_errors(json.loads(path.read_text())), key=lambda e: list(e.path))


for kind, folder in (("task", "tasks"), ("result", "results")):
    for path in sorted((repo / "examples" / folder).glob("*.json")):
        checked += 1
        for e in errors(kind, path):
            failures.append(f"{path.relative_to(repo)}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")

# Invalid examples whose .expect code or paths show a structural problem.
for path in sorted((repo / "examples" / "tasks" / "invalid").glob("*.json")):
    expect = path.with_suffix(".expect").read_text()
    structural = "unknown_schema_version" in expect or path.stem in ("missing-steps", "unknown-field")
    if structural:
        checked += 1
        if not errors("task", path):
            failures.append(f"{path.relative_to(repo)}: the schema accepts it, but it is structurally invalid")

if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"check-schemas: {checked} examples agree with schemas/*.v1.schema.json")
