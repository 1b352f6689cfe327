"""Composition root of the ray-executor: settings -> Ray + NATS -> application -> gRPC server.

`fleet serve ray-executor` calls `run()`. Tests and the benchmark use `start(settings)` (GRPC_PORT 0 picks a free
port) and `await running.stop()`. RAY_ADDRESS names the cluster (KubeRay's head service, a loopback head);
empty starts a local Ray in this process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fleet.ray_executor.v1 import ray_executor_pb2_grpc
from services.common import auth
from services.common import events as ev
from services.common.bus import EventBus
from services.common.errors import Unavailable
from services.common.grpc_server import GrpcServer
from services.common.lifecycle import serve
from services.common.llm import VLLMClient
from services.common.sandbox import SandboxClient
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import ContextWindow
from services.ray_executor.adapters.grpc_api import RayExecutorServicer
from services.ray_executor.application import DeliberationRequest, RayExecutorService
from services.ray_executor.executor import AgentPool, CallSpec, RayConnection, RayExecutor, connect_ray
from services.ray_executor.settings import RayExecutorSettings

log = logging.getLogger("fleet.ray_executor")
SERVICE_NAME = "fleet.ray_executor.v1.RayExecutorService"
# Who may call what (services/common/auth.py): deliberations are started by the orchestrator only.
ROLES = {
    "ExecuteDeliberation": auth.SERVICE,
    "GetDeliberationStatus": auth.VIEWER,
    "GetStatus": auth.VIEWER,
    "GetActiveJobs": auth.VIEWER,
}
AUDITED = ("ExecuteDeliberation",)


def executor_factory(settings: RayExecutorSettings, pool: AgentPool):
    """Per deliberation: a RayExecutor on the pool, calling the request's vLLM (or the default) until `deadline`."""

    def make(request: DeliberationRequest, deadline: float) -> RayExecutor:
        spec = CallSpec(
            vllm_url=request.vllm_url or settings.vllm_url,
            model=request.model or settings.vllm_model,
            llm_timeout=settings.vllm_timeout_seconds,
            llm_max_retries=settings.vllm_max_retries,
            call_timeout=settings.agent_timeout_seconds,
            deadline=deadline,
            nats_url=settings.nats_url if settings.token_streaming else "",
            token_batch_seconds=settings.token_batch_ms / 1000,
            correlation_id=request.correlation_id or request.deliberation_id,
        )
        return RayExecutor(pool, spec)

    return make


def model_windows(settings: RayExecutorSettings):
    """Per deliberation: the context window of the vLLM and model it calls (VLLM_CONTEXT_WINDOW for the default
    ones when set, else what the server reports), learned once per (url, model); an unreachable server is asked
    again next time (its deliberation's calls fail on their own)."""
    known: dict[tuple[str, str], ContextWindow | None] = {}

    async def window(request: DeliberationRequest) -> ContextWindow | None:
        url, model = request.vllm_url or settings.vllm_url, request.model or settings.vllm_model
        if (url, model) in known:
            return known[(url, model)]
        default = (url, model) == (settings.vllm_url, settings.vllm_model)
        async with VLLMClient(
            url,
            model,
            timeout=min(settings.vllm_timeout_seconds, 5.0),
            max_retries=0,
            context_window=settings.vllm_context_window if default else 0,
        ) as client:
            found = await client.window()
            if found is not None or client.asked_window:
                known[(url, model)] = found
        return found

    return window


@dataclass
class RunningRayExecutor:
    app: RayExecutorService
    server: GrpcServer
    bus: EventBus
    ray: RayConnection
    pool: AgentPool

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, finish in-flight RPCs, end running deliberations (FAILED), release Ray and NATS."""
        await self.server.stop(grace)
        await self.app.close()
        await self.bus.close()
        self.pool.shutdown()
        await asyncio.to_thread(self.ray.shutdown)


async def start(settings: RayExecutorSettings, *, host: str = "0.0.0.0") -> RunningRayExecutor:
    """Connect NATS and Ray, then serve. Ray's connect takes seconds (a local start ~5 s): done in a thread."""
    bus = await EventBus.connect(settings, ev.RAY_EXECUTOR)
    ray: RayConnection | None = None
    pool: AgentPool | None = None
    try:
        async with asyncio.timeout(settings.ray_start_timeout_seconds):
            ray = await asyncio.to_thread(
                connect_ray,
                settings.ray_address,
                namespace=settings.ray_namespace,
                local_num_cpus=settings.ray_local_num_cpus,
                log_to_driver=settings.ray_log_to_driver,
            )
            pool = AgentPool(
                settings.ray_agent_workers,
                num_cpus=settings.ray_num_cpus_per_worker,
                max_concurrency=settings.ray_calls_per_worker,
                max_retries=settings.ray_max_retries,
            )
            await pool.ready()

        async def publish(payload: ev.Payload, cid: str) -> None:
            await bus.publish(ev.make_event(payload, ev.RAY_EXECUTOR, correlation_id=cid))

        token = auth.BearerToken(settings.auth_token_file)
        sandbox = SandboxClient(settings.sandbox_address, token=token) if settings.sandbox_address else None
        app = RayExecutorService(
            executor_factory(settings, pool),
            publish,
            checker=ProposalChecker(sandbox, timeout_seconds=settings.sandbox_timeout_seconds),
            windows=model_windows(settings),
            ray_address=ray.address,
            max_active=settings.max_active_deliberations,
            keep_finished=settings.finished_jobs_kept,
        )
        server = GrpcServer(
            [(ray_executor_pb2_grpc.add_RayExecutorServiceServicer_to_server, RayExecutorServicer(app), SERVICE_NAME)],
            settings.grpc_port,
            host,
            guard=auth.service_guard(settings, SERVICE_NAME, ROLES, AUDITED),
        )
        await server.start()
    except BaseException as e:
        await bus.close()
        if pool is not None:
            pool.shutdown()
        if ray is not None:
            await asyncio.to_thread(ray.shutdown)
        if isinstance(e, TimeoutError):
            where = settings.ray_address or "a local Ray"
            raise Unavailable(
                f"Ray at {where}: not connected with {settings.ray_agent_workers} agent workers running within "
                f"{settings.ray_start_timeout_seconds:g}s (too few CPUs for "
                f"{settings.ray_agent_workers} x {settings.ray_num_cpus_per_worker}?)"
            ) from e
        raise
    return RunningRayExecutor(app, server, bus, ray, pool)


def run() -> None:
    def ready(settings: RayExecutorSettings, running: RunningRayExecutor) -> str:
        sandbox = settings.sandbox_address or "none: proposals' code is not executed, nothing is verified"
        return (
            f"ray-executor ready on :{running.port} (Ray {running.ray.address}, {settings.ray_agent_workers} agent "
            f"workers x {settings.ray_num_cpus_per_worker:g} CPU, vLLM {settings.vllm_url}, sandbox {sandbox})"
        )

    serve("ray-executor", RayExecutorSettings, start, ready)
