"""Valkey connection and the event-id seen-set that makes event handlers idempotent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from functools import wraps
from typing import ParamSpec, TypeVar

import valkey.asyncio as valkey_async
from valkey.exceptions import ConnectionError as ValkeyConnectionError
from valkey.exceptions import TimeoutError as ValkeyTimeoutError

from services.common.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")

VALKEY_ERRORS = (ValkeyConnectionError, ValkeyTimeoutError, OSError)


def unavailable_on_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A store method whose Valkey trouble (connection, timeout) surfaces as `Unavailable` (UNAVAILABLE / 503)."""

    @wraps(fn)
    async def inner(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except VALKEY_ERRORS as e:
            raise Unavailable(f"Valkey unreachable: {e}") from e

    return inner


def connect_valkey(url: str) -> valkey_async.Valkey:
    """A pooled async client (lazy: the first command connects)."""
    return valkey_async.Valkey.from_url(
        url.replace("valkey://", "redis://", 1).replace("valkeys://", "rediss://", 1),
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
    )


async def ping(client: valkey_async.Valkey, url: str = "") -> None:
    try:
        await client.ping()
    except VALKEY_ERRORS as e:
        raise Unavailable(f"Valkey {url} unreachable: {e}") from e


class Claim(StrEnum):
    NEW = "new"  # first time: handle it
    IN_PROGRESS = "in_progress"  # another delivery is handling it right now (or crashed holding the lease)
    DONE = "done"  # handled already: acknowledge and skip


class SeenSet:
    """Per-scope set of handled event ids, with a lease while an event is being handled.

    claim() takes a lease (SET NX PX); commit() marks the id done for `ttl_seconds`; release() drops the
    lease after a failure so a redelivery can try again; refresh() extends the lease of a long handler.
    """

    PROCESSING = "processing"

    def __init__(self, client: valkey_async.Valkey, ttl_seconds: int, prefix: str = "fleet:seen") -> None:
        self.client = client
        self.ttl = ttl_seconds
        self.prefix = prefix

    def _key(self, scope: str, event_id: str) -> str:
        return f"{self.prefix}:{scope}:{event_id}"

    async def claim(self, scope: str, event_id: str, lease_seconds: float) -> Claim:
        key = self._key(scope, event_id)
        if await self.client.set(key, self.PROCESSING, nx=True, px=int(lease_seconds * 1000)):
            return Claim.NEW
        return Claim.DONE if await self.client.get(key) == "done" else Claim.IN_PROGRESS

    async def lease_left(self, scope: str, event_id: str) -> float:
        ms = await self.client.pttl(self._key(scope, event_id))
        return max(ms, 0) / 1000

    async def refresh(self, scope: str, event_id: str, lease_seconds: float) -> None:
        await self.client.pexpire(self._key(scope, event_id), int(lease_seconds * 1000), xx=True)

    async def commit(self, scope: str, event_id: str) -> None:
        await self.client.set(self._key(scope, event_id), "done", ex=self.ttl)

    async def release(self, scope: str, event_id: str) -> None:
        key = self._key(scope, event_id)
        if await self.client.get(key) == self.PROCESSING:
            await self.client.delete(key)
