"""The orchestrator's gRPC API as the dashboard reads it: councils, deliberation results, status.

Nothing is mirrored by hand. A deliberation result comes back as the domain's `DeliberationResult`, through the
contract's one mapping (services/deliberation/proto.py), and the API serves it with the domain's own serialisation.
Councils and status, which have no domain result type, are protobuf's JSON mapping of the reply (`json_format`),
validated by pydantic models generated from the proto descriptors themselves (`message_model`): every field the
orchestrator sends is served and documented, and a mismatch fails loudly instead of dropping a field.

The client remembers whether the orchestrator answered last time (the page's banner) and fails fast while it is
down: short deadlines and a short reconnect backoff, so the page recovers within seconds of the orchestrator's
return.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from datetime import UTC, datetime
from typing import Any, Literal

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from fleet.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from services.common import auth
from services.common.errors import FleetError, InvalidArgument, NotFound, Unavailable
from services.deliberation.domain import DeliberationResult
from services.deliberation.proto import result_from_proto

log = logging.getLogger("fleet.monitoring.orchestrator")

# Codes meaning "the orchestrator cannot answer now" (as opposed to "it answered: no").
DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class OrchestratorUnavailable(Unavailable):
    dependency = "orchestrator"


# --- protobuf's JSON mapping, and its pydantic models generated from the descriptors ------------------------------

_SCALARS: dict[int, type] = {
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BYTES: str,  # base64 in protobuf's JSON mapping
    **dict.fromkeys(
        (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_FIXED64,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_SFIXED64,
        ),
        int,
    ),
}


def to_json(message: Message) -> dict[str, Any]:
    """protobuf's JSON mapping of `message`: proto field names, every field printed (defaults too), int64 as numbers
    where they fit, enums by name."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _value_type(field: FieldDescriptor) -> Any:
    if field.message_type is not None:
        if field.message_type.full_name.startswith("google.protobuf."):  # their JSON is not their fields
            raise TypeError(f"{field.full_name}: well-known type {field.message_type.full_name} is not supported")
        return message_model(field.message_type)
    if field.enum_type is not None:
        return Literal[tuple(v.name for v in field.enum_type.values)]
    return _SCALARS[field.type]


@functools.cache
def message_model(descriptor: Descriptor) -> type[BaseModel]:
    """The pydantic model of `to_json`'s output for messages of `descriptor`, field for field: maps become
    `dict[str, V]`, repeated fields lists, fields with presence (messages, `optional`) `T | None` (absent when
    unset); every other field is always there. Unknown fields are refused."""
    fields: dict[str, Any] = {}
    for f in descriptor.fields:
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            fields[f.name] = (dict[str, _value_type(entry.fields_by_name["value"])], ...)  # type: ignore[misc]
        elif f.is_repeated:
            fields[f.name] = (list[_value_type(f)], ...)  # type: ignore[misc]
        elif f.has_presence:
            fields[f.name] = (_value_type(f) | None, None)
        else:
            fields[f.name] = (_value_type(f), ...)
    return create_model(descriptor.name, __config__=ConfigDict(extra="forbid"), **fields)


Councils = message_model(orchestrator_pb2.ListCouncilsResponse.DESCRIPTOR)
OrchestratorStatus = message_model(orchestrator_pb2.GetStatusResponse.DESCRIPTOR)


# --- the client ---------------------------------------------------------------------------------------------------


class OrchestratorClient:
    def __init__(self, address: str, timeout: float, token: auth.BearerToken | None = None) -> None:
        self.token = token
        self.address = address
        self.timeout = timeout
        self.ok = False
        self.detail = "not contacted yet" if address else "not configured (ORCHESTRATOR_ADDRESS is empty)"
        self.since = datetime.now(UTC)
        self._channel: grpc.aio.Channel | None = None
        self._stub: orchestrator_pb2_grpc.OrchestratorServiceStub | None = None

    def _connect(self) -> orchestrator_pb2_grpc.OrchestratorServiceStub | None:
        """The stub, its channel made on first use: a grpc.aio channel belongs to the loop it was made in."""
        if self._stub is None and self.address:
            self._channel = auth.channel(
                self.address,
                self.token,
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 300),
                    ("grpc.min_reconnect_backoff_ms", 300),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ],
            )
            self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        return self._stub

    def _mark(self, ok: bool, detail: str) -> None:
        if ok != self.ok:
            self.since = datetime.now(UTC)
            log.log(logging.INFO if ok else logging.WARNING, "orchestrator at %s: %s", self.address, detail)
        self.ok, self.detail = ok, detail

    def unavailable_message(self) -> str:
        if not self.address:
            return f"orchestrator {self.detail}"
        return f"orchestrator unavailable at {self.address}: {self.detail}"

    async def _call(self, method: str, request: Message) -> Any:
        """The reply of `method`, or: OrchestratorUnavailable while it is down (503), NotFound (404),
        InvalidArgument (422), FleetError for any other error it answers with (502)."""
        stub = self._connect()
        if stub is None:
            raise OrchestratorUnavailable(self.unavailable_message())
        try:
            response = await getattr(stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            if code in DOWN:
                self._mark(False, f"{code.name} {details}".strip())
                raise OrchestratorUnavailable(self.unavailable_message()) from None
            self._mark(True, "serving")
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(details or "not found") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("request", details) from None
            raise FleetError(f"orchestrator {method} failed: {code.name} {details}".strip()) from None
        self._mark(True, "serving")
        return response

    async def councils(self, role: str = "") -> BaseModel:
        """ListCouncils with the agents (a `Councils`)."""
        req = orchestrator_pb2.ListCouncilsRequest(role_filter=role, include_agents=True)
        return Councils.model_validate(to_json(await self._call("ListCouncils", req)))

    async def deliberation(self, task_id: str) -> DeliberationResult:
        """GetDeliberationResult as the domain's result; FleetError (502) when the reply is not a valid result."""
        reply = await self._call(
            "GetDeliberationResult", orchestrator_pb2.GetDeliberationResultRequest(task_id=task_id)
        )
        try:
            return result_from_proto(reply.result)
        except ValidationError as e:
            raise FleetError(f"orchestrator GetDeliberationResult answered an invalid result: {e}") from None

    async def status(self) -> BaseModel:
        """GetStatus with the statistics (an `OrchestratorStatus`)."""
        resp = await self._call("GetStatus", orchestrator_pb2.GetStatusRequest(include_stats=True))
        return OrchestratorStatus.model_validate(to_json(resp))

    async def poll(self, interval: float) -> None:
        """Probe the orchestrator forever, so the page's banner knows without anyone asking."""
        while True:
            try:
                await self.status()
            except FleetError:
                pass  # recorded by _call: the banner shows it
            except Exception as e:  # a bug, not the orchestrator: say so, keep probing
                self._mark(False, f"probe failed: {type(e).__name__} {e}")
                log.exception("orchestrator probe failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
