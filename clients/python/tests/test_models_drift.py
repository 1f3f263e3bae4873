"""The generated models are checked against the schemas: a schema change the
models do not follow fails `scripts/gen_models.py --check`."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1]


def check(schemas: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if schemas is not None:
        env["SANDFLEET_SCHEMAS_DIR"] = str(schemas)
    return subprocess.run(
        [sys.executable, "scripts/gen_models.py", "--check"],
        cwd=PKG, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_check_passes_on_the_committed_schemas_and_fails_on_a_changed_one(
    tmp_path: pathlib.Path,
) -> None:
    ok = check()
    assert ok.returncode == 0, ok.stderr
    schemas = tmp_path / "schemas"
    shutil.copytree(os.environ.get("SANDFLEET_SCHEMAS_DIR") or PKG.parents[1] / "schemas", schemas)
    task = schemas / "task.v1.schema.json"
    schema = json.loads(task.read_text())
    schema["properties"]["priority"] = {"type": "integer", "description": "Unknown to the models."}
    task.write_text(json.dumps(schema))
    drift = check(schemas)
    assert drift.returncode == 1
    assert "task.py differs" in drift.stderr
