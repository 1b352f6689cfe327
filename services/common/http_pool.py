"""An httpx transport for hundreds of concurrent requests to one server: several small connection pools.

httpcore's connection pool re-examines every connection it holds whenever a request starts or ends, and for each
idle one counts the idle ones again (and polls its socket): the work per request grows with the square of the
pool's size. With ~300 agent calls in flight to one vLLM (issue 15: 100 concurrent deliberations) that scan was
the orchestrator's largest CPU cost (bench/bench_scale.py, profiled: ~40% of the process's time). Here a request
goes to the least busy of `shards` pools of `per_shard` connections each, so a scan covers `per_shard`
connections; every pool keeps all its connections alive (no connect/close churn between calls of a burst).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx


class _Released(httpx.AsyncByteStream):
    """A response body that tells its pool's counter once when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """`shards` independent httpx transports of `per_shard` kept-alive connections; each request on the one with the
    fewest requests in hand (a request is in hand until its response body is closed)."""

    def __init__(self, shards: int = 16, per_shard: int = 32, keepalive_expiry: float = 5.0) -> None:
        limits = httpx.Limits(
            max_connections=per_shard, max_keepalive_connections=per_shard, keepalive_expiry=keepalive_expiry
        )
        self.pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(max(1, shards))]
        self.in_hand = [0] * len(self.pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = self.in_hand.index(min(self.in_hand))
        self.in_hand[i] += 1
        try:
            response = await self.pools[i].handle_async_request(request)
        except BaseException:
            self.in_hand[i] -= 1
            raise

        def release() -> None:
            self.in_hand[i] -= 1

        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, release)
        return response

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()
