"""Composition root of the sandbox: settings -> runner (proved by a start-up probe) -> application -> gRPC server.

`fleet serve sandbox` calls `run()`; tests and the benchmark use `start(settings)` and `await running.stop()`.

At start the service runs a passing pytest test in the sandbox with each candidate interpreter (SANDBOX_PYTHON,
else this service's own interpreter, /usr/local/bin/python3, /usr/bin/python3) and keeps the first that passes.
None passing, or bwrap missing, is a start-up error naming the fix: the service never runs code with less
isolation than it was configured for.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

from fleet.sandbox.v1 import sandbox_pb2_grpc
from services.common import auth
from services.common.errors import FailedPrecondition
from services.common.grpc_server import GrpcServer
from services.common.lifecycle import serve
from services.common.sandbox import SERVICE_NAME
from services.sandbox.adapters.bwrap import INSIDE, SandboxRunner, find_bwrap
from services.sandbox.adapters.grpc_api import SandboxServicer
from services.sandbox.application import PROBE, SandboxService
from services.sandbox.domain import Limits, trim
from services.sandbox.settings import SandboxSettings

log = logging.getLogger("fleet.sandbox")

_PR_SET_DUMPABLE = 4

# Who may call (services/common/auth.py): the fleet's services (and admins) only. Executions are many and are
# logged by the service itself, so they are not audited one by one.
ROLES = {"Execute": auth.SERVICE}


def python_candidates(configured: str) -> list[str]:
    """Interpreters to probe, resolved (a venv's python resolves to its base: no venv packages inside)."""
    found: list[str] = []
    for candidate in [configured] if configured else [sys.executable, "/usr/local/bin/python3", "/usr/bin/python3"]:
        path = os.path.realpath(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK) and path not in found:
            found.append(path)
    return found


def _not_dumpable() -> None:
    """Processes of this service's uid can no longer read its /proc/<pid>/environ or ptrace it (pod isolation
    without a uid of its own: the executions run as this uid)."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


async def choose_runner(settings: SandboxSettings) -> SandboxRunner:
    bwrap = find_bwrap() if settings.sandbox_isolation == "bwrap" else ""
    uid_base = settings.sandbox_uid_base if os.geteuid() == 0 else None
    if not bwrap and uid_base is None:
        _not_dumpable()
    candidates = python_candidates(settings.sandbox_python)
    if not candidates:
        raise FailedPrecondition(f"SANDBOX_PYTHON={settings.sandbox_python} is not an executable file")
    tried = []
    for python in candidates:
        runner = SandboxRunner(python, bwrap=bwrap, uid_base=uid_base)
        result = await SandboxService(runner, concurrency=1, queue=0).execute(PROBE)
        if result.passed:
            return runner
        await runner.close()
        why = f"{result.outcome.value}: {result.reason}"
        stderr = trim("\n".join(result.stderr.strip().splitlines()[-3:]), 400)
        tried.append(f"  {python}: {why}" + (f"\n    {stderr}" if stderr else ""))
        log.info("%s does not run pytest in the %s sandbox: %s", python, runner.isolation, why)
    who = f"uid {uid_base}" if uid_base is not None else "this service's uid"
    where = f"{runner.site['pytest'].parent} (pytest), {INSIDE}" + ("" if bwrap else ", TMPDIR")
    fixes = (
        f"the executions run as {who}, which must be able to read the interpreter (set SANDBOX_PYTHON to another, "
        f"e.g. /usr/bin/python3) and {where}"
    )
    if bwrap:
        fixes += (
            "; if bwrap itself fails above, it cannot create namespaces here: install bubblewrap "
            "(apt-get install bubblewrap) on a host with user namespaces, or, in a Kubernetes pod, set "
            "SANDBOX_ISOLATION=pod to make the pod the boundary"
        )
    raise FailedPrecondition(
        f"no interpreter runs a passing pytest test in the {'bwrap' if bwrap else 'pod'} sandbox:\n"
        + "\n".join(tried)
        + f"\n{fixes}"
    )


@dataclass
class RunningSandbox:
    app: SandboxService
    server: GrpcServer
    runner: SandboxRunner

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, let running executions finish within `grace` (then they are killed), clean up."""
        await self.server.stop(grace)
        await self.runner.close()


async def start(settings: SandboxSettings, *, host: str = "0.0.0.0") -> RunningSandbox:
    runner = await choose_runner(settings)
    try:
        app = SandboxService(
            runner,
            concurrency=settings.sandbox_concurrency,
            queue=settings.sandbox_queue,
            max_timeout_seconds=settings.sandbox_max_timeout_seconds,
            max_memory_mb=settings.sandbox_max_memory_mb,
        )
        server = GrpcServer(
            [(sandbox_pb2_grpc.add_SandboxServicer_to_server, SandboxServicer(app), SERVICE_NAME)],
            settings.grpc_port,
            host,
            guard=auth.service_guard(settings, SERVICE_NAME, ROLES),
        )
        await server.start()
    except BaseException:
        await runner.close()
        raise
    # A process per slot waits, pytest imported, under the largest limits a request may ask for.
    runner.warm(
        Limits.at(settings.sandbox_max_timeout_seconds, settings.sandbox_max_memory_mb), settings.sandbox_concurrency
    )
    if runner.isolation == "bwrap":
        log.warning("ISOLATION bwrap: executions run in bubblewrap namespaces, interpreter %s", runner.python)
    else:
        log.warning(
            "ISOLATION pod: executions run WITHOUT bwrap (rlimits, a private work dir); the pod must be the "
            "boundary (no token, no egress, read-only root). Interpreter %s",
            runner.python,
        )
    return RunningSandbox(app, server, runner)


def run() -> None:
    def ready(settings: SandboxSettings, running: RunningSandbox) -> str:
        return (
            f"sandbox ready on :{running.port} ({running.runner.isolation}, {settings.sandbox_concurrency} slots, "
            f"queue {settings.sandbox_queue})"
        )

    serve("sandbox", SandboxSettings, start, ready)
