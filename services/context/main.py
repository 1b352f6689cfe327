"""Composition root of the context service: settings -> adapters -> application -> gRPC server + consumers.

`fleet serve context` calls `run()`. Tests and the benchmark use `start(settings)` (GRPC_PORT 0 picks a free port)
and `await running.stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from dataclasses import dataclass, field

import valkey.asyncio as valkey_async
from nats.js.errors import NotFoundError

from fleet.context.v1 import context_pb2_grpc
from services.common import auth
from services.common import events as ev
from services.common.bus import Consumer, EventBus
from services.common.errors import FleetError, Unavailable
from services.common.grpc_server import GrpcServer
from services.common.lifecycle import serve
from services.common.valkey import SeenSet, connect_valkey, ping
from services.context.adapters.graph import GraphStore
from services.context.adapters.grpc_api import ContextServicer
from services.context.adapters.tokenizer import make_counter
from services.context.adapters.valkey import ContextState
from services.context.application import ContextService
from services.context.rendering import Budget, TokenCounter
from services.context.settings import ContextSettings

log = logging.getLogger("fleet.context")
SERVICE_NAME = "fleet.context.v1.ContextService"
# Who may call what (services/common/auth.py): only the fleet's services write context.
ROLES = {
    "GetContext": auth.VIEWER,
    "UpdateContext": auth.SERVICE,
    "RehydrateSession": auth.VIEWER,
    "ValidateScope": auth.VIEWER,
}
AUDITED = ("UpdateContext",)


@dataclass
class RunningContext:
    app: ContextService
    server: GrpcServer
    bus: EventBus
    graph: GraphStore
    valkey: valkey_async.Valkey
    consumers: list[Consumer] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, finish in-flight RPCs and event handlers, then close every connection."""
        await self.server.stop(grace)
        for c in self.consumers:  # all at once: each ends after its current fetch (<= 1 s) and handlers
            c.stopping.set()
        await self.bus.close()
        await self.graph.close()
        await self.valkey.aclose()


def build(
    settings: ContextSettings, valkey: valkey_async.Valkey, bus: EventBus, counter: TokenCounter
) -> tuple[ContextService, GraphStore]:
    """The application over its adapters (no network I/O yet: the graph connects on first use)."""
    graph = GraphStore(
        settings.neo4j_uri,
        settings.neo4j_user,
        settings.neo4j_password.get_secret_value(),
        settings.neo4j_database,
        settings.graph_backend,
        connect_timeout=settings.graph_connect_timeout_seconds,
        query_timeout=settings.graph_query_timeout_seconds,
    )

    async def publish(payload: ev.Payload, correlation_id: str, event_id: str) -> None:
        await bus.publish(ev.make_event(payload, ev.CONTEXT, correlation_id=correlation_id, event_id=event_id))

    app = ContextService(
        graph,
        ContextState(valkey, settings.context_cache_ttl_seconds),
        publish,
        counter,
        Budget(
            settings.context_default_token_budget, settings.context_min_token_budget, settings.context_max_token_budget
        ),
    )
    return app, graph


async def start(settings: ContextSettings, *, host: str = "0.0.0.0", consume: bool = True) -> RunningContext:
    """Connect, start the gRPC server and (with `consume`) the event consumers.

    Valkey and NATS must be reachable; the graph may be down (requests then answer UNAVAILABLE, events are
    retried) and is connected on first use.
    """
    valkey = connect_valkey(settings.valkey_url)
    await ping(valkey, settings.valkey_url)
    bus = await EventBus.connect(settings, ev.CONTEXT, seen=SeenSet(valkey, settings.idempotency_ttl_seconds))
    graph: GraphStore | None = None
    server: GrpcServer | None = None
    try:
        counter = await asyncio.to_thread(make_counter, settings.tokenizer)  # ~0.5 s the first time
        app, graph = build(settings, valkey, bus, counter)
        with contextlib.suppress(FleetError):
            await graph.ensure_ready()
        server = GrpcServer(
            [(context_pb2_grpc.add_ContextServiceServicer_to_server, ContextServicer(app), SERVICE_NAME)],
            settings.grpc_port,
            host,
            guard=auth.service_guard(settings, SERVICE_NAME, ROLES, AUDITED),
        )
        await server.start()
        consumers = []
        if consume:
            try:
                consumers.append(await bus.consume(ev.CONSUMERS["context-plan-approved"], app.on_plan_approved))
                consumers.append(
                    await bus.consume(ev.CONSUMERS["context-deliberation-completed"], app.on_deliberation_completed)
                )
            except NotFoundError as e:
                raise Unavailable(f"JetStream streams are missing ({e}): run `fleet streams init` first") from e
        return RunningContext(app, server, bus, graph, valkey, consumers)
    except BaseException:
        if server is not None:
            await server.stop(0)
        await bus.close()
        if graph is not None:
            await graph.close()
        await valkey.aclose()
        raise


def _tune_gc() -> None:
    """A rebuild allocates ~10^5 short-lived objects: collect the young generation less often, and keep the
    long-lived startup objects (modules, tokenizer ranks) out of full collections. Cuts the p99 of cold builds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run() -> None:
    def ready(settings: ContextSettings, running: RunningContext) -> str:
        return (
            f"context service ready on :{running.port} (graph {settings.neo4j_uri}, "
            f"tokenizer {running.app.counter.name})"
        )

    serve("context", ContextSettings, start, ready, before_serving=_tune_gc)
