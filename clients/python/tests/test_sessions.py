"""The session scenario of docs/sessions.md through the Python client, against
a real `sandfleet sessions` service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from sandfleet_client import Sandbox, SessionsClient, SessionsError


@pytest.fixture(scope="module")
async def sb() -> AsyncIterator[Sandbox]:
    async with Sandbox(
        "alpine:3.20", env={"GREETING": "hello from env"}, working_dir="src", idle_timeout=120
    ) as sandbox:
        yield sandbox


async def test_a_written_file_is_read_by_a_command_stdout_and_stderr_apart(sb: Sandbox) -> None:
    await sb.write_file("notes/plan.txt", "step one\nstep two\n")
    r = await sb.run_command("cat notes/plan.txt; echo to-stderr >&2", timeout=10)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (
        0,
        "step one\nstep two\n",
        "to-stderr\n",
        False,
    )


async def test_a_binary_file_with_all_256_byte_values_comes_back_exactly(sb: Sandbox) -> None:
    data = bytes(range(256))
    await sb.write_file("blob.bin", data)
    assert await sb.read_file("blob.bin") == data
    assert (await sb.run_command("wc -c < blob.bin")).stdout.strip() == "256"


async def test_env_and_working_dir_are_honoured(sb: Sandbox) -> None:
    r = await sb.run_command('echo "$GREETING"; basename "$PWD"')
    assert r.stdout == "hello from env\nsrc\n"


async def test_a_failing_command_is_an_exit_code_not_an_exception(sb: Sandbox) -> None:
    r = await sb.run_command("echo failing >&2; exit 3")
    assert (r.exit_code, r.stderr) == (3, "failing\n")


async def test_past_its_timeout_a_command_is_killed_with_its_children_and_the_next_works(
    sb: Sandbox,
) -> None:
    started = time.monotonic()
    r = await sb.run_command("sleep 300 & echo $! > child.pid; echo started; sleep 300", timeout=1)
    assert r.timed_out
    assert r.stdout == "started\n"
    assert time.monotonic() - started < 30, "the command ran to its end"
    # A killed child may linger as a zombie where PID 1 does not reap: look at its state.
    after = await sb.run_command(
        """s=$(sed 's/.*) //' /proc/"$(cat child.pid)"/stat 2>/dev/null | cut -c1); """
        """case "$s" in ''|Z|X) echo gone ;; *) echo alive ;; esac"""
    )
    assert (after.exit_code, after.stdout) == (0, "gone\n")


async def test_a_missing_file_is_refused_with_the_code_file(sb: Sandbox) -> None:
    with pytest.raises(SessionsError) as e:
        await sb.read_file("no/such/file")
    assert (e.value.status, e.value.code) == (422, "file")


async def test_teardown_ends_the_session_and_is_idempotent() -> None:
    client = SessionsClient()
    try:
        other = await Sandbox("alpine:3.20", client=client).init()
        session_id = other.id
        assert any(s["id"] == session_id for s in await client.list())
        await other.teardown()
        await other.teardown()
        assert not any(s["id"] == session_id and not s["ended"] for s in await client.list())
        with pytest.raises(RuntimeError, match="not initialised"):
            await other.run_command("true")
    finally:
        await client.aclose()


async def test_leaving_async_with_by_an_exception_tears_the_session_down() -> None:
    client = SessionsClient()
    try:
        with pytest.raises(ZeroDivisionError):
            async with Sandbox("alpine:3.20", client=client) as sandbox:
                session_id = sandbox.id
                1 / 0
        assert not any(s["id"] == session_id and not s["ended"] for s in await client.list())
    finally:
        await client.aclose()
