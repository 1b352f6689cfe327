"""The orchestrator as `fleet eval` uses it: `Deliberate` over gRPC, through the contract's one mapping
(services/deliberation/proto.py) both ways."""

from __future__ import annotations

import asyncio

import grpc

from fleet.orchestrator.v1 import orchestrator_pb2 as pb
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken, channel
from services.common.errors import Unavailable
from services.deliberation.domain import DeliberationResult, Task
from services.deliberation.proto import constraints_to_proto, result_from_proto
from services.eval.dataset import EvalError


class OrchestratorClient:
    """`deliberate(task)` -> the domain result; a failed call is `Unavailable` naming the address and the status."""

    def __init__(self, address: str, *, margin_seconds: float = 60.0, token: BearerToken | None = None) -> None:
        self.address = address
        self.margin_seconds = margin_seconds  # on top of the deliberation's own deadline
        self._channel = channel(address, token)
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    async def check(self, wait_seconds: float = 10.0) -> None:
        """The orchestrator answers and has a DEV council; EvalError saying what is wrong otherwise."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), wait_seconds)
            listed = await self._stub.ListCouncils(pb.ListCouncilsRequest(role_filter="DEV"), timeout=wait_seconds)
        except (TimeoutError, grpc.aio.AioRpcError) as e:
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else "no answer"
            raise EvalError(
                f"orchestrator at {self.address} not reachable within {wait_seconds:.0f} s ({why}): "
                "check --orchestrator / ORCHESTRATOR_ADDRESS, or start a fleet (`fleet up`)"
            ) from None
        if not listed.councils:
            raise EvalError(f"the orchestrator at {self.address} has no DEV council: run `fleet councils init`")

    async def deliberate(self, task: Task) -> DeliberationResult:
        request = pb.DeliberateRequest(
            task_id=task.task_id,
            task_description=task.description,
            role=str(task.role),
            constraints=constraints_to_proto(task.constraints),
            base_code=task.base_code,
        )
        try:
            reply = await self._stub.Deliberate(request, timeout=task.constraints.timeout_seconds + self.margin_seconds)
        except grpc.aio.AioRpcError as e:
            raise Unavailable(f"orchestrator at {self.address}: Deliberate: {e.code().name}: {e.details()}") from None
        return result_from_proto(reply.result)

    async def close(self) -> None:
        await self._channel.close()
