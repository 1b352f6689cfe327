"""The whole fleet as local processes on loopback: `fleet up`, `fleet down`, `fleet demo`.

NATS, Valkey, FalkorDB (Bolt) and a Ray head start in parallel with the vLLM server (the slowest, ~40 s on an idle
2-core machine, minutes on a busy one); then, while vLLM still loads (its port is chosen up front, and no service
calls it before a deliberation), the streams are provisioned and the services start in dependency order, each as
`fleet serve <service>` (the command the container images run) on free ports:

    sandbox  ->  context (graph)  ->  ray-executor (Ray, vLLM, sandbox)
             ->  orchestrator (context, ray-executor, sandbox)  ->  monitoring

then the councils are created with `fleet councils init` (the command the Kubernetes init Job runs). `start()`
returns once vLLM answers too.

Every call is authenticated: a local token issuer (services/local/issuer.py: a signing key in `<base>/auth/`, OIDC
discovery and JWKS on loopback) is AUTH_ISSUER for every service; each service calling others gets its own token
(`<base>/auth/<service>.token`, role `service`) and the local user one with every role (`<base>/auth/user.token`,
what the CLI sends when FLEET_TOKEN is unset). Logs go to
one folder (`<base>/logs/<component>.log`), the process records to `<base>/state.json` (for `fleet down` and
`stop_from_state`), the chosen endpoints to `<base>/endpoints.json`. Everything is stopped by PID, in reverse
order, on exit, on Ctrl-C or on any failure while starting.

The sandbox gets no infrastructure addresses and none of this process's environment but PATH and SANDBOX_*: it
holds no credentials. The orchestrator and the ray-executor find it at SANDBOX_ADDRESS.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from services.local.infra import LocalInfra
from services.local.issuer import LocalIssuer
from services.local.processes import (
    Component,
    ManagedProcess,
    ProcessStartError,
    ReadyCheck,
    free_port,
    http_ok,
    read_state,
    same_process,
    start_component,
    stop_from_state,
    tcp_accepts,
)

log = logging.getLogger("fleet.local.fleet")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = ROOT / ".fleet"
ENDPOINTS_FILE = "endpoints.json"
USER_TOKEN = "auth/user.token"  # the local user's token (every role), under the fleet's base directory
SERVICE_TOKEN_TTL = 30 * 24 * 3600.0  # a local fleet may run for days; tokens are minted again at each start
INFRA = ("nats", "valkey", "falkordb", "ray")
SERVICES = ("sandbox", "context", "ray-executor", "orchestrator", "monitoring")
COMPONENTS = (*INFRA, "vllm", *SERVICES)
HOST = "127.0.0.1"

# The environment variable through which a client (the CLI, the e2e suite) finds each component.
ADDRESS_ENV = {
    "nats": "NATS_URL",
    "valkey": "VALKEY_URL",
    "falkordb": "NEO4J_URI",
    "ray": "RAY_ADDRESS",
    "vllm": "VLLM_URL",
    "context": "CONTEXT_ADDRESS",
    "ray-executor": "RAY_EXECUTOR_ADDRESS",
    "orchestrator": "ORCHESTRATOR_ADDRESS",
    "monitoring": "MONITORING_URL",
}


@dataclass
class FleetOptions:
    base_dir: Path = DEFAULT_BASE
    model: str = "smollm2-135m"  # a local model built by `fleet llm setup` (see services/local/vllm.py)
    llm_url: str = ""  # an OpenAI-compatible server to use instead of starting vLLM
    llm_model: str = ""  # its model name (with llm_url)
    executor: Literal["ray", "in-process"] = "ray"
    agents: int = 3
    service_timeout: float = 60.0
    vllm_timeout: float = 300.0
    die_with_parent: bool = True


def grpc_serving(address: str, timeout: float = 1.0) -> ReadyCheck:
    """Ready when the server's grpc.health.v1 answers SERVING for the whole server."""

    def check() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check


def read_endpoints(base_dir: str | os.PathLike[str] = DEFAULT_BASE) -> dict[str, str]:
    """The endpoints a running fleet wrote (component -> address); empty when there is none."""
    try:
        return json.loads((Path(base_dir) / ENDPOINTS_FILE).read_text())
    except FileNotFoundError:
        return {}


class StaleFleet(RuntimeError):
    """An endpoints.json whose fleet is no longer running (killed without the chance to clean up)."""


def running_endpoints(base_dir: str | os.PathLike[str] = DEFAULT_BASE) -> dict[str, str]:
    """The endpoints of the fleet running from `base_dir`; {} when there is none; StaleFleet naming the file when
    it was left by a fleet whose processes are gone."""
    base = Path(base_dir)
    endpoints = read_endpoints(base)
    if not endpoints:
        return {}
    state = read_state(base / "state.json")
    if not any(
        same_process(entry["pid"], entry.get("start_time"), entry.get("cmdline"), entry.get("exe"))
        for entry in state.values()
        if entry.get("pid")
    ):
        raise StaleFleet(
            f"{base / ENDPOINTS_FILE} is stale: none of the processes of that fleet runs any more "
            f"(start it again with `fleet up`, or remove the file)"
        )
    return endpoints


def client_env(endpoints: Mapping[str, str]) -> dict[str, str]:
    """The environment variables clients read, for these endpoints (ORCHESTRATOR_ADDRESS, NATS_URL, ...;
    FLEET_TOKEN, the local user's token, when the fleet wrote one)."""
    env = {ADDRESS_ENV[name]: address for name, address in endpoints.items() if name in ADDRESS_ENV}
    if "vllm_model" in endpoints:
        env["VLLM_MODEL"] = endpoints["vllm_model"]
    if token := user_token(endpoints):
        env["FLEET_TOKEN"] = token
    return env


def user_token(endpoints: Mapping[str, str]) -> str:
    """The local user's token of the fleet these endpoints describe ("" when it has none)."""
    path = endpoints.get("user_token")
    try:
        return Path(path).read_text().strip() if path else ""
    except FileNotFoundError:
        return ""


def check_endpoints(endpoints: Mapping[str, str], timeout: float = 2.0) -> list[tuple[str, str, bool, str]]:
    """(component, endpoint, answers?, how) for each endpoint of a running fleet, checked at once: gRPC health for
    the services, /readyz for monitoring, /v1/models for vLLM, discovery for the issuer, a TCP connect for the rest."""
    from urllib.parse import urlsplit

    def check(name: str, address: str) -> tuple[str, str, bool, str]:
        if name in ("sandbox", "context", "ray-executor", "orchestrator"):
            probe, how = grpc_serving(address, timeout), "SERVING"
        elif name == "monitoring":
            probe, how = http_ok(f"{address}/readyz", timeout), "ready"
        elif name == "vllm":
            probe, how = http_ok(f"{address}/v1/models", timeout), f"serving {endpoints.get('vllm_model', '')}"
        elif name == "issuer":
            probe, how = http_ok(f"{address}/.well-known/openid-configuration", timeout), "serving its keys"
        else:
            url = urlsplit(address if "://" in address else f"tcp://{address}")
            probe, how = tcp_accepts(url.port or 0, url.hostname or HOST, timeout), "accepting connections"
        try:
            ok = probe()
        except OSError as e:
            return name, address, False, f"down: {e.strerror or e}"
        return name, address, ok, how if ok else "not answering"

    wanted = [(n, a) for n, a in endpoints.items() if n in (*COMPONENTS, "issuer")]
    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        return list(pool.map(lambda item: check(*item), wanted))


class LocalFleet:
    """Start every component (see the module docstring); `with LocalFleet(options) as fleet:` stops them all."""

    def __init__(self, options: FleetOptions | None = None, on_change: Callable[[LocalFleet], None] | None = None):
        self.options = options or FleetOptions()
        self.base_dir = Path(self.options.base_dir).resolve()
        self.log_dir = self.base_dir / "logs"
        self.on_change = on_change
        self.status: dict[str, tuple[str, str]] = {name: ("", "waiting") for name in self._wanted()}
        infra = [n for n in INFRA if n in self.status]
        self.infra = LocalInfra(self.base_dir, infra, die_with_parent=self.options.die_with_parent)
        self.endpoints: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.issuer: LocalIssuer | None = None
        self.tokens: dict[str, Path] = {}
        self._lock = threading.Lock()

    def _wanted(self) -> tuple[str, ...]:
        skip = {"vllm"} if self.options.llm_url else set()
        if self.options.executor != "ray":
            skip |= {"ray", "ray-executor"}
        return tuple(n for n in COMPONENTS if n not in skip)

    def _set(self, name: str, address: str, state: str) -> None:
        with self._lock:
            self.status[name] = (address, state)
        if self.on_change is not None:
            self.on_change(self)

    # lifecycle

    def start(self) -> Self:
        """Start everything; on any failure stop what was started and raise (the log tail says why)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for name in self.infra.names:
            self._set(name, "", "starting")
        llm_url, llm_model, llm_port = self._llm_address()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-vllm")
        try:
            # vLLM loads (the slowest, 40 s and more) while everything else starts: the services only need its
            # address, known here; the fleet is ready when vLLM is too.
            llm = pool.submit(self._start_llm, llm_port)
            self.infra.start()
            for c in self.infra.components:
                self._set(c.name, c.address, c.state)
            self.endpoints = {c.name: c.address for c in self.infra.components}
            self.endpoints["falkordb"] = self.infra.bolt_uri
            self.endpoints["vllm"], self.endpoints["vllm_model"] = llm_url, llm_model
            self.env = {**self.infra.env(), "VLLM_URL": llm_url, "VLLM_MODEL": llm_model}
            self._start_issuer()
            self._command("streams", ["streams", "init"])
            for name in SERVICES:
                if llm.done():
                    llm.result()  # vLLM failed: stop here, saying why
                if name in self.status:
                    self._start_service(name)
            self._command("councils", ["councils", "init", "--agents", str(self.options.agents)])
            llm.result()
        finally:
            pool.shutdown(wait=False)  # on a failure `start` stops everything, vLLM included, without waiting for it
        self._write_endpoints()

    def _llm_address(self) -> tuple[str, str, int | None]:
        """(url, model, port to start vLLM on) before it starts: a given server's, or a free port for vLLM
        (its model is checked to be set up now, not after the services started)."""
        if self.options.llm_url:
            return self.options.llm_url.rstrip("/"), self.options.llm_model or "default", None
        from services.local.vllm import MODELS, require_setup

        require_setup(self.options.model)
        port = free_port(HOST)
        return f"http://{HOST}:{port}", MODELS[self.options.model].served_as, port

    def _start_issuer(self) -> None:
        """The local issuer, a token per service that calls others, and the local user's token (every role)."""
        import getpass

        self.issuer = LocalIssuer(self.base_dir / "auth", HOST)
        for name in SERVICES:
            if name != "sandbox" and name in self.status:
                token = self.issuer.mint(f"fleet:{name}", ["service"], ttl_seconds=SERVICE_TOKEN_TTL)
                self.tokens[name] = self.issuer.write_token(name, token)
        user = getpass.getuser()
        token = self.issuer.mint(user, ["admin"], email=f"{user}@localhost", ttl_seconds=SERVICE_TOKEN_TTL)
        self.tokens["user"] = self.issuer.write_token("user", token)
        self.endpoints["issuer"] = self.issuer.url
        self.endpoints["user_token"] = str(self.tokens["user"])

    def _start_llm(self, port: int | None = None) -> tuple[str, str]:
        if self.options.llm_url:
            return self.options.llm_url.rstrip("/"), self.options.llm_model or "default"
        from services.local.vllm import start_vllm

        self._set("vllm", "", f"starting ({self.options.model}, ~40 s)")
        server = start_vllm(
            self.options.model,
            self.log_dir,
            port,
            group=self.infra.group,
            timeout=self.options.vllm_timeout,
            die_with_parent=self.options.die_with_parent,
        )
        self._set("vllm", server.url, f"ready ({server.model})")
        return server.url, server.model

    def _service_env(self, name: str, port: int) -> dict[str, str]:
        if name == "sandbox":  # started without the inherited environment (see the module's docstring)
            own = {k: v for k, v in os.environ.items() if k.startswith("SANDBOX_")}
            path = os.environ.get("PATH", os.defpath)
            return {
                **own,
                "PATH": path,
                "GRPC_PORT": str(port),
                "METRICS_PORT": str(free_port()),
                "LOG_FORMAT": "text",
                "AUTH_ISSUER": self.endpoints["issuer"],  # public keys only: the sandbox still holds no credential
            }
        env = {**self.env, "METRICS_PORT": str(free_port()), "LOG_FORMAT": "text"}
        env["AUTH_ISSUER"] = self.endpoints["issuer"]
        env["AUTH_TOKEN_FILE"] = str(self.tokens[name])
        if name == "monitoring":
            env["MONITORING_PORT"] = str(port)
            env["ORCHESTRATOR_ADDRESS"] = self.endpoints["orchestrator"]
        else:
            env["GRPC_PORT"] = str(port)
        if name in ("orchestrator", "ray-executor"):
            env["SANDBOX_ADDRESS"] = self.endpoints["sandbox"]
        if name == "orchestrator":
            env["CONTEXT_ADDRESS"] = self.endpoints["context"]
            env["EXECUTOR"] = self.options.executor
            env["DEFAULT_NUM_AGENTS"] = str(self.options.agents)
            if self.options.executor == "ray":
                env["RAY_EXECUTOR_ADDRESS"] = self.endpoints["ray-executor"]
        return env

    def _start_service(self, name: str, port: int | None = None) -> Component:
        port = port or free_port()
        address = f"http://{HOST}:{port}" if name == "monitoring" else f"{HOST}:{port}"
        check = http_ok(f"{address}/readyz") if name == "monitoring" else grpc_serving(address)
        self._set(name, address, "starting")
        process = ManagedProcess(
            name,
            [sys.executable, "-m", "services.cli", "serve", name],
            log_dir=self.log_dir,
            env=self._service_env(name, port),
            inherit_env=name != "sandbox",
            cwd=ROOT,
            die_with_parent=self.options.die_with_parent,
        )
        component = start_component(
            process,
            check,
            address=address,
            ports={"grpc" if name != "monitoring" else "http": port},
            timeout=self.options.service_timeout,
            on_spawn=self.infra.group.add,
        )
        self.endpoints[name] = address
        self._set(name, address, "ready")
        return component

    # faults, for the e2e suite: a component killed, then started again where clients expect it

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a component's process (SIGKILL: no chance to clean up) and wait until it is gone."""
        component = self.infra.group[name]
        if component.process is None or not component.process.alive():
            return
        os.kill(component.process.pid, sig)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while component.process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        component.state = "stopped"
        self._set(name, component.address, f"killed ({signal.Signals(sig).name})")

    def restart(self, name: str) -> Component:
        """Start a stopped or killed vLLM or service again on its old port (clients keep their addresses)."""
        old = self.infra.group[name]
        old.stop()
        port = next(iter(old.ports.values()))
        if name == "vllm":
            self._start_llm(port)
            return self.infra.group[name]
        if name not in SERVICES:
            raise ValueError(f"restart: {name} is not a service or vllm")
        return self._start_service(name, port)

    def _command(self, label: str, args: list[str]) -> None:
        """Run a `fleet` command (the one the Kubernetes Jobs run) against this fleet; its output goes to the log."""
        env = {**os.environ, **self.env, "FLEET_TOKEN": self.tokens["user"].read_text().strip()}
        if "orchestrator" in self.endpoints:
            env["ORCHESTRATOR_ADDRESS"] = self.endpoints["orchestrator"]
        log_path = self.log_dir / f"{label}.log"
        with open(log_path, "ab") as out:
            done = subprocess.run(
                [sys.executable, "-m", "services.cli", *args],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        if done.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise ProcessStartError(f"fleet {' '.join(args)}", "failed", done.returncode, log_path, tail)

    def _write_endpoints(self) -> None:
        path = self.base_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.endpoints, indent=2) + "\n")
        tmp.replace(path)

    def stop(self) -> None:
        (self.base_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        self.infra.stop()
        if self.issuer is not None:
            self.issuer.stop()
        for name, (address, state) in list(self.status.items()):
            if state != "waiting":
                self._set(name, address, "stopped")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def stop_fleet(base_dir: str | os.PathLike[str] = DEFAULT_BASE, timeout: float = 15.0) -> dict[str, str]:
    """Stop a fleet another process started in `base_dir` (`fleet up` in the background): {component: outcome}."""
    base = Path(base_dir).resolve()
    outcome = stop_from_state(base / "state.json", timeout)
    (base / ENDPOINTS_FILE).unlink(missing_ok=True)
    return outcome


def rows(fleet: LocalFleet) -> list[tuple[str, str, str]]:
    """(component, endpoint, state) in start order, for the status table."""
    return [(name, *fleet.status[name]) for name in COMPONENTS if name in fleet.status]
