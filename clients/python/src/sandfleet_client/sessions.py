"""A client of the sessions service's HTTP API (docs/sessions.md)."""

from __future__ import annotations

import base64
import math
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict

import httpx


class SessionInfo(TypedDict):
    id: str
    image: str
    working_dir: str
    idle_timeout_secs: int
    created: str | None
    ended: bool


@dataclass(frozen=True)
class CommandResult:
    """What a command did. A non-zero exit is data, not an exception."""

    stdout: str
    """Stdout decoded as UTF-8 (invalid bytes replaced); `stdout_bytes` is exact."""
    stderr: str
    exit_code: int
    timed_out: bool
    """It ran past its timeout and was killed with its children."""
    stdout_bytes: bytes
    stderr_bytes: bytes
    stdout_truncated: bool
    stderr_truncated: bool


class SessionsError(Exception):
    """An error answered by the service; `code` is its stable code
    (`not_found`, `file`, `timeout_limit`, `connection_lost`, ...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


class SessionsClient:
    """The sessions HTTP API. `url` and `token` default to
    `$SANDFLEET_SESSIONS_URL` and `$SANDFLEET_SESSIONS_TOKEN`."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0
    ) -> None:
        url = url or os.environ.get("SANDFLEET_SESSIONS_URL")
        token = token or os.environ.get("SANDFLEET_SESSIONS_TOKEN")
        if not url:
            raise ValueError("sessions URL: pass url= or set SANDFLEET_SESSIONS_URL")
        if not token:
            raise ValueError("sessions token: pass token= or set SANDFLEET_SESSIONS_TOKEN")
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        res = await self._http.request(method, path, **kwargs)
        if res.is_error:
            code, message = "http_error", res.text
            try:
                err = res.json().get("error", {})
                code, message = err.get("code", code), err.get("message", message)
            except ValueError:
                pass  # Not a JSON error body (a proxy's page): keep the text.
            raise SessionsError(res.status_code, code, message)
        return res

    async def list(self) -> list[SessionInfo]:
        """This token's sessions."""
        res = await self.request("GET", "/v1/sessions")
        sessions: list[SessionInfo] = res.json()
        return sessions


class Sandbox:
    """One sandbox session::

        async with Sandbox(image="python:3.12", env={"CI": "1"}) as sb:
            await sb.write_file("fix.patch", patch)
            result = await sb.run_command("git apply fix.patch && make test", timeout=600)

    `async with` calls `init()` and `teardown()`; both are also public.
    Teardown is idempotent; an abandoned session ends by itself after its idle timeout.
    """

    def __init__(
        self,
        image: str,
        *,
        env: dict[str, str] | None = None,
        working_dir: str | None = None,
        idle_timeout: int | None = None,
        max_lifetime: int | None = None,
        resources: dict[str, str] | None = None,
        url: str | None = None,
        token: str | None = None,
        client: SessionsClient | None = None,
    ) -> None:
        self._own_client = client is None
        self.client = client or SessionsClient(url, token)
        self._spec: dict[str, Any] = {"image": image}
        for key, value in (
            ("env", env),
            ("working_dir", working_dir),
            ("idle_timeout", idle_timeout),
            ("max_lifetime", max_lifetime),
            ("resources", resources),
        ):
            if value is not None:
                self._spec[key] = value
        self.id: str | None = None

    async def init(self) -> Sandbox:
        """Creates the session; returns once commands can run."""
        if self.id is None:
            res = await self.client.request("POST", "/v1/sessions", json=self._spec)
            self.id = res.json()["id"]
        return self

    def _path(self, suffix: str = "") -> str:
        if self.id is None:
            raise RuntimeError("the sandbox is not initialised: await init() first")
        return f"/v1/sessions/{self.id}{suffix}"

    async def run_command(
        self, command: str, *, timeout: float = 60.0, max_output_bytes: int | None = None
    ) -> CommandResult:
        """Runs `command` with `/bin/sh -c`. `timeout` in seconds (whole seconds,
        rounded up): past it the command and its process tree are killed."""
        body: dict[str, Any] = {"command": command, "timeout_secs": max(1, math.ceil(timeout))}
        if max_output_bytes is not None:
            body["max_output_bytes"] = max_output_bytes
        # The HTTP call may take as long as the command, plus the service's own overhead.
        res = await self.client.request(
            "POST", self._path("/run"), json=body, timeout=body["timeout_secs"] + 60
        )
        out = res.json()
        stdout, stderr = base64.b64decode(out["stdout"]), base64.b64decode(out["stderr"])
        return CommandResult(
            stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"),
            exit_code=out["exit_code"],
            timed_out=out["timed_out"],
            stdout_bytes=stdout,
            stderr_bytes=stderr,
            stdout_truncated=out["stdout_truncated"],
            stderr_truncated=out["stderr_truncated"],
        )

    async def write_file(self, path: str, content: str | bytes, *, mode: str = "644") -> None:
        """Writes a file (binary-safe; parents created). `mode` is octal text."""
        data = content.encode() if isinstance(content, str) else content
        await self.client.request(
            "PUT",
            self._path("/files"),
            params={"path": path, "mode": mode},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )

    async def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """A file's bytes; `SessionsError` (422, code `file`) when it does not exist."""
        params: dict[str, Any] = {"path": path}
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        res = await self.client.request("GET", self._path("/files"), params=params)
        return res.content

    async def teardown(self) -> None:
        """Ends the session. Idempotent."""
        if self.id is not None:
            try:
                await self.client.request("DELETE", self._path())
            except SessionsError as e:
                if e.status != 404:
                    raise
            self.id = None
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> Sandbox:
        return await self.init()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.teardown()
