"""The built images, run as the manifests run them (`make test-images`: builds them, then `pytest -m images`).

Marked `images` and left out of a plain `pytest` run (they need the images built first): `-m images` (or any
`-m` expression naming it) selects them. The engine is CONTAINER_ENGINE (docker or podman; default: docker when a
Docker engine answers, else podman with deploy/podman/*.conf). Containers use the host's network: each one gets
its own free port by environment and reaches the NATS, Valkey and FalkorDB the fixtures start on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = os.environ.get("IMAGE_REGISTRY", "swe-ai-fleet")


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


TAG = os.environ.get("IMAGE_TAG") or project_version()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the image tests unless the -m expression asks for them (`make test-images` does)."""
    if "images" in (config.option.markexpr or ""):
        return
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        (drop if here in Path(item.fspath).parents else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def detect_engine() -> str:
    engine = os.environ.get("CONTAINER_ENGINE") or os.environ.get("DOCKER")
    if engine:
        return engine
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0:
        return "docker"
    return "podman"


@dataclass
class Engine:
    """The container engine's CLI, with the podman configuration of the repository unless the caller set one."""

    path: str
    env: dict[str, str]
    started: list[str] = field(default_factory=list)

    @property
    def podman(self) -> bool:
        return Path(self.path).name == "podman"

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.path, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{Path(self.path).name} {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def image(self, name: str) -> str:
        """`<registry>/<name>:<tag>`, failing with what to run when it is not built."""
        ref = f"{REGISTRY}/{name}:{TAG}"
        if self.run("image", "inspect", ref, check=False).returncode != 0:
            pytest.fail(f"image {ref} is not built here: run `make images` (or `make test-images`)", pytrace=False)
        return ref

    def size_mb(self, ref: str) -> float:
        out = self.run("image", "inspect", ref, "--format", "{{.Size}}").stdout.strip()
        return int(out) / 1e6

    def start(self, name: str, args: list[str], command: list[str] | None = None) -> Container:
        cname = f"fleet-test-{name}-{uuid.uuid4().hex[:8]}"
        self.run("run", "-d", "--name", cname, *args, self.image(name), *(command or []))
        self.started.append(cname)
        return Container(self, name, cname)

    def remove_all(self) -> None:
        """Remove every container started here; a removal that fails (podman 4.3 once left a vLLM container behind,
        stopped but not removed) is tried again, and one still there is reported."""
        for cname in self.started:
            for _ in range(3):
                proc = self.run("rm", "-f", "-t", "2", cname, check=False, timeout=60)
                if self.run("container", "inspect", cname, check=False).returncode != 0:
                    break
                time.sleep(2)
            else:
                print(f"container {cname} could not be removed: {proc.stderr.strip()}")
        self.started.clear()


@dataclass
class Container:
    engine: Engine
    image: str
    name: str

    def logs(self, lines: int = 40) -> str:
        proc = self.engine.run("logs", "--tail", str(lines), self.name, check=False)
        return (proc.stdout + proc.stderr).strip()

    def running(self) -> bool:
        proc = self.engine.run("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.engine.run("exec", self.name, *command, check=False, timeout=timeout)

    def fail(self, what: str) -> None:
        """Fail naming the image and its last log lines."""
        state = "running" if self.running() else "exited"
        pytest.fail(
            f"image {self.image} ({state}): {what}\n--- last log lines of {self.name} ---\n{self.logs()}",
            pytrace=False,
        )

    def wait(self, check, what: str, timeout: float = 120.0) -> object:
        """Poll `check()` until it returns something truthy; fail (image + logs) on timeout or container exit."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except Exception as e:
                last = e
            else:
                if last:
                    return last
            if not self.running():
                self.fail(f"exited before {what} (last check: {last!r})")
            time.sleep(1)
        self.fail(f"no {what} within {timeout:g} s (last check: {last!r})")
        return None


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    path = shutil.which(detect_engine())
    if path is None:
        pytest.fail(
            f"container engine {detect_engine()!r} not found: run ./scripts/install_container_tools.sh "
            "(what `make test-images` runs) or start Docker",
            pytrace=False,
        )
    env = dict(os.environ)
    if Path(path).name == "podman":
        env.setdefault("CONTAINERS_CONF", str(ROOT / "deploy" / "podman" / "containers.conf"))
        env.setdefault("CONTAINERS_STORAGE_CONF", str(ROOT / "deploy" / "podman" / "storage.conf"))
    running = Engine(path, env)
    yield running
    running.remove_all()


@pytest.fixture(scope="session")
def rendered() -> list[dict]:
    """deploy/k8s/base rendered by kustomize (`kubectl kustomize`), as `kubectl apply -k` would send it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: `make setup` installs it (scripts/install_system_packages.sh)", pytrace=False)
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s" / "base")], capture_output=True, text=True, check=True
    ).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def find(objects: list[dict], kind: str, name: str) -> dict:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} {name} in the rendered manifests")


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)
