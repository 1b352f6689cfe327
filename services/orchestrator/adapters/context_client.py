"""The orchestrator's ContextSource: the context service's GetContext over gRPC."""

from __future__ import annotations

import asyncio
import time

import grpc

from fleet.context.v1 import context_pb2, context_pb2_grpc
from services.common.auth import BearerToken, channel
from services.common.errors import Unavailable
from services.common.events import Role
from services.orchestrator.application import Context


class ContextClient:
    """GetContext with a deadline; any failure is one `Unavailable` naming the service, its address and the code.

    The context service learns a story from the same `planning.plan.approved` event that starts its deliberations,
    through its own consumer: NOT_FOUND is retried for up to `not_found_wait` seconds so that race is not lost.
    """

    def __init__(
        self, address: str, timeout: float = 5.0, not_found_wait: float = 5.0, token: BearerToken | None = None
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.not_found_wait = not_found_wait
        self._channel = channel(address, token)
        self._stub = context_pb2_grpc.ContextServiceStub(self._channel)

    async def get_context(self, story_id: str, role: Role, phase: str, token_budget: int) -> Context:
        request = context_pb2.GetContextRequest(
            story_id=story_id, role=str(role), phase=str(phase), token_budget=token_budget
        )
        deadline = time.monotonic() + self.not_found_wait
        delay = 0.1
        while True:
            try:
                reply = await self._stub.GetContext(request, timeout=self.timeout)
                return Context(text=reply.context, version=reply.version)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise Unavailable(f"context service {self.address}: {e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        await self._channel.close()
