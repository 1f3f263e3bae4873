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
