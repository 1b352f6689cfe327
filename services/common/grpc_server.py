"""gRPC server bootstrap: health (grpc.health.v1), reflection, who may call what, error mapping, graceful shutdown.

Every method of a served service needs a role (services/common/auth.py's Guard; a method without one is refused at
start); the caller's `authorization: Bearer <token>` metadata is checked before the handler runs. Health and
reflection stay open for probes.

Known failures (services.common.errors.FleetError) become their status code with details
(google.rpc.BadRequest naming the field for INVALID_ARGUMENT, google.rpc.ErrorInfo otherwise).
Anything else is logged with its traceback and answered INTERNAL with the correlation id to look for.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import Guard, Principal
from services.common.errors import FleetError, InvalidArgument
from services.common.logging import correlation_id
from services.common.metrics import GRPC_LATENCY, GRPC_REQUESTS

log = logging.getLogger("fleet.grpc")

ERROR_DOMAIN = "swe-ai-fleet"
CORRELATION_HEADER = "x-correlation-id"


def status_details(err: FleetError) -> status_pb2.Status:
    detail = any_pb2.Any()
    if isinstance(err, InvalidArgument):
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.description)
                ]
            )
        )
    else:
        detail.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata))
    return status_pb2.Status(code=grpc.StatusCode[err.code].value[0], message=err.message, details=[detail])


async def _abort(context: grpc.aio.ServicerContext, err: FleetError) -> None:
    status = status_details(err)
    await context.abort(
        grpc.StatusCode[err.code],
        err.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


def _start(context: grpc.aio.ServicerContext) -> None:
    md = dict(context.invocation_metadata() or ())
    correlation_id.set(str(md.get(CORRELATION_HEADER) or uuid.uuid4().hex[:16]))


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def _fail(method: str, e: Exception) -> FleetError:
    log.exception("unexpected error in %s", method)
    return FleetError(f"internal error in {method}: {type(e).__name__}: {e} (correlation id {correlation_id.get()})")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Admits the caller (the guard), maps known failures to their status, counts and times every call."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> Principal | None:
        if method not in self.guard.roles:  # health and reflection
            return None
        md = dict(context.invocation_metadata() or ())
        return await self.guard.admit(method, md.get("authorization"))

    def _done(self, method: str, principal: Principal | None, context: grpc.aio.ServicerContext) -> None:
        if principal is not None:
            self.guard.done(method, principal, _code_of(context))

    @contextlib.asynccontextmanager
    async def _serving(self, method: str, context: grpc.aio.ServicerContext, timed: bool) -> AsyncIterator[None]:
        """Around one call: the caller admitted first, known failures as their status, anything else INTERNAL with
        the correlation id; counted (and timed, for unary calls) and audited however it ends."""
        _start(context)
        t0 = time.perf_counter()
        principal = None
        try:
            principal = await self._admit(method, context)
            yield
        except FleetError as e:
            await _abort(context, e)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as e:
            await _abort(context, _fail(method, e))
        finally:
            if timed:
                GRPC_LATENCY.labels(method).observe(time.perf_counter() - t0)
            GRPC_REQUESTS.labels(method, _code_of(context)).inc()
            self._done(method, principal, context)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._serving(method, context, timed=True):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._serving(method, context, timed=False):
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def method_names(service: str) -> list[str]:
    """The full names (`/pkg.Service/Method`) of a service's methods, from its descriptor."""
    descriptor = descriptor_pool.Default().FindServiceByName(service)
    return [f"/{service}/{m.name}" for m in descriptor.methods]


class GrpcServer:
    """One aio server with health + reflection; `services` are (add_XServicer_to_server, servicer, full_name);
    `guard` says which role each of their methods needs (all of them: a method without a role fails the start)."""

    def __init__(
        self,
        services: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
        port: int,
        host: str = "0.0.0.0",
        *,
        guard: Guard,
    ) -> None:
        services = list(services)
        unguarded = [m for _, _, name in services for m in method_names(name) if m not in guard.roles]
        if unguarded:
            raise ValueError(f"no role says who may call {', '.join(unguarded)}")
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor(guard)],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 << 20)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.names: list[str] = []
        for add, servicer, name in services:
            add(servicer, self.server)
            self.names.append(name)
        reflection.enable_server_reflection([*self.names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)
        log.info("gRPC listening on :%d (%s)", self.port, ", ".join(self.names))

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        """Report NOT_SERVING, then let in-flight RPCs finish within `grace` seconds."""
        await self.set_serving(False)
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
