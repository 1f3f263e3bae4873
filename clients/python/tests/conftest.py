"""Fixtures against the fleet clients/with-fleet.sh starts: the real RabbitMQ,
a real Rust worker (local executor) on a prefix of its own, and a real
`sandfleet sessions` service."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sandfleet_client import Fleet, Subscription, TaskResult, new_task


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"${name} is not set: run the tests through clients/with-fleet.sh")
    return value


@pytest.fixture(scope="session")
async def fleet() -> AsyncIterator[Fleet]:
    async with Fleet(env("SANDFLEET_AMQP_URL"), prefix=env("SANDFLEET_PREFIX")) as f:
        yield f


def echo_task(text: str) -> Any:
    return new_task(
        source={"provider": "api", "repository": "acme/clients", "commit": "c" * 40},
        sandbox={"image": "alpine:3.20", "deadline_secs": 60},
        steps=[{"name": "say", "run": f'echo "{text}"', "timeout_secs": 30}],
    )


async def final_result(sub: Subscription, task_id: str, timeout: float = 60) -> TaskResult:
    """The final result of `task_id`, read from `sub`, within a bounded time."""

    async def find() -> TaskResult:
        async for received in sub:
            if received.result["task_id"] == task_id and received.result["final"]:
                return received.result
        raise AssertionError(f"the subscription ended before {task_id}'s result")

    return await asyncio.wait_for(find(), timeout)


def _mgmt(method: str, path: str) -> Any:
    import base64
    import json
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:15672/api{path}", method=method)
    req.add_header("authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=10) as res:
        body = res.read()
        return json.loads(body) if body else None


async def close_connections(connection_name: str, timeout: float = 30) -> int:
    """Closes, through the management API, every broker connection whose
    client-given name is `connection_name`; waits until the API lists one."""
    import urllib.parse

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        conns = await asyncio.to_thread(_mgmt, "GET", "/connections")
        names = [
            c["name"]
            for c in conns
            if c.get("client_properties", {}).get("connection_name") == connection_name
        ]
        if names:
            for name in names:
                await asyncio.to_thread(
                    _mgmt, "DELETE", "/connections/" + urllib.parse.quote(name, safe="")
                )
            return len(names)
        if loop.time() > deadline:
            raise AssertionError(f"the management API lists no connection {connection_name!r}")
        await asyncio.sleep(0.2)
