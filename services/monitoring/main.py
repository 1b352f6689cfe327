"""Composition root of the monitoring service: settings -> app (feed + orchestrator client) -> uvicorn.

`fleet serve monitoring` calls run(). Tests start it in their own event loop with start(), on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from services.common.logging import configure_logging
from services.common.settings import load_settings
from services.monitoring.app import Monitoring, create_app
from services.monitoring.feed import redact_url
from services.monitoring.settings import MonitoringSettings

log = logging.getLogger("fleet.monitoring")


@dataclass
class RunningMonitoring:
    app: FastAPI
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def monitoring(self) -> Monitoring:
        return self.app.state.monitoring

    async def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def start(settings: MonitoringSettings, *, host: str = "127.0.0.1", port: int | None = None) -> RunningMonitoring:
    """Serve in the running event loop; port 0 (or MONITORING_PORT=0) takes a free one. Returns once listening."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say TCP (accepted ones inherit it);
    # without it every keep-alive response waits ~40 ms for the peer's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, settings.monitoring_port if port is None else port))
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="monitoring-http")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise RuntimeError("the monitoring server stopped while starting")
        await asyncio.sleep(0.01)
    return RunningMonitoring(app, server, task, host, sock.getsockname()[1])


def run() -> None:
    settings = load_settings(MonitoringSettings)
    configure_logging("monitoring", settings.log_level, settings.log_format)
    log.info(
        "monitoring on :%d (NATS %s, orchestrator %s)",
        settings.monitoring_port,
        redact_url(settings.nats_url),
        settings.orchestrator_address or "not configured",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.monitoring_host,
        port=settings.monitoring_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
