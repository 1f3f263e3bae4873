"""Enqueue tasks and follow results over AMQP, with the same exchanges,
properties and headers as the Rust producer (docs/topology.md)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Literal, Union, cast

import aio_pika
import aio_pika.abc
from aio_pika.exceptions import DeliveryError, PublishError

from .models.cancellation import Cancellation
from .models.result import Outcome, TaskResult
from .models.task import Task

TASK_MESSAGE_TYPE = "sandfleet.task.v1"
RESULT_MESSAGE_TYPE = "sandfleet.result.v1"
CANCELLATION_MESSAGE_TYPE = "sandfleet.cancellation.v1"
SCHEMA_VERSION = 1
_MAX_CANCEL_TEXT = 512
# How long the finished-check of `cancel` reads on after the last result it saw, and at most.
_LOOKUP_QUIET = 0.3
_LOOKUP_BUDGET = 5.0
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
_CONTENT_TYPE = "application/json"
_TASK_ROUTING_KEY = "task"
_HEADER_ATTEMPT = "x-sandfleet-attempt"
_HEADER_IDEMPOTENCY_KEY = "x-idempotency-key"
_HEADER_TRACEPARENT = "traceparent"
_HEADER_PUBLISHED_AT_MS = "x-sandfleet-published-at-ms"

StartAt = Union[Literal["first", "last", "next"], datetime]
"""Where a results subscription starts (`x-stream-offset`)."""


class CancelError(Exception):
    """A cancel refused before anything was published (an id that cannot be a
    task of this fleet, a text too long)."""


@dataclass(frozen=True)
class CancelStatus:
    """What `cancel` did: `recorded` (with `cancel_id`: the task ends with a
    `cancelled` result unless it finishes first) or `already_finished` (with the
    final `outcome`; nothing was recorded)."""

    status: Literal["recorded", "already_finished"]
    cancel_id: str | None = None
    outcome: Outcome | None = None


def _created_at(task_id: str) -> datetime:
    """The creation time of a task: the timestamp of its UUIDv7 id."""
    try:
        u = uuid.UUID(task_id)
    except ValueError:
        raise CancelError(f"{task_id!r} is not a task id of this fleet (a UUIDv7)") from None
    if u.version != 7:
        raise CancelError(f"{task_id} is not a task id of this fleet (a UUIDv7)")
    at = datetime.fromtimestamp((u.int >> 80) / 1000, timezone.utc)
    if at > datetime.now(timezone.utc) + timedelta(minutes=5):
        raise CancelError(f"{task_id}: its timestamp is in the future")
    return at


class EnqueueError(Exception):
    """The broker returned or refused a task: it was not enqueued."""


def uuid7(now_ms: int | None = None) -> str:
    """A UUIDv7 (time-ordered), the id format of sandfleet tasks."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    b = bytearray(ms.to_bytes(6, "big") + secrets.token_bytes(10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))


def new_task(**fields: Any) -> Task:
    """A complete v1 task from the fields a caller chooses (`source`, `sandbox`,
    `steps`, optionally `files`, `labels`, ...): a fresh UUIDv7 `id`,
    `created_at` now, `kind="fix_attempt"`, `idempotency_key="api:<id>"`."""
    task_id = fields.pop("id", None) or uuid7()
    task: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "id": task_id,
        "idempotency_key": fields.pop("idempotency_key", None) or f"api:{task_id}",
        "kind": "fix_attempt",
        "created_at": fields.pop("created_at", None)
        or datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    task.update(fields)
    return cast(Task, task)


@dataclass(frozen=True)
class Received:
    """A result read from the stream."""

    result: TaskResult
    offset: int | None
    """Its stream offset."""
    published_at: datetime | None
    """When it was published (millisecond header, else the AMQP timestamp)."""
    traceparent: str | None


class Dedup:
    """Remembers recent `(task_id, attempt)` keys (results come at least once)."""

    def __init__(self, capacity: int) -> None:
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._capacity = max(1, capacity)

    def first_time(self, result: TaskResult) -> bool:
        key = (result["task_id"], result["attempt"])
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True


class Fleet:
    """A connection to a sandfleet fleet's broker::

    async with Fleet(url, prefix="sandfleet") as fleet:
        await fleet.enqueue(task)
        async for received in fleet.results("first"): ...
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "sandfleet",
        connection_name: str = "sandfleet-client-py",
    ) -> None:
        self.url = url or os.environ.get("SANDFLEET_AMQP_URL") or DEFAULT_URL
        self.prefix = prefix
        self._connection_name = connection_name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._confirm: aio_pika.abc.AbstractChannel | None = None

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def results_stream(self) -> str:
        return f"{self.prefix}.results.stream"

    @property
    def is_connected(self) -> bool:
        """True while the publishing connection is open. `enqueue` replaces a
        lost one."""
        # The channel notices a broker-side close first; the connection
        # object may not mark itself closed at all.
        return (
            self._connection is not None
            and not self._connection.is_closed
            and self._confirm is not None
            and not self._confirm.is_closed
        )

    async def connect(self) -> Fleet:
        if not self.is_connected:
            if self._connection is not None and not self._connection.is_closed:
                try:
                    await self._connection.close()
                except Exception:  # noqa: BLE001 - it is being replaced because it broke
                    pass
            self._connection = await aio_pika.connect(
                self.url, client_properties={"connection_name": self._connection_name}
            )
            # Mandatory publishes that come back raise instead of passing silently.
            self._confirm = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        return self

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._confirm = None

    async def __aenter__(self) -> Fleet:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _connected(self) -> aio_pika.abc.AbstractConnection:
        if self._connection is None:
            raise RuntimeError("not connected: use `async with Fleet(...)` or await connect()")
        return self._connection

    async def enqueue(self, task: Task, *, traceparent: str | None = None) -> str:
        """Publishes a task (mandatory, persistent) and returns its id once the
        broker confirmed it; raises `EnqueueError` when it was returned (no queue
        bound) or nacked (a full task queue). A connection lost before the
        confirm raises aio-pika's connection error: the task may or may not be
        queued."""
        self._connected()
        # A connection lost since the last publish is replaced: this publish
        # gets a fresh one. (One lost while waiting for a confirm is an error.)
        if not self.is_connected:
            await self.connect()
        assert self._confirm is not None
        if task.get("schema_version") != SCHEMA_VERSION:
            raise EnqueueError(
                f"schema_version {task.get('schema_version')!r}: this client speaks {SCHEMA_VERSION}"
            )
        headers: dict[str, Any] = {
            _HEADER_ATTEMPT: 1,
            _HEADER_IDEMPOTENCY_KEY: task["idempotency_key"],
        }
        if traceparent:
            headers[_HEADER_TRACEPARENT] = traceparent
        message = aio_pika.Message(
            json.dumps(task, separators=(",", ":")).encode(),
            content_type=_CONTENT_TYPE,
            type=TASK_MESSAGE_TYPE,
            message_id=task["id"],
            correlation_id=task.get("replay_of") or task["id"],
            timestamp=datetime.now(timezone.utc),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )
        try:
            await self._publish(self.tasks_exchange, _TASK_ROUTING_KEY, message)
        except (DeliveryError, PublishError) as e:
            raise EnqueueError(
                f"task {task['id']} was not enqueued on {self.tasks_exchange}: {e!r}"
            ) from e
        return task["id"]

    async def _publish(self, exchange_name: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publishes mandatory with a confirm (a returned message raises too)."""
        assert self._confirm is not None
        exchange = await self._confirm.get_exchange(exchange_name, ensure=False)
        await exchange.publish(message, routing_key=routing_key, mandatory=True)

    async def cancel(
        self, task_id: str, *, by: str = "sandfleet-client-py", reason: str = ""
    ) -> CancelStatus:
        """Cancels one task, as `Producer::cancel` does: unless the results
        stream already holds the task's final result, records a cancellation
        (confirmed) on `<prefix>.cancellations`, which every worker reads. The
        finished check reads the stream from the task's creation time (its
        UUIDv7 timestamp) until it is quiet: a final result published meanwhile
        may be missed, which is harmless (the worker holding the task decides)."""
        self._connected()
        created = _created_at(task_id)
        for field, text in (("by", by), ("reason", reason)):
            size = len(text.encode())
            if size > _MAX_CANCEL_TEXT:
                raise CancelError(f"{field} is {size} bytes, over {_MAX_CANCEL_TEXT}")
        outcome = await self._final_outcome(task_id, created)
        if outcome is not None:
            return CancelStatus("already_finished", outcome=outcome)
        cancel: Cancellation = {
            "schema_version": 1,
            "id": uuid7(),
            "target": {"kind": "task", "task_id": task_id},
            "by": by,
            "reason": reason,
            "requested_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        if not self.is_connected:
            await self.connect()
        await self._publish(
            f"{self.prefix}.cancellations",
            "",
            aio_pika.Message(
                json.dumps(cancel, separators=(",", ":")).encode(),
                content_type=_CONTENT_TYPE,
                type=CANCELLATION_MESSAGE_TYPE,
                message_id=cancel["id"],
                timestamp=datetime.now(timezone.utc),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
        )
        return CancelStatus("recorded", cancel_id=cancel["id"])

    async def _final_outcome(self, task_id: str, created: datetime) -> Outcome | None:
        sub = Subscription(self, created - timedelta(seconds=1), 500, 100_000)
        sub._connection_name = f"{self._connection_name}-cancel-lookup"
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _LOOKUP_BUDGET
        try:
            await sub.start()
            while True:
                quiet = min(_LOOKUP_QUIET, give_up - loop.time())
                if quiet <= 0:
                    return None
                try:
                    received = await asyncio.wait_for(sub.__anext__(), quiet)
                except (asyncio.TimeoutError, StopAsyncIteration):
                    return None
                r = received.result
                if r["task_id"] == task_id and r["final"]:
                    return r["outcome"]
        finally:
            await sub.close()

    def results(
        self,
        start: StartAt = "next",
        *,
        prefetch: int = 500,
        dedup_capacity: int = 100_000,
    ) -> Subscription:
        """Results from the stream, deduplicated by `(task_id, attempt)`.
        `async for r in fleet.results("first")` starts the consumer at the first
        iteration; `async with fleet.results("next") as sub` starts it at once."""
        return Subscription(self, start, prefetch, dedup_capacity)


class SubscriptionLost(ConnectionError):
    """A results subscription lost its connection and could not get one back
    within its reconnect timeout."""


class Subscription:
    """A results consumer: an async iterator of `Received`, and an async context
    manager that starts it on entry and cancels it on exit.

    It has a connection of its own. When that connection is lost it reconnects
    and resumes after the last offset it delivered (with backoff, for up to
    `reconnect_timeout` seconds, then `SubscriptionLost`)."""

    def __init__(self, fleet: Fleet, start: StartAt, prefetch: int, dedup_capacity: int) -> None:
        self._url = fleet.url
        self._stream = fleet.results_stream
        self._connection_name = f"{fleet._connection_name}-results"
        self._prefetch = max(1, prefetch)
        self._dedup = Dedup(dedup_capacity)
        self._not_before_ms: int | None = None
        self._first_offset: Any = start
        if isinstance(start, datetime):
            at = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
            self._not_before_ms = int(at.timestamp() * 1000)
            # The broker seeks timestamps by whole seconds and chunks: start a
            # second early and drop what was published before the asked time.
            self._first_offset = at.replace(microsecond=0) - timedelta(seconds=1)
        self._last_offset: int | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._iter: aio_pika.abc.AbstractQueueIterator | None = None
        self._closed = False
        self.reconnect_timeout = 60.0

    async def _open(self) -> None:
        self._connection = await aio_pika.connect(
            self._url, client_properties={"connection_name": self._connection_name}
        )
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        queue = await channel.get_queue(self._stream, ensure=False)
        offset = self._first_offset if self._last_offset is None else self._last_offset + 1
        self._iter = queue.iterator(arguments={"x-stream-offset": offset})
        # Registers the consumer now, so "next" means after this call.
        await self._iter.consume()

    async def _drop(self) -> None:
        connection, self._connection, self._iter = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception:  # noqa: BLE001 - a broken connection cannot close cleanly
                pass

    async def _reopen(self) -> None:
        await self._drop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_timeout
        delay = 0.1
        while True:
            try:
                await self._open()
                return
            except (aio_pika.exceptions.AMQPError, OSError) as e:
                await self._drop()
                if loop.time() + delay > deadline:
                    raise SubscriptionLost(
                        f"the results subscription to {self._stream} lost its connection: {e!r}"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def start(self) -> Subscription:
        if self._closed:
            raise RuntimeError("the subscription is closed")
        if self._iter is None:
            try:
                await self._open()
            except BaseException:
                await self._drop()
                raise
        return self

    async def close(self) -> None:
        self._closed = True
        await self._drop()

    async def __aenter__(self) -> Subscription:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Received]:
        return self

    async def __anext__(self) -> Received:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        while True:
            assert self._iter is not None
            try:
                msg = await self._iter.__anext__()
            except (StopAsyncIteration, aio_pika.exceptions.AMQPError, OSError):
                # The iterator ends quietly when its channel closes: unless we
                # closed it, that is a lost connection, not the end of results.
                if self._closed:
                    raise StopAsyncIteration from None
                await self._reopen()
                continue
            try:
                # Stream acks only grant credit; a failed one costs nothing.
                await msg.ack()
            except (aio_pika.exceptions.AMQPError, OSError):
                pass
            headers = msg.headers or {}
            offset = _int(headers.get("x-stream-offset"))
            if offset is not None:
                if self._last_offset is not None and offset <= self._last_offset:
                    continue
                self._last_offset = offset
            published_ms = _int(headers.get(_HEADER_PUBLISHED_AT_MS))
            if published_ms is None and msg.timestamp is not None:
                published_ms = int(msg.timestamp.timestamp()) * 1000
            if (
                self._not_before_ms is not None
                and published_ms is not None
                and published_ms < self._not_before_ms
            ):
                continue
            result = cast(TaskResult, json.loads(msg.body))
            if not self._dedup.first_time(result):
                continue
            tp = headers.get(_HEADER_TRACEPARENT)
            return Received(
                result=result,
                offset=offset,
                published_at=(
                    datetime.fromtimestamp(published_ms / 1000, timezone.utc)
                    if published_ms is not None
                    else None
                ),
                traceparent=tp.decode() if isinstance(tp, bytes) else tp if isinstance(tp, str) else None,
            )


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None
