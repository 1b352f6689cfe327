"""The runner: each execution is one child process running our trusted script (services/sandbox/inside.py),
which writes the files and runs pytest or the entrypoint; the untrusted code never runs in this process.

The child starts in its own process group (session), with a clean environment (PATH, HOME, PYTHONPATH and a few
PYTHON* variables: nothing of the service's), under rlimits (CPU = timeout + 1 s, address space = memory_mb, file
size 16 MiB, 256 open files, 64 processes, no core dumps) and with SIGKILL as its parent-death signal. Once the
service serves (`warm`), each slot's next child is started as soon as the slot's last execution is cleaned up,
under the largest limits a request may ask for; it imports pytest and waits: the trusted script lowers the address
space and CPU limits (soft and hard) to the execution's own as soon as the execution arrives, before any of its
code exists, and the execution's wall clock starts then. What it saves is the interpreter's and pytest's start-up
(~0.1 s of a ~0.15 s run) on every execution's critical path. Run as
root, it drops to a uid of its own per slot (SANDBOX_UID_BASE + slot): root is exempt from the process limit, and
an own uid makes the limit count that execution alone. The uid, the parent-death signal and the limits are set
by util-linux's `setpriv` and `prlimit` exec'd in front of the command, not in a `preexec_fn`: measured here, a
fork (which `preexec_fn`, `user=` or `group=` force) of this gRPC server under load crashed the child (SIGSEGV)
or hung it in 8-34 of 60 spawns, while a plain spawn (vfork) of the wrappers failed in none. The files arrive as JSON on stdin; the
report comes back on an inherited pipe; stdout and stderr are kept up to 16 KiB each (the rest is read and
dropped, `truncated`), and past 4 MiB of output in all the process group is killed (KILLED); at the wall clock it
is killed too (TIMEOUT). Afterwards nothing of it is left: the group is killed, and with a per-slot uid every
process of that uid.

Isolation "bwrap" (the default): the child is bubblewrap with every namespace unshared (no network: an empty
network namespace; its own PIDs, so it sees nothing of the host and dies with its init; no further user
namespaces), `/usr` and the `/lib*` links read-only, the interpreter's prefix read-only when outside `/usr`, the
pytest distribution closure read-only under /opt/sandbox-site (PYTHONPATH; not the service's whole environment),
a fresh /proc and a minimal /dev, and two size-limited tmpfs: the work dir /work and /tmp. Nothing else of the
host is there (no /etc, /home, /root, /work/...): untrusted code writes nothing to the host's disk.

Isolation "pod": the same process without bubblewrap, in a private temporary work dir deleted afterwards, for
Kubernetes pods where bwrap cannot create namespaces: there the pod is the boundary (no service-account token,
no egress, read-only root file system, an emptyDir for the temp dir). Without a per-slot uid (not root), a process
that leaves the process group (setsid) can outlive its execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from packaging.requirements import Requirement

from services.common.errors import FailedPrecondition
from services.common.execution import Execution
from services.sandbox.domain import Limits, Report, RunOutput, Stop

log = logging.getLogger("fleet.sandbox.runner")

INSIDE = Path(__file__).resolve().parent.parent / "inside.py"
# Paths inside the bwrap sandbox
SITE = "/opt/sandbox-site"
INSIDE_AT = "/opt/sandbox/inside.py"
WORK = "/work"
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
CLEANUP_SECONDS = 2.0  # after the end: for the last output to arrive, for every process to be gone


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise FailedPrecondition(
            "bwrap (bubblewrap) is not on PATH: install it (apt-get install bubblewrap); in a Kubernetes pod where "
            "it cannot create namespaces, set SANDBOX_ISOLATION=pod to make the pod the boundary"
        )
    return path


def _util_linux(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FailedPrecondition(f"{name} is not on PATH: install util-linux (apt-get install util-linux)")
    return path


def pytest_closure() -> dict[str, Path]:
    """Top-level packages and modules of pytest and what it requires (for this interpreter), name -> path."""
    found: dict[str, Path] = {}
    seen: set[str] = set()
    todo = ["pytest"]
    while todo:
        name = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise FailedPrecondition(f"{name} is not installed in the sandbox service's environment") from None
        seen.add(dist.metadata["Name"].lower())
        for top in {f.parts[0] for f in dist.files or () if len(f.parts) > 0}:
            if top.endswith((".dist-info", ".pth")) or top in ("..", "__pycache__"):
                continue
            found[top] = Path(str(dist.locate_file(top)))
        for spec in dist.requires or ():
            req = Requirement(spec)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and req.name.lower() not in seen:
                todo.append(req.name)
    return found


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "uids", "status"])
        if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def _tasks_of(uid: int) -> int:
    """Processes and threads of `uid` (what RLIMIT_NPROC counts)."""
    total = 0
    for pid in _processes_of(uid):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).num_threads()
    return total


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Capture:
    """Reads a stream to its end, keeping the first `keep` bytes; every byte counts against a shared budget."""

    def __init__(self, keep: int, budget: list[int], flooded: asyncio.Event) -> None:
        self.keep = keep
        self.kept = bytearray()
        self.cut = False
        self.budget = budget
        self.flooded = flooded

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(1 << 16):
            self.budget[0] -= len(chunk)
            if self.budget[0] < 0:
                self.flooded.set()
            room = self.keep - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]
            if len(chunk) > room:
                self.cut = True

    def text(self) -> str:
        return self.kept.decode(errors="replace")


@dataclass(frozen=True)
class _Started:
    """A child started for one execution: it waits on stdin for it."""

    process: asyncio.subprocess.Process
    report_r: int  # the read end of its report pipe
    uid: int | None  # the slot's uid (as root)
    work: str | None  # pod: its work dir on the host


class SandboxRunner:
    """`Runner` (application.py) for isolation "bwrap" (give `bwrap`) or "pod" (no bwrap). `uid_base` (root only)
    gives each slot its own uid. `close()` removes what it set up."""

    def __init__(self, python: str, *, bwrap: str = "", uid_base: int | None = None) -> None:
        self.python = python
        self.bwrap = bwrap
        self.isolation = "bwrap" if bwrap else "pod"
        self.uid_base = uid_base
        self.setpriv, self.prlimit = _util_linux("setpriv"), _util_linux("prlimit")
        self.site = pytest_closure()
        self._site_dir = ""
        self._ceiling: Limits | None = None  # warm processes: off until `warm`
        self._standby: dict[int, asyncio.Task[_Started]] = {}
        self._cleanups: set[asyncio.Future[None]] = set()
        self._closed = False
        if not bwrap:  # the closure as one directory of links, readable by the slots' uids
            self._site_dir = tempfile.mkdtemp(prefix="fleet-sandbox-site-")
            os.chmod(self._site_dir, 0o755)
            for name, path in self.site.items():
                os.symlink(path, os.path.join(self._site_dir, name))

    async def close(self) -> None:
        """Kill the warm processes (running executions are the service's to end first) and remove what was set up."""
        self._closed = True
        standby, self._standby = list(self._standby.values()), {}
        for task in standby:
            task.cancel()  # a process it was still starting dies with this service (its parent-death signal)
        for task in standby:
            with contextlib.suppress(BaseException):
                await self._discard(await task)
        if self._cleanups:
            await asyncio.wait(self._cleanups)
        if self._site_dir:
            shutil.rmtree(self._site_dir, ignore_errors=True)

    def _env(self, work: str, site: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": "/tmp" if self.bwrap else work,
            "LANG": "C.UTF-8",
            "PYTHONPATH": site,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",  # output written before a kill is not lost in a buffer
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "MALLOC_ARENA_MAX": "2",  # glibc's per-thread arenas would reserve address space by the 64 MiB
        }

    def _wrappers(self, limits: Limits, uid: int | None, processes: int) -> list[str]:
        """setpriv (the slot's uid, SIGKILL when this service dies) and prlimit (CPU: SIGXCPU, then SIGKILL)."""
        user = [] if uid is None else [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return [
            *(self.setpriv, *user, "--pdeathsig", "KILL", "--"),
            *(self.prlimit, f"--as={limits.memory_mb << 20}", f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}"),
            *(f"--fsize={limits.file_bytes}", f"--nofile={limits.open_files}", f"--nproc={processes}", "--core=0"),
            "--",
        ]

    def _bwrap_args(self, limits: Limits) -> list[str]:
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in ROOT_LINKS:
            path = Path("/", name)
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        prefix = Path(self.python).parent.parent
        if not prefix.is_relative_to("/usr"):
            args += ["--ro-bind", str(prefix), str(prefix)]
        for name, path in sorted(self.site.items()):
            args += ["--ro-bind", str(path), f"{SITE}/{name}"]
        args += ["--ro-bind", str(INSIDE), INSIDE_AT, "--proc", "/proc", "--dev", "/dev"]
        for tmpfs in ("/tmp", WORK):
            args += ["--size", str(limits.disk_bytes), "--tmpfs", tmpfs]
        return [*args, "--chdir", WORK]

    def warm(self, ceiling: Limits, slots: int) -> None:
        """From now on keep one process per slot started ahead of its execution, under `ceiling` (the largest
        limits an execution may ask for): interpreter, sandbox and pytest's import are paid between executions,
        not during one. The trusted script lowers the limits to the execution's own before its code runs."""
        self._ceiling = ceiling
        for slot in range(slots):
            self._prepare(slot)

    def _prepare(self, slot: int) -> None:
        if self._ceiling is not None and not self._closed and slot not in self._standby:
            self._standby[slot] = asyncio.create_task(self._spawn(self._ceiling, slot))

    def _fits(self, limits: Limits) -> bool:
        """A process started under the ceiling can run an execution with `limits` (the script lowers its own)."""
        c = self._ceiling
        if c is None or limits.memory_mb > c.memory_mb or limits.cpu_seconds > c.cpu_seconds:
            return False
        own = {
            "timeout_seconds": limits.timeout_seconds,
            "memory_mb": limits.memory_mb,
            "cpu_seconds": limits.cpu_seconds,
        }
        return replace(c, **own) == limits  # every other limit is set when the process starts

    async def _take(self, limits: Limits, slot: int) -> _Started:
        """The slot's warm process when there is one that fits and still waits, else one started now."""
        pending = self._standby.pop(slot, None)
        if pending is not None:
            try:
                started = await asyncio.shield(pending)
            except asyncio.CancelledError:
                pending.add_done_callback(self._discard_later)
                raise
            except Exception:  # it could not start: start one now, which will say why
                log.warning("the warm process of slot %d did not start", slot, exc_info=True)
            else:
                if started.process.returncode is None and self._fits(limits):
                    return started
                await self._discard(started)
        return await self._spawn(limits, slot)

    async def _spawn(self, limits: Limits, slot: int) -> _Started:
        """Start the child under `limits`: it waits on stdin for its execution (pytest already imported)."""
        uid = None if self.uid_base is None else self.uid_base + slot
        # Sharing this service's uid, the process limit counts what the uid already runs too.
        processes = limits.processes + (_tasks_of(os.getuid()) if uid is None else 0)
        argv = self._wrappers(limits, uid, processes)
        work = None
        if self.bwrap:
            argv += [*self._bwrap_args(limits), self.python, "-s", INSIDE_AT]
            env = self._env(WORK, SITE)
        else:
            work = tempfile.mkdtemp(prefix="fleet-sandbox-")
            if uid is not None:
                os.chown(work, uid, uid)
            argv += [self.python, "-s", str(INSIDE)]
            env = self._env(work, self._site_dir)
        report_r, report_w = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                str(report_w),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(report_w,),
                env=env,
                cwd=work,
                start_new_session=True,
            )
        except BaseException:
            os.close(report_r)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            os.close(report_w)
        return _Started(process, report_r, uid, work)

    async def run(self, execution: Execution, limits: Limits, slot: int) -> RunOutput:
        started = await self._take(limits, slot)
        payload = json.dumps(
            {
                "files": execution.files,
                "test_files": execution.test_files,
                "entrypoint": execution.entrypoint,
                "limits": {"memory_bytes": limits.memory_mb << 20, "cpu_seconds": limits.cpu_seconds},
            }
        ).encode()
        try:
            return await self._watch(started.process, started.report_r, payload, limits, time.monotonic())
        finally:
            await asyncio.shield(self._cleanup(started.process, started.uid, started.work))
            self._prepare(slot)  # the slot's next process, after this one's uid was swept

    async def _discard(self, started: _Started) -> None:
        os.close(started.report_r)
        await self._cleanup(started.process, started.uid, started.work)

    def _discard_later(self, task: asyncio.Task[_Started]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._cleanups.add(cleanup := asyncio.ensure_future(self._discard(task.result())))
            cleanup.add_done_callback(self._cleanups.discard)

    async def _watch(
        self, process: asyncio.subprocess.Process, report_fd: int, payload: bytes, limits: Limits, t0: float
    ) -> RunOutput:
        loop = asyncio.get_running_loop()
        report_stream = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(report_stream), os.fdopen(report_fd, "rb", 0)
        )
        budget = [limits.output_hard_cap]
        flooded = asyncio.Event()
        out, err = _Capture(limits.output_bytes, budget, flooded), _Capture(limits.output_bytes, budget, flooded)
        report = _Capture(limits.output_hard_cap, budget, flooded)
        assert process.stdout is not None and process.stderr is not None
        readers = [
            asyncio.create_task(out.drain(process.stdout)),
            asyncio.create_task(err.drain(process.stderr)),
            asyncio.create_task(report.drain(report_stream)),
            asyncio.create_task(self._feed(process, payload)),
        ]
        exited = asyncio.create_task(process.wait())
        flood = asyncio.create_task(flooded.wait())
        try:
            await asyncio.wait(
                (exited, flood),
                timeout=max(0.0, limits.timeout_seconds - (time.monotonic() - t0)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            stopped = Stop.OUTPUT if flooded.is_set() else None if exited.done() else Stop.WALL_CLOCK
            _kill_group(process.pid)  # whatever is left of it (pod: processes it started and left running)
            code = await exited
            duration_ms = (time.monotonic() - t0) * 1000
            await asyncio.wait(readers, timeout=CLEANUP_SECONDS)
        finally:
            for task in (*readers, exited, flood):
                task.cancel()
            transport.close()
        if self.bwrap and 128 < code <= 128 + signal.SIGRTMAX:  # bwrap exits 128 + N when its child died of N
            code = 128 - code
        return RunOutput(
            exit_code=code,
            report=Report.parse(bytes(report.kept)) if report.kept and stopped is None else None,
            stopped=stopped,
            stdout=out.text(),
            stderr=err.text(),
            truncated=out.cut or err.cut,
            duration_ms=duration_ms,
        )

    @staticmethod
    async def _feed(process: asyncio.subprocess.Process, payload: bytes) -> None:
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            process.stdin.write(payload)
            await process.stdin.drain()
            process.stdin.close()

    async def _cleanup(self, process: asyncio.subprocess.Process, uid: int | None, work: str | None) -> None:
        """Kill what is left (also after a cancellation), reap it, sweep the slot's uid, delete the work dir."""
        try:
            _kill_group(process.pid)
            await process.wait()
            if uid is not None:
                deadline = time.monotonic() + CLEANUP_SECONDS
                while pids := _processes_of(uid):
                    if time.monotonic() > deadline:
                        log.error("processes of uid %d outlived their execution: %s", uid, pids)
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    await asyncio.sleep(0.01)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
