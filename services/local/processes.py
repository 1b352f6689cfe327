"""Child processes for the local fleet: start, wait until really ready, stop by PID, leave no orphans.

The generic layer under `services.local.infra` (NATS, Valkey, FalkorDB, Ray) and `fleet up` (vLLM, our gRPC
services):

- `free_port()` / `free_port_range()` hand out free loopback ports, never the same one twice in a process.
- `ManagedProcess` is one child: its own session (so its whole process group can be signalled), stdout+stderr
  appended to `<log_dir>/<name>.log`, `wait_ready(check)` polling a real readiness check, and
  `stop()`: SIGTERM to the group, then SIGKILL, also reaching descendants that left the group. Children also
  get SIGTERM if this process dies without stopping them (`setpriv --pdeathsig`, unless `die_with_parent=False`).
- `Component` is the record a table or a state file shows (name, address, pid, log, state).
- `ProcessGroup` owns several components: stops them in reverse order on exit, on error, at interpreter exit
  (`atexit`) and, when asked, on SIGINT/SIGTERM; it can write a JSON state file so that `stop_from_state()` in
  another process (`fleet infra down`) stops a group started in the background. Before signalling a PID read
  from a file it checks, through psutil, that the PID is still the same process (start time, command line).

Linux only (process groups, `setpriv`); nothing here ever kills by name.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal, Self, TypeVar

import psutil

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], bool]
State = Literal["starting", "ready", "stopped", "failed"]

LOG_TAIL_LINES = 40
POLL_INTERVAL = 0.02


class ProcessStartError(RuntimeError):
    """A process exited during start, or did not become ready in time. The message carries its log tail."""

    def __init__(self, name: str, reason: str, returncode: int | None, log_path: Path | None, log_tail: str) -> None:
        self.name = name
        self.reason = reason
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail
        where = f" — last lines of {log_path}:" if log_path else ":"
        super().__init__(f"{name}: {reason} (exit code {returncode}){where}\n{log_tail.rstrip() or '(log is empty)'}")


# --- ports ----------------------------------------------------------------------------------------------------

_given_ports: set[int] = set()
_ports_lock = threading.Lock()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could listen on (host, port) now (like servers do, ignoring old TIME_WAIT connections)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host` (bind port 0), never one this process handed out before."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with _ports_lock:
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise RuntimeError(f"no free port on {host} that was not already handed out")


def free_port_in(low: int, high: int, host: str = "127.0.0.1") -> int:
    """A free port in [low, high), e.g. for servers that cannot take the high ephemeral ports `free_port()` gives."""
    return free_port_range(1, host, low, high)[0]


def free_port_range(count: int, host: str = "127.0.0.1", low: int = 20000, high: int = 32000) -> range:
    """`count` consecutive free ports (below the usual ephemeral range), reserved like `free_port()`'s."""
    for _ in range(500):
        start = random.randrange(low, high - count + 1)
        candidates = range(start, start + count)
        with _ports_lock:
            if any(p in _given_ports for p in candidates):
                continue
        if all(port_is_free(p, host) for p in candidates):
            with _ports_lock:
                if not any(p in _given_ports for p in candidates):
                    _given_ports.update(candidates)
                    return candidates
    raise RuntimeError(f"no range of {count} free ports on {host} in [{low}, {high})")


# --- process identity (psutil) -------------------------------------------------------------------------------

# A PID read from a state file is trusted only while its start time (psutil's `create_time()`, seconds since the
# epoch) matches the recorded one. psutil derives it from /proc's start tick (0.01 s) plus the boot time, which
# Linux recomputes on each read from the wall clock (so it can differ by 1 s from one read to the next, and
# follows clock steps): compare within this tolerance. A recycled PID would also need the recorded command line.
START_TIME_TOLERANCE = 2.0
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _running(proc: psutil.Process) -> bool:
    """True while `proc` (this very process: psutil notices a recycled PID) runs; a zombie counts as gone."""
    try:
        return proc.is_running() and proc.status() not in _GONE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _signal(proc: psutil.Process, sig: int) -> None:
    """Signal `proc` unless it is gone (psutil refuses to signal a PID that now belongs to another process)."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(sig)


def _cmdline(proc: psutil.Process) -> list[str] | None:
    try:
        args = proc.cmdline()
    except psutil.Error:
        return None
    while args and not args[-1]:  # the padding of servers that rewrite their title (valkey, redis)
        args.pop()
    return args


def _exe(proc: psutil.Process) -> str | None:
    try:
        return proc.exe() or None
    except psutil.Error:
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def process_identity(pid: int) -> dict[str, Any]:
    """What a state file keeps to recognise `pid` later: `start_time` (psutil `create_time()`, seconds since the
    epoch), `cmdline` and `exe`; each None if unknown (e.g. the process is gone)."""
    try:
        proc = psutil.Process(pid)
        start_time: float | None = proc.create_time()
    except psutil.Error:
        return {"start_time": None, "cmdline": None, "exe": None}
    return {"start_time": start_time, "cmdline": _cmdline(proc), "exe": _exe(proc)}


def _recorded_start(start_time: float) -> float:
    """A recorded start time as seconds since the epoch. State files written before psutil hold /proc's start
    tick (an int: clock ticks since boot), converted here the way psutil computes `create_time()`."""
    if isinstance(start_time, int):
        return psutil.boot_time() + start_time / os.sysconf("SC_CLK_TCK")
    return float(start_time)


def wait_exec(pid: int, argv: Sequence[str], timeout: float = 2.0) -> bool:
    """Wait (bounded) until `pid` runs `argv`: a freshly forked child shows its parent's (or a wrapper's) command
    line until it execs, and a state file must record the program's own. False if it never showed up in time."""
    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return False
    while True:
        cmdline = _cmdline(proc)
        if cmdline == list(argv):
            return True
        if not _running(proc) or time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def process_tree(pid: int) -> dict[int, psutil.Process]:
    """Live members of process group `pid` and descendants of `pid` (leader excluded), by PID.

    Descendants are followed through parent PIDs even if they left the group; group members even if their parent
    died (reparented). Each value is a psutil handle, so a later signal never reaches a recycled PID.
    """
    live: dict[int, psutil.Process] = {}
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid", "status"]):
        if proc.info["status"] in _GONE or proc.info["ppid"] is None:
            continue
        live[proc.pid] = proc
        children.setdefault(proc.info["ppid"], []).append(proc.pid)
    found = {p: proc for p, proc in live.items() if p != pid and _pgid(p) == pid}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in live and p not in found:
            found[p] = live[p]
            todo.extend(children.get(p, []))
    return found


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _terminate_tree(pid: int, leader_gone: Callable[[float], bool], timeout: float, sig: int = signal.SIGTERM) -> None:
    """Signal process group `pid` (its leader is `pid`), wait, then SIGKILL whatever of the tree is left.

    `leader_gone(seconds)` waits up to that long for the leader and says whether it is gone.
    Descendants that moved to another process group get SIGTERM once the leader is gone, then SIGKILL.
    """
    deadline = time.monotonic() + timeout
    tracked = process_tree(pid)
    _kill_group(pid, sig)
    if not leader_gone(max(0.0, deadline - time.monotonic())):
        log.warning("pid %d ignored signal %d for %.1fs: SIGKILL", pid, sig, timeout)
        _kill_group(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        leader_gone(5.0)
    tracked.update(process_tree(pid))  # group members still around (the leader may have forked during shutdown)
    left = {p: proc for p, proc in tracked.items() if _running(proc)}
    for p, proc in left.items():
        if _pgid(p) != pid:  # left the group: signal it on its own
            _signal(proc, sig)
    grace = time.monotonic() + max(1.0, min(5.0, deadline - time.monotonic()))
    while left and time.monotonic() < grace:
        time.sleep(POLL_INTERVAL)
        left = {p: proc for p, proc in left.items() if _running(proc)}
    if left:
        log.warning("killing leftover processes of %d: %s", pid, sorted(left))
        _kill_group(pid, signal.SIGKILL)
        for proc in left.values():
            _signal(proc, signal.SIGKILL)


# --- readiness checks -----------------------------------------------------------------------------------------


def tcp_accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> ReadyCheck:
    """Ready when a TCP connection to (host, port) succeeds."""

    def check() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    return check


def http_ok(url: str, timeout: float = 2.0, status: int = 200) -> ReadyCheck:
    """Ready when GET `url` answers with `status`."""
    import urllib.error
    import urllib.request

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return bool(resp.status == status)
        except urllib.error.HTTPError as e:
            return e.code == status

    return check


def resp_ping(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> ReadyCheck:
    """Ready when a Redis-protocol server answers PING with +PONG (not -LOADING or an error)."""

    def check() -> bool:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"+PONG")

    return check


def log_contains(process: ManagedProcess, text: str) -> ReadyCheck:
    """Ready once this run of `process` wrote `text` to its log."""

    def check() -> bool:
        return text in process.read_log()

    return check


def all_of(*checks: ReadyCheck) -> ReadyCheck:
    """Ready when every check is, evaluated in order (a later, costly check runs only once the earlier pass)."""

    def check() -> bool:
        return all(c() for c in checks)

    return check


# --- spawning -------------------------------------------------------------------------------------------------


class _Spawner:
    """Forks every child from one long-lived daemon thread.

    The kernel's parent-death signal (PR_SET_PDEATHSIG) fires when the *thread* that forked a child ends, so
    children must not be forked from short-lived threads (thread pools, asyncio.to_thread) when they should
    die with this process, and only with it.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="process-spawner", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[Any] = Future()
        self._queue.put((fn, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            fn, future = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)


_spawner = _Spawner()


def _pdeathsig_prefix(sig: int) -> list[str]:
    """`setpriv --pdeathsig SIG --` (util-linux) if available: the child gets SIG when its parent dies."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return []
    return [setpriv, "--pdeathsig", signal.Signals(sig).name.removeprefix("SIG"), "--"]


def spawn(
    argv: Sequence[str], *, die_with_parent: bool = True, stop_signal: int = signal.SIGTERM, **popen: Any
) -> subprocess.Popen:
    """`subprocess.Popen(argv, **popen)`; with `die_with_parent` the child gets `stop_signal` when this process
    dies (setpriv --pdeathsig). Forked from one long-lived thread: Linux sends the parent-death signal when the
    *thread* that forked the child ends, so children of short-lived threads would otherwise die early."""
    argv = [*_pdeathsig_prefix(stop_signal), *argv] if die_with_parent else list(argv)
    return _spawner.run(lambda: subprocess.Popen(argv, **popen))


def _resolve_executable(program: str, env: Mapping[str, str]) -> str | None:
    if os.sep in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    return shutil.which(program, path=env.get("PATH", os.defpath))


# --- one process ----------------------------------------------------------------------------------------------


class ManagedProcess:
    """One child process in its own session, logging to `<log_dir>/<name>.log` (appended).

    With `die_with_parent` (default) the child gets `stop_signal` if this Python process dies without stopping
    it (killed, crashed): through `setpriv --pdeathsig`, when util-linux's setpriv is installed.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_dir: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        inherit_env: bool = True,
        stop_signal: int = signal.SIGTERM,
        after_stop: Callable[[], None] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = Path(log_dir).resolve() / f"{name}.log"
        self.env = dict(env or {})
        self.cwd = Path(cwd).resolve() if cwd is not None else None
        self.inherit_env = inherit_env
        self.stop_signal = stop_signal
        self.after_stop = after_stop
        self.die_with_parent = die_with_parent
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self._lock = threading.RLock()
        self._stopped = False

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, alive={self.alive()})"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def start(self) -> Self:
        with self._lock:
            if self._popen is not None:
                raise RuntimeError(f"{self.name} was already started (pid {self._popen.pid})")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ) if self.inherit_env else {}
            for k, v in self.env.items():
                if v is None:
                    env.pop(k, None)
                else:
                    env[k] = v
            self._log_file = open(self.log_path, "ab")  # kept open as long as the process runs
            self._log_offset = self._log_file.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._log_file.write(f"--- {stamp} start {self.name}: {' '.join(self.argv)}\n".encode())
            self._log_file.flush()
            log_file = self._log_file
            try:
                if _resolve_executable(self.argv[0], env) is None:
                    raise FileNotFoundError(f"no executable {self.argv[0]!r}")
                self._popen = spawn(
                    self.argv,
                    die_with_parent=self.die_with_parent,
                    stop_signal=self.stop_signal,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                log_file.write(f"cannot execute {self.argv[0]}: {e}\n".encode())
                log_file.close()
                raise ProcessStartError(self.name, f"cannot execute: {e}", None, self.log_path, self.read_log()) from e
            if self.die_with_parent:  # let setpriv exec the real program, so the recorded command line is its own
                wait_exec(self._popen.pid, self.argv)
            log.debug("started %s pid %d: %s", self.name, self._popen.pid, self.argv)
            return self

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def read_log(self) -> str:
        """What this run wrote to the log so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def _failed(self, reason: str) -> ProcessStartError:
        return ProcessStartError(self.name, reason, self.returncode, self.log_path, self.log_tail())

    def wait_ready(self, check: ReadyCheck, timeout: float = 30.0, interval: float = POLL_INTERVAL) -> float:
        """Poll `check` (an exception counts as not ready) until it passes; seconds it took.

        If the process exits first, or `timeout` passes, the process is stopped and `ProcessStartError` raised.
        Any other interruption (KeyboardInterrupt...) also stops the process before propagating.
        """
        if self._popen is None:
            raise RuntimeError(f"{self.name} is not started")
        t0 = time.monotonic()
        last_error: BaseException | None = None
        try:
            while True:
                if not self.alive():
                    raise self._failed("exited during start")
                try:
                    if check():
                        return time.monotonic() - t0
                    last_error = None
                except Exception as e:
                    last_error = e
                if not self.alive():
                    raise self._failed("exited during start")
                if time.monotonic() - t0 > timeout:
                    self.stop()
                    why = f"; last check error: {last_error!r}" if last_error else ""
                    raise self._failed(f"not ready after {timeout:.1f}s, stopped it{why}")
                time.sleep(interval)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop signal to the process group by PID, wait up to `timeout`, then SIGKILL; idempotent.

        Returns the exit code (None if never started).
        """
        with self._lock:
            popen = self._popen
            if popen is None:
                return None
            if self._stopped:
                return popen.returncode

            def leader_gone(seconds: float) -> bool:
                try:
                    popen.wait(timeout=seconds)
                except subprocess.TimeoutExpired:
                    return False
                return True

            try:
                _terminate_tree(popen.pid, leader_gone, timeout, self.stop_signal)
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=5)
                self._stopped = True
                if self._log_file is not None:
                    self._log_file.close()
                if self.after_stop is not None:
                    try:
                        self.after_stop()
                    except Exception:
                        log.exception("after_stop of %s failed", self.name)
            log.debug("stopped %s pid %d: exit code %s", self.name, popen.pid, popen.returncode)
            return popen.returncode


# --- the record -----------------------------------------------------------------------------------------------


@dataclass
class Component:
    """A started server as a table or a state file shows it. `address` is what clients use."""

    name: str
    address: str
    pid: int | None = None
    log_path: Path | None = None
    state: State = "starting"
    urls: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    started_in: float | None = None  # seconds from spawn to ready
    process: ManagedProcess | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        return self.process.alive() if self.process is not None else bool(self.pid and pid_alive(self.pid))

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)
        if self.state != "failed":
            self.state = "stopped"

    def to_state(self) -> dict[str, Any]:
        """What a state file keeps, including what proves the PID is still this process (`process_identity`)."""
        pid = self.pid
        return {
            "pid": pid,
            "address": self.address,
            "log": str(self.log_path) if self.log_path else None,
            "state": self.state,
            "urls": self.urls,
            "ports": self.ports,
            **(process_identity(pid) if pid else {"start_time": None, "cmdline": None, "exe": None}),
        }


Endpoint = Component
C = TypeVar("C", bound=Component)


def start_component(
    process: ManagedProcess,
    check: ReadyCheck,
    *,
    address: str,
    urls: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
    timeout: float = 30.0,
    on_spawn: Callable[[Component], object] | None = None,
    interval: float = POLL_INTERVAL,
    kind: type[C] = Component,  # type: ignore[assignment]
    **fields: Any,
) -> C:
    """Start `process`, wait for `check` (polled every `interval` s), return its ready component — a `kind` with
    `fields` besides the common ones (e.g. a `VLLMServer` with its model); on failure nothing is left running."""
    process.start()
    component = kind(
        name=process.name,
        address=address,
        pid=process.pid,
        log_path=process.log_path,
        urls=dict(urls or {}),
        ports=dict(ports or {}),
        process=process,
        **fields,
    )
    try:
        if on_spawn is not None:
            on_spawn(component)
        component.started_in = process.wait_ready(check, timeout, interval)
    except BaseException:
        process.stop()
        component.state = "failed"
        raise
    component.state = "ready"
    log.info("%s ready at %s (pid %s, %.3fs)", component.name, address, component.pid, component.started_in)
    return component


# --- a group --------------------------------------------------------------------------------------------------


class ProcessGroup:
    """Components started in order and stopped in reverse order: on exit, on error, at exit, on signals.

    Usable as `with`. `state_file` (optional) gets `{name: {pid, address, log, ...}}`,
    rewritten as components come and go and removed when the group is closed.
    """

    def __init__(self, state_file: str | os.PathLike[str] | None = None, *, stop_timeout: float = 10.0) -> None:
        self.state_file = Path(state_file).resolve() if state_file is not None else None
        self.stop_timeout = stop_timeout
        self._components: list[Component] = []
        self._lock = threading.RLock()
        self._closed = False
        self._atexit_registered = False
        self._previous_handlers: dict[int, Any] = {}

    # registry

    @property
    def components(self) -> list[Component]:
        with self._lock:
            return list(self._components)

    def __getitem__(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.components)

    def add(self, component: Component) -> Component:
        """Record a (starting or started) component; refused, and the component stopped, if the group is closed."""
        with self._lock:
            if self._closed:
                component.stop(self.stop_timeout)
                raise RuntimeError(f"process group is closed: stopped {component.name} instead of adding it")
            for i, c in enumerate(self._components):
                if c.name == component.name:
                    if c.state in ("starting", "ready") and c.alive():
                        raise ValueError(f"a component named {component.name!r} is already running in the group")
                    del self._components[i]  # a failed or stopped one gets replaced (e.g. a retry)
                    break
            self._components.append(component)
            if not self._atexit_registered:
                atexit.register(self.close)
                self._atexit_registered = True
            self.write_state()
        return component

    def start(
        self,
        process: ManagedProcess,
        check: ReadyCheck,
        *,
        address: str,
        urls: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        timeout: float = 30.0,
        **options: Any,
    ) -> Component:
        """Start `process` as a member (recorded as soon as it is spawned) and wait until `check` passes;
        `options` go to `start_component` (interval, kind, fields)."""
        try:
            component = start_component(
                process, check, address=address, urls=urls, ports=ports, timeout=timeout, on_spawn=self.add, **options
            )
        finally:
            self.write_state()
        return component

    # state file

    def write_state(self) -> None:
        if self.state_file is None:
            return
        with self._lock:
            me = process_identity(os.getpid())
            owner = {"pid": os.getpid(), "start_time": me["start_time"], "cmdline": me["cmdline"]}
            data = {c.name: {**c.to_state(), "owner": owner} for c in self._components if c.state != "stopped"}
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.state_file)

    # stopping

    def close(self) -> None:
        """Stop every component in reverse order (idempotent); remove the state file; undo signal handlers."""
        with self._lock:
            self._closed = True
            components = list(reversed(self._components))
        errors: list[BaseException] = []
        for c in components:
            try:
                c.stop(self.stop_timeout)
            except Exception as e:
                log.exception("stopping %s failed", c.name)
                errors.append(e)
        with self._lock:
            if self.state_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    if _state_owned_by_me(self.state_file):
                        self.state_file.unlink()
            if self._atexit_registered:
                atexit.unregister(self.close)
                self._atexit_registered = False
        self.restore_signal_handlers()
        if errors:
            raise errors[0]

    stop = close

    def install_signal_handlers(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """On these signals: stop the group, then behave as the previous handler would have (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping %d components", signum, len(self._components))
            previous = self._previous_handlers.get(signum, signal.SIG_DFL)
            self.close()  # restores the previous handlers
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)

        for sig in signals:
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, handler)

    def restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# --- stopping a group from another process --------------------------------------------------------------------


def read_state(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The components of a state file (empty if there is none)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a process-group state file")
    return data


def _state_owned_by_me(path: Path) -> bool:
    try:
        data = read_state(path)
    except (ValueError, OSError):
        return False
    return all((entry.get("owner") or {}).get("pid") in (None, os.getpid()) for entry in data.values())


def recorded_process(
    pid: int, start_time: float | None, cmdline: Sequence[str] | None, exe: str | None = None
) -> psutil.Process | None:
    """A psutil handle on `pid` if it is alive and still the process that was recorded, else None (never trust a
    bare, maybe recycled, PID). Signals through the handle never reach a later process with the same PID.

    The start time must match (within `START_TIME_TOLERANCE`) when it was recorded; the command line must match,
    or (for servers that rewrite their process title, like redis-server) the executable.
    """
    try:
        proc = psutil.Process(pid)
        if start_time is not None and abs(proc.create_time() - _recorded_start(start_time)) > START_TIME_TOLERANCE:
            return None
    except psutil.Error:
        return None
    if not _running(proc):
        return None
    if cmdline is not None and _cmdline(proc) == list(cmdline):
        return proc
    return proc if exe is not None and _exe(proc) == exe else None


def same_process(pid: int, start_time: float | None, cmdline: Sequence[str] | None, exe: str | None = None) -> bool:
    """True if `pid` is alive and still the process that was recorded (see `recorded_process`)."""
    return recorded_process(pid, start_time, cmdline, exe) is not None


def _wait_gone(proc: psutil.Process, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def stop_from_state(path: str | os.PathLike[str], timeout: float = 10.0, *, stop_owner: bool = True) -> dict[str, str]:
    """Stop a group another process started, from its state file; returns {component: what happened}.

    With `stop_owner`, the process that owns the group (e.g. a backgrounded `fleet infra up`) gets SIGTERM
    first, so it can shut down cleanly; whatever is still running afterwards is stopped here, in reverse order:
    SIGTERM to the process group, SIGKILL after `timeout`. A PID is only signalled after checking (through
    psutil: start time, command line) that it is still the recorded process. The file is removed at the end.
    """
    path = Path(path)
    entries = read_state(path)
    outcome: dict[str, str] = {}
    if stop_owner:
        owners = {
            (e["owner"]["pid"], e["owner"].get("start_time")): e["owner"] for e in entries.values() if e.get("owner")
        }
        for (opid, ostart), owner in owners.items():
            owner_proc = None if opid == os.getpid() else recorded_process(opid, ostart, owner.get("cmdline"))
            if owner_proc is None:
                continue
            log.info("stopping owner pid %d", opid)
            _signal(owner_proc, signal.SIGTERM)
            if not _wait_gone(owner_proc, timeout):
                log.warning("owner pid %d still running after %.1fs; stopping its components directly", opid, timeout)
    for name, entry in reversed(list(entries.items())):
        pid = entry.get("pid")
        if not pid:
            outcome[name] = "no pid"
            continue
        proc = recorded_process(pid, entry.get("start_time"), entry.get("cmdline"), entry.get("exe"))
        if proc is None:
            if pid_alive(pid):
                outcome[name] = f"not running (pid {pid} is now another process: left alone)"
            else:
                outcome[name] = "not running"
            continue
        pgid = _pgid(pid)
        if pgid is None:
            outcome[name] = "not running"
            continue
        if pgid == pid:
            _terminate_tree(pid, lambda s, p=proc: _wait_gone(p, s), timeout)
        else:
            _signal(proc, signal.SIGTERM)
            if not _wait_gone(proc, timeout):
                _signal(proc, signal.SIGKILL)
                _wait_gone(proc, 5.0)
        outcome[name] = "stopped"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return outcome
