"""The sandbox service as a test fixture starts it: `fleet serve sandbox` (real bwrap, real gRPC) as its own
process on a free loopback port, stopped by PID. Its environment carries a secret the executions must not see, and
its own TMPDIR, which must be empty once it stops; nothing of its executions may be left running. Shared by
tests/conftest.py (the session's sandbox) and the sandbox's own tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.execution import Execution
from services.common.sandbox import SERVICE_NAME, SandboxClient
from services.local.fleet import grpc_serving
from services.local.processes import ManagedProcess, free_port, start_component
from services.sandbox.settings import SandboxSettings

ROOT = Path(__file__).resolve().parents[1]
SECRET_VAR, SECRET = "FLEET_SECRET_PROBE", "s3cr3t-7f3a9c-never-inside"
DEBIAN_PYTHON = "/usr/bin/python3"

PASSING = Execution(
    files={"solution.py": "def add(a, b):\n    return a + b\n"},
    test_files={"test_add.py": "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"},
)


def suite(body: str, solution: str = "", **options: float) -> Execution:
    """`body` as the test file test_task.py, `solution` (if any) as solution.py."""
    files = {"solution.py": solution} if solution else {}
    return Execution(files=files, test_files={"test_task.py": body}, **options)  # type: ignore[arg-type]


def script(code: str, **options: float) -> Execution:
    """`code` as main.py, run as the entrypoint."""
    return Execution(files={"main.py": code}, entrypoint="main.py", **options)  # type: ignore[arg-type]


@dataclass
class Sandbox:
    process: ManagedProcess
    port: int
    tmp: Path  # the service's TMPDIR
    uid_base: int
    slots: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: object) -> SandboxClient:
        return SandboxClient(self.address, **options)  # type: ignore[arg-type]

    def warm(self) -> set[int]:
        """The slots' warm processes (started ahead of an execution, waiting for it): children of the service whose
        tree is only the wrappers, bwrap and at most one interpreter running inside.py; at most one per slot."""
        trees = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children():
                tree = [child, *child.children(recursive=True)]
                pythons = [p for p in tree if p.name().startswith("python")]
                if len(pythons) <= 1 and all(p.name() in WARM_NAMES or p in pythons for p in tree):
                    if all("inside.py" in " ".join(p.cmdline()) for p in pythons):
                        trees.append({p.pid for p in tree})
        return set().union(*trees) if len(trees) <= self.slots else set()

    def leftovers(self) -> list[str]:
        """Processes of its executions still alive: children of the service, or of the slots' uids (the slots'
        warm processes aside: they are waiting for an execution, not left by one). A slot's next warm process
        starts as its last execution ends: what is found is looked at again for up to a second, to let one that
        was starting be recognised."""
        deadline = time.monotonic() + 1.0
        while (found := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def _leftovers(self) -> list[str]:
        found = []
        warm = self.warm() if self.process.alive() else set()
        if self.process.alive():
            found += [
                f"{p.pid} (child)"
                for p in psutil.Process(self.process.pid).children(recursive=True)
                if p.pid not in warm
            ]
        uids = range(self.uid_base, self.uid_base + self.slots)
        for p in psutil.process_iter(["uids", "name", "status"]):
            if p.info["uids"] and p.info["uids"].real in uids and p.info["status"] != psutil.STATUS_ZOMBIE:
                if p.pid not in warm:
                    found.append(f"{p.pid} {p.info['name']} (uid {p.info['uids'].real})")
        return found

    async def serving(self) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
        return reply.status == health_pb2.HealthCheckResponse.SERVING


WARM_NAMES = {"setpriv", "prlimit", "bwrap"}  # what a warm process is before and around its interpreter


def start_sandbox(base: Path, uid_base: int, *, as_user: int | None = None, **env: str) -> Sandbox:
    """`fleet serve sandbox` with `env` (SANDBOX_* settings) on a free port; ready when its health says SERVING.
    `as_user`: the service itself runs as that uid (not root), with Debian's python3 on this environment's
    packages (this environment's own interpreter lives under /root, which that uid cannot read)."""
    tmp = Path(tempfile.mkdtemp(prefix="fleet-sandbox-test-"))  # not under pytest's dir: the slots' uids enter it
    tmp.chmod(0o1777)
    port = free_port()
    argv = [sys.executable, "-m", "services.cli", "serve", "sandbox"]
    if as_user is not None:
        ours = f"{sys.version_info.major}.{sys.version_info.minor}"
        check = [DEBIAN_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        theirs = subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip()
        assert theirs == ours, f"{DEBIAN_PYTHON} is Python {theirs}; this environment's packages are built for {ours}"
        argv = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups", "--", DEBIAN_PYTHON, *argv[1:]]
        site = sysconfig.get_path("purelib")
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}:{site}", **env}
    process = ManagedProcess(
        "sandbox",
        argv,
        log_dir=base,
        env={
            "GRPC_PORT": str(port),
            "METRICS_PORT": "0",
            "LOG_FORMAT": "text",
            "TMPDIR": str(tmp),
            "SANDBOX_UID_BASE": str(uid_base),
            SECRET_VAR: SECRET,
            **env,
        },
        inherit_env=as_user is None,
        cwd=ROOT,
    )
    start_component(process, grpc_serving(f"127.0.0.1:{port}"), address=f"127.0.0.1:{port}", timeout=60)
    return Sandbox(
        process,
        port,
        tmp,
        uid_base,
        int(env.get("SANDBOX_CONCURRENCY", SandboxSettings.model_fields["sandbox_concurrency"].default)),
    )


def stop_sandbox(sandbox: Sandbox) -> None:
    """Stop it by PID (SIGTERM: graceful); then neither it, nor its executions, nor their files are left."""
    leftovers = sandbox.leftovers()
    assert sandbox.process.stop() == 0, sandbox.process.log_tail()
    assert not sandbox.process.alive()
    assert not leftovers and not sandbox.leftovers(), leftovers
    assert not list(sandbox.tmp.iterdir()), f"left in the service's TMPDIR: {list(sandbox.tmp.iterdir())}"
    sandbox.tmp.rmdir()
    assert "Traceback" not in sandbox.process.read_log(), sandbox.process.log_tail()
