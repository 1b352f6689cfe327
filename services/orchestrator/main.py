"""Composition root of the orchestrator: settings -> adapters -> application -> gRPC server + consumer."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import auth
from services.common import events as ev
from services.common.bus import EventBus
from services.common.grpc_server import GrpcServer
from services.common.lifecycle import serve
from services.common.llm import VLLMClient
from services.common.logging import correlation_id
from services.common.sandbox import SandboxClient
from services.common.valkey import SeenSet, connect_valkey, ping
from services.deliberation.engine import DeliberationEngine, InProcessExecutor, ObservedExecutor
from services.deliberation.grounding import ProposalChecker
from services.orchestrator.adapters.context_client import ContextClient
from services.orchestrator.adapters.grpc_api import OrchestratorServicer
from services.orchestrator.adapters.ray_runner import RayExecutorRunner
from services.orchestrator.adapters.valkey import ValkeyMeter, ValkeyStore
from services.orchestrator.application import Orchestrator
from services.orchestrator.caps import Caps
from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("fleet.orchestrator")
SERVICE_NAME = "fleet.orchestrator.v1.OrchestratorService"
# Who may call what (services/common/auth.py); the audited methods start work or change the councils.
ROLES = {
    "Deliberate": auth.DELIBERATOR,
    "StreamDeliberation": auth.DELIBERATOR,
    "GetDeliberationResult": auth.VIEWER,
    "CreateCouncil": auth.ADMIN,
    "ListCouncils": auth.VIEWER,
    "DeleteCouncil": auth.ADMIN,
    "GetStatus": auth.VIEWER,
}
AUDITED = ("Deliberate", "StreamDeliberation", "CreateCouncil", "DeleteCouncil")


class InProcessRunner:
    """Runs the engine here, agent calls as asyncio tasks; every call is published as agent.* events."""

    name = "in-process"

    def __init__(self, llm: VLLMClient, bus: EventBus, checker: ProposalChecker) -> None:
        self.llm = llm
        self.bus = bus
        self.checker = checker

    async def run(self, task, council, architect, deliberation_id, on_progress):
        executor = ObservedExecutor(InProcessExecutor(self.llm), self._publish, executor_name=self.name)
        window = await self.llm.window()  # the served model's context window, learned once
        engine = DeliberationEngine(executor, on_progress=on_progress, checker=self.checker, window=window)
        return await engine.run(task, council, architect, deliberation_id)

    async def _publish(self, payload: ev.Payload) -> None:
        await self.bus.publish(ev.make_event(payload, ev.ORCHESTRATOR, correlation_id=correlation_id.get()))


@dataclass
class RunningOrchestrator:
    app: Orchestrator
    server: GrpcServer
    bus: EventBus
    llm: VLLMClient
    consumer: object
    valkey: object
    sandbox: SandboxClient | None = None
    stopped: bool = False

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving and close every connection (a second call does nothing)."""
        if self.stopped:
            return
        self.stopped = True
        await self.server.stop(grace)
        await self.bus.close()
        await self.llm.aclose()
        await self.valkey.aclose()  # type: ignore[attr-defined]
        if self.sandbox is not None:
            await self.sandbox.close()
        if self.app.context is not None:
            await self.app.context.close()  # type: ignore[attr-defined]


async def start(settings: OrchestratorSettings, *, host: str = "0.0.0.0") -> RunningOrchestrator:
    """Connect everything and start serving (GRPC_PORT 0 picks a free port: used by the tests)."""
    valkey = connect_valkey(settings.valkey_url)
    await ping(valkey, settings.valkey_url)
    bus = await EventBus.connect(settings, ev.ORCHESTRATOR, seen=SeenSet(valkey, settings.idempotency_ttl_seconds))
    llm = VLLMClient(
        settings.vllm_url,
        settings.vllm_model,
        timeout=settings.vllm_timeout_seconds,
        max_retries=settings.vllm_max_retries,
        context_window=settings.vllm_context_window,
    )

    async def publish(payload: ev.Payload, cid: str, actor: str, event_id: str) -> None:
        await bus.publish(ev.make_event(payload, ev.ORCHESTRATOR, correlation_id=cid, actor=actor, event_id=event_id))

    token = auth.BearerToken(settings.auth_token_file)
    context = ContextClient(settings.context_address, token=token) if settings.context_address else None
    sandbox = SandboxClient(settings.sandbox_address, token=token) if settings.sandbox_address else None
    checker = ProposalChecker(sandbox, timeout_seconds=settings.sandbox_timeout_seconds)
    app = Orchestrator(
        ValkeyStore(valkey),
        RayExecutorRunner(settings.ray_executor_address, bus, token=token)
        if settings.executor == "ray"
        else InProcessRunner(llm, bus, checker),
        publish,
        instance_id=f"{socket.gethostname()}:{os.getpid()}",
        context=context,
        context_token_budget=settings.context_token_budget,
        default_num_agents=settings.default_num_agents,
        meter=ValkeyMeter(valkey),
        # Authentication off: everyone is `anonymous` with every role; counted, never capped.
        caps_by_role={role: Caps(**c.model_dump()) for role, c in settings.spending_caps.items()}
        if settings.auth_issuer
        else {},
    )
    await app.recover()
    server = GrpcServer(
        [(orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server, OrchestratorServicer(app), SERVICE_NAME)],
        settings.grpc_port,
        host,
        guard=auth.service_guard(settings, SERVICE_NAME, ROLES, AUDITED),
    )
    await server.start()
    consumer = await bus.consume(
        ev.CONSUMERS["orchestrator-plan-approved"], app.on_plan_approved, concurrency=settings.approval_concurrency
    )
    return RunningOrchestrator(app, server, bus, llm, consumer, valkey, sandbox)


def run() -> None:
    def ready(settings: OrchestratorSettings, running: RunningOrchestrator) -> str:
        sandbox = settings.sandbox_address or "none: proposals' code is not executed, nothing is verified"
        return (
            f"orchestrator ready on :{running.port} (executor {running.app.runner.name}, vLLM {settings.vllm_url}, "
            f"context {settings.context_address or 'none'}, sandbox {sandbox})"
        )

    serve("orchestrator", OrchestratorSettings, start, ready)
