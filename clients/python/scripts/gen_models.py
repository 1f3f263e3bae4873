#!/usr/bin/env python3
"""Generates src/sandfleet_client/models/{task,result}.py (TypedDicts) from the
committed JSON Schemas (schemas/*.v1.schema.json) with datamodel-code-generator
(pinned in requirements-test.txt). With --check, writes nothing and exits 1 when
the committed modules differ from what the schemas give: the models cannot
drift from the contract unnoticed.
"""
import os
import pathlib
import subprocess
import sys
import tempfile

here = pathlib.Path(__file__).resolve().parent
# SANDFLEET_SCHEMAS_DIR points the check elsewhere (its own test uses a changed copy).
schemas = pathlib.Path(os.environ.get("SANDFLEET_SCHEMAS_DIR") or here.parent.parent.parent / "schemas")
models = here.parent / "src" / "sandfleet_client" / "models"
check = "--check" in sys.argv[1:]


def generate(name: str, out: pathlib.Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "datamodel_code_generator",
            "--input", str(schemas / f"{name}.v1.schema.json"),
            "--input-file-type", "jsonschema",
            "--output-model-type", "typing.TypedDict",
            "--target-python-version", "3.10",
            "--formatters", "builtin",
            "--disable-timestamp",
            "--use-schema-description",
            "--use-field-description",
            "--output", str(out),
        ],
        check=True,
        stderr=subprocess.DEVNULL if check else None,
    )


drift = []
with tempfile.TemporaryDirectory() as tmp:
    for name in ("task", "result", "cancellation"):
        target = models / f"{name}.py"
        if check:
            fresh = pathlib.Path(tmp) / f"{name}.py"
            generate(name, fresh)
            if not target.exists() or target.read_text() != fresh.read_text():
                drift.append(f"{target.relative_to(here.parent)} differs from schemas/{name}.v1.schema.json")
        else:
            generate(name, target)
if drift:
    sys.exit("check models: " + "; ".join(drift) + " (run scripts/gen_models.py)")
if check:
    print("check models: src/sandfleet_client/models matches schemas/")
