"""How every gRPC service's process runs (each composition root's `run`, which `fleet serve <service>` calls):
settings from the environment (a bad variable is named, exit 2), logs, /metrics, start, serve until SIGINT or
SIGTERM, then stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from services.common.logging import configure_logging
from services.common.metrics import start_metrics_server
from services.common.settings import ServiceSettings, load_settings

log = logging.getLogger("fleet.service")

S = TypeVar("S", bound=ServiceSettings)


class Running(Protocol):
    async def stop(self, grace: float = ...) -> None: ...


def serve(
    name: str,
    settings_class: type[S],
    start: Callable[[S], Awaitable[Running]],
    ready: Callable[[S, Any], str],
    *,
    before_serving: Callable[[], None] | None = None,
) -> None:
    """Run the service `name` until a signal: `start(settings)` gives what `stop()`s it, `ready(settings, running)`
    the line logged once it serves; `before_serving` tunes the process after start-up (e.g. the GC)."""
    settings = load_settings(settings_class)
    configure_logging(name, settings.log_level, settings.log_format)
    start_metrics_server(settings.metrics_port)

    async def main() -> None:
        running = await start(settings)
        if before_serving is not None:
            before_serving()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("%s", ready(settings, running))
        await stop.wait()
        log.info("shutting down")
        with contextlib.suppress(Exception):
            await running.stop()

    asyncio.run(main())
