"""enqueue() and results() against the real RabbitMQ and a real Rust worker
(local executor) that clients/with-fleet.sh starts on a prefix of its own."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import uuid
from datetime import datetime, timedelta, timezone

import aio_pika
import pytest
from conftest import close_connections, echo_task, env, final_result

from sandfleet_client import CancelError, EnqueueError, Fleet, new_task

REPO = pathlib.Path(__file__).resolve().parents[3]
TS_CLIENT = REPO / "clients" / "typescript" / "dist" / "index.js"


async def test_a_task_carries_the_rust_producer_properties_and_headers(fleet: Fleet) -> None:
    # A queue of our own on the task exchange sees exactly what the worker's queue gets.
    async with await aio_pika.connect(env("SANDFLEET_AMQP_URL")) as conn:
        ch = await conn.channel()
        queue = await ch.declare_queue(exclusive=True)
        await queue.bind(fleet.tasks_exchange, "task")
        task = echo_task("props")
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        assert await fleet.enqueue(task, traceparent=tp) == task["id"]
        msg = None
        deadline = asyncio.get_running_loop().time() + 10
        while msg is None and asyncio.get_running_loop().time() < deadline:
            msg = await queue.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
        assert msg is not None, "the task reached the queue"
        assert msg.message_id == task["id"]
        assert msg.type == "sandfleet.task.v1"
        assert msg.content_type == "application/json"
        assert msg.correlation_id == task["id"]
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.timestamp is not None
        assert abs((msg.timestamp - datetime.now(timezone.utc)).total_seconds()) < 60
        assert msg.headers["x-sandfleet-attempt"] == 1
        assert msg.headers["x-idempotency-key"] == task["idempotency_key"]
        assert msg.headers["traceparent"] == tp
        assert json.loads(msg.body) == task


async def test_an_enqueued_task_is_run_by_the_worker_and_read_back_from_a_timestamp(
    fleet: Fleet,
) -> None:
    since = datetime.now(timezone.utc)
    task = echo_task("hello from python")
    await fleet.enqueue(task)
    async with fleet.results(since) as sub:
        result = await final_result(sub, task["id"])
    assert (result["outcome"], result["attempt"]) == ("succeeded", 1)
    assert "hello from python" in result.get("log_tail", "")
    assert result.get("task", {}) and result["task"]["id"] == task["id"]  # type: ignore[index]


async def test_results_are_deduplicated_by_task_id_and_attempt(fleet: Fleet) -> None:
    task = echo_task("dedup")
    async with fleet.results("next") as sub:
        await fleet.enqueue(task)
        result = await final_result(sub, task["id"])
    # Deliver the same result again (at-least-once), then a marker to stop at.
    marker = {**result, "task_id": echo_task("marker")["id"]}
    async with await aio_pika.connect(env("SANDFLEET_AMQP_URL")) as conn:
        ch = await conn.channel(publisher_confirms=True)
        exchange = await ch.get_exchange(f"{fleet.prefix}.results")
        for r in (result, result, marker):
            await exchange.publish(aio_pika.Message(json.dumps(r).encode()), "succeeded.final")
    seen = 0
    async with fleet.results("first") as sub:

        async def count() -> None:
            nonlocal seen
            async for received in sub:
                if received.result["task_id"] == task["id"]:
                    seen += 1
                if received.result["task_id"] == marker["task_id"]:
                    return

        await asyncio.wait_for(count(), 60)
    assert seen == 1, "one delivery per (task_id, attempt)"


async def test_next_skips_earlier_results_and_last_starts_at_the_newest_chunk(
    fleet: Fleet,
) -> None:
    before = echo_task("before")
    await fleet.enqueue(before)
    async with fleet.results(datetime.now(timezone.utc) - timedelta(seconds=5)) as sub:
        await final_result(sub, before["id"])
    got: list[str] = []
    after = echo_task("after")
    async with fleet.results("next") as sub:
        await fleet.enqueue(after)

        async def collect() -> None:
            async for received in sub:
                got.append(received.result["task_id"])
                if received.result["task_id"] == after["id"] and received.result["final"]:
                    return

        await asyncio.wait_for(collect(), 60)
    assert after["id"] in got
    assert before["id"] not in got, "an earlier result came through next"
    # The newest result is in the last chunk, without anything new being published.
    async with fleet.results("last") as sub:
        await final_result(sub, after["id"], timeout=10)


async def test_a_task_no_queue_is_bound_for_is_an_error_not_a_silent_success(fleet: Fleet) -> None:
    prefix = f"{fleet.prefix}-unbound"
    async with await aio_pika.connect(env("SANDFLEET_AMQP_URL")) as conn:
        ch = await conn.channel()
        exchange = await ch.declare_exchange(f"{prefix}.tasks", aio_pika.ExchangeType.DIRECT)
        try:
            async with Fleet(env("SANDFLEET_AMQP_URL"), prefix=prefix) as lonely:
                with pytest.raises(EnqueueError):
                    await lonely.enqueue(echo_task("nowhere"))
        finally:
            await exchange.delete()


async def test_a_task_enqueued_from_typescript_is_run_by_the_worker_and_read_back_here(
    fleet: Fleet,
) -> None:
    node = shutil.which("node")
    assert node, "node is not installed"
    assert TS_CLIENT.exists(), f"{TS_CLIENT} is missing (scripts/test.sh clients builds it)"
    script = f"""
import {{ Fleet, newTask }} from {json.dumps(TS_CLIENT.as_uri())};
const fleet = await Fleet.connect({{ url: process.env.SANDFLEET_AMQP_URL, prefix: process.env.SANDFLEET_PREFIX }});
const task = newTask({{
  source: {{ provider: 'api', repository: 'acme/clients', commit: 'd'.repeat(40) }},
  sandbox: {{ image: 'alpine:3.20', deadline_secs: 60 }},
  steps: [{{ name: 'say', run: 'echo hello from typescript', timeout_secs: 30 }}],
}});
console.log(await fleet.enqueue(task));
await fleet.close();
"""
    since = datetime.now(timezone.utc)
    proc = await asyncio.create_subprocess_exec(
        node, "--input-type=module", "-e", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=os.environ.copy(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    task_id = out.decode().strip()
    async with fleet.results(since) as sub:
        result = await final_result(sub, task_id)
    assert result["outcome"] == "succeeded"
    assert "hello from typescript" in result.get("log_tail", "")


async def test_after_the_broker_closes_its_connections_results_resume_and_enqueue_reconnects() -> None:
    name = f"sandfleet-client-py-test-{uuid.uuid4().hex[:8]}"
    async with Fleet(env("SANDFLEET_AMQP_URL"), prefix=env("SANDFLEET_PREFIX"), connection_name=name) as fleet:
        first, second = echo_task("before the cut"), echo_task("after the cut")
        async with fleet.results("next") as sub:
            await fleet.enqueue(first)
            await final_result(sub, first["id"])
            # The subscription's own connection, then the publisher's.
            assert await close_connections(f"{name}-results") == 1
            assert await close_connections(name) == 1
            deadline = asyncio.get_running_loop().time() + 30
            while fleet.is_connected:
                assert asyncio.get_running_loop().time() < deadline, "the cut went unnoticed"
                await asyncio.sleep(0.05)
            await fleet.enqueue(second)
            seen: list[str] = []

            async def read_on() -> None:
                async for received in sub:
                    seen.append(received.result["task_id"])
                    if received.result["task_id"] == second["id"] and received.result["final"]:
                        return

            await asyncio.wait_for(read_on(), 60)
        assert second["id"] in seen, "the subscription did not read on after the cut"
        assert first["id"] not in seen, "the resumed subscription started over"


async def test_cancel_ends_a_long_task_with_one_cancelled_result_and_a_second_finds_it_finished(
    fleet: Fleet,
) -> None:
    since = datetime.now(timezone.utc)
    task = new_task(
        source={"provider": "api", "repository": "acme/clients", "commit": "e" * 40},
        sandbox={"image": "alpine:3.20", "deadline_secs": 300},
        steps=[{"name": "long", "run": "echo started; sleep 240", "timeout_secs": 280}],
    )
    await fleet.enqueue(task)
    status = await fleet.cancel(task["id"], by="client-test", reason="no longer needed")
    assert status.status == "recorded" and status.cancel_id
    async with fleet.results(since) as sub:
        result = await final_result(sub, task["id"], timeout=90)
    assert result["outcome"] == "cancelled"
    assert (result.get("cancellation") or {}).get("by") == "client-test"
    assert (result.get("cancellation") or {}).get("reason") == "no longer needed"
    again = await fleet.cancel(task["id"])
    assert (again.status, again.outcome) == ("already_finished", "cancelled")
    with pytest.raises(CancelError):
        await fleet.cancel("not-a-task-id")
    with pytest.raises(CancelError):
        await fleet.cancel("0193a6d2-5b1e-4c40-9a2f-3e4d5c6b7a01")  # a UUIDv4


async def test_a_task_the_broker_nacks_a_full_task_queue_is_an_error_not_a_silent_success(
    fleet: Fleet,
) -> None:
    full = f"{fleet.prefix}-full"
    async with await aio_pika.connect(env("SANDFLEET_AMQP_URL")) as conn:
        ch = await conn.channel()
        exchange = await ch.declare_exchange(f"{full}.tasks", aio_pika.ExchangeType.DIRECT)
        queue = await ch.declare_queue(
            f"{full}.tasks", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await queue.bind(exchange, "task")
        try:
            async with Fleet(env("SANDFLEET_AMQP_URL"), prefix=full) as producer:
                await producer.enqueue(echo_task("fits"))
                with pytest.raises(EnqueueError):
                    await producer.enqueue(echo_task("does not fit"))
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
