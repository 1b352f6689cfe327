"""The sandbox's gRPC API: `Execute`, through the one proto <-> domain mapping (services.common.sandbox).

Validation is the domain's (`Execution.validate`, in the use case); its `InvalidArgument` names the field and the
common interceptor answers INVALID_ARGUMENT with it, as it answers RESOURCE_EXHAUSTED when the queue is full.
"""

from __future__ import annotations

import grpc

from fleet.sandbox.v1 import sandbox_pb2 as pb
from fleet.sandbox.v1 import sandbox_pb2_grpc
from services.common.sandbox import execution_from_proto, result_to_proto
from services.sandbox.application import SandboxService


class SandboxServicer(sandbox_pb2_grpc.SandboxServicer):
    def __init__(self, app: SandboxService) -> None:
        self.app = app

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.ExecuteResponse:
        return result_to_proto(await self.app.execute(execution_from_proto(request)))
