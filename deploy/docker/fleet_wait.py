#!/usr/bin/env python3
"""Bounded wait for a dependency, used by the Kubernetes initContainers (installed as `fleet-wait` in the images).

    fleet-wait tcp HOST:PORT [--timeout S]   a TCP connect succeeds
    fleet-wait http URL [--timeout S]        GET answers 2xx (e.g. NATS /healthz?js-enabled-only=true)
    fleet-wait streams [--timeout S]         every JetStream stream of the event catalog exists (reads NATS_URL)

Exits 0 once the dependency answers, 1 when the timeout passes (the pod then fails visibly instead of hanging).
Standard library only, except `streams`, which uses the fleet package installed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def tcp_ok(address: str) -> Callable[[], str | None]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"fleet-wait: expected HOST:PORT, got {address!r}")

    def check() -> str | None:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
                return None
        except OSError as e:
            return f"{address}: {e}"

    return check


def http_ok(url: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return None if 200 <= resp.status < 300 else f"{url}: HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return f"{url}: HTTP {e.code}"
        except (OSError, ValueError) as e:
            return f"{url}: {e}"

    return check


def streams_ok() -> Callable[[], str | None]:
    from services.common import events
    from services.common.bus import connect_nats
    from services.common.settings import FleetSettings, load_settings

    settings = load_settings(FleetSettings)

    async def missing() -> list[str]:
        nc = await connect_nats(settings.nats_url, "fleet-wait")
        try:
            js = nc.jetstream()
            absent = []
            for name in events.STREAMS:
                try:
                    await js.stream_info(name)
                except Exception:  # NotFoundError, or JetStream not ready yet
                    absent.append(name)
            return absent
        finally:
            await nc.close()

    def check() -> str | None:
        try:
            absent = asyncio.run(missing())
        except Exception as e:
            return f"NATS: {e}"
        return f"streams missing: {', '.join(absent)} (the nats-init-streams Job creates them)" if absent else None

    return check


def wait(check: Callable[[], str | None], what: str, timeout: float, interval: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        problem = check()
        if problem is None:
            print(f"fleet-wait: {what} is ready", flush=True)
            return 0
        if time.monotonic() >= deadline:
            print(f"fleet-wait: gave up after {timeout:.0f} s: {problem}", file=sys.stderr, flush=True)
            return 1
        print(f"fleet-wait: waiting for {what}: {problem}", flush=True)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet-wait", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["tcp", "http", "streams"])
    parser.add_argument("target", nargs="?", default="", help="HOST:PORT for tcp, URL for http")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default 300)")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between attempts (default 3)")
    return parser


def make_check(kind: str, target: str) -> Callable[[], str | None]:
    if kind == "streams":
        return streams_ok()
    if not target:
        raise SystemExit(f"fleet-wait: {kind} needs a target")
    return tcp_ok(target) if kind == "tcp" else http_ok(target)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return wait(make_check(args.kind, args.target), args.target or "JetStream streams", args.timeout, args.interval)


if __name__ == "__main__":
    sys.exit(main())
