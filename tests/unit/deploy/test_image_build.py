"""The images' builder stage, replayed offline: the files it COPYs (filtered by .dockerignore), the stub generation
from specs/ and the wheel build. Catches a .dockerignore or COPY that leaves out what the package needs, stubs
that do not generate, and package data (the dashboard's static files) missing from the wheel."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "docker" / "orchestrator.Dockerfile"  # the builder stage is the same in all of them


def ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        parts = relative.split("/")
        # A pattern matches the path or any of its parent folders (Docker excludes whole folders).
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            return True
        if pattern.startswith("**/") and any(fnmatch.fnmatch(p, bare) for p in parts):
            return True
    return False


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's /src: what its COPY instructions take from the build context."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    text = DOCKERFILE.read_text()
    start = text.index(" AS builder")
    builder = text[start : text.index("\nFROM ", start)]
    dest = tmp_path_factory.mktemp("src")
    copies = [line.split()[1:] for line in builder.splitlines() if line.startswith("COPY ")]
    assert copies, "the builder copies nothing"
    for *sources, target in copies:
        for source in sources:
            src = ROOT / source.rstrip("/")
            assert src.exists(), f"COPY {source}: not in the repository"
            assert not ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
            to = Path(target) if target.startswith("/") else dest / target
            if to.is_absolute() and not str(to).startswith(str(dest)):
                to = dest / "_abs" / to.relative_to("/")
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if ignored(rel, patterns):
                    continue
                if src.is_file():
                    out = to / f.name if target.endswith("/") or to == dest else to
                else:
                    out = to / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    return dest


def test_dockerignore_keeps_generated_stubs_out(context):
    assert not (context / "gen").exists()
    assert (context / "specs").is_dir() and (context / "services" / "cli.py").is_file()
    assert not list(context.rglob("__pycache__"))


def test_stubs_generate_and_the_wheel_holds_what_the_services_need(context, tmp_path):
    env = {**os.environ, "PY": sys.executable}
    gen = subprocess.run(["bash", "scripts/gen_protos.sh"], cwd=context, env=env, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for service in ("orchestrator", "context", "ray_executor"):
        assert f"fleet/{service}/v1/{service}_pb2_grpc.py" in names, f"no stubs for {service}"
        assert f"services/{service}/main.py" in names
    assert "services/monitoring/main.py" in names
    # Every proto's stubs and every service's entry point (the sandbox's included, once it is there).
    for proto in (ROOT / "specs").glob("fleet/*/v1/*.proto"):
        stub = proto.relative_to(ROOT / "specs").with_name(f"{proto.stem}_pb2_grpc.py").as_posix()
        assert stub in names, f"no stubs for {proto.relative_to(ROOT)}"
    for main in (ROOT / "services").glob("*/main.py"):
        assert main.relative_to(ROOT).as_posix() in names, f"{main.relative_to(ROOT)} is not in the wheel"
    static = ROOT / "services" / "monitoring" / "static"
    for f in static.iterdir():
        assert f"services/monitoring/static/{f.name}" in names, f"the dashboard's {f.name} is not in the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert re.search(r"^fleet = services\.cli:main$", zipfile.ZipFile(wheel).read(entry).decode(), re.M)


def test_pip_is_pinned_in_every_builder_never_upgraded_to_whatever_is_newest():
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        assert "--upgrade pip" not in text and "-U pip" not in text, f"{dockerfile.name}: pip upgraded, not pinned"
        assert re.search(r"/bin/pip install pip==\d+(\.\d+)+ ", text), f"{dockerfile.name}: no pinned pip"


@pytest.mark.parametrize(
    "image",
    sorted(
        p.stem
        for p in (ROOT / "deploy" / "docker").glob("*.Dockerfile")
        if "/opt/fleet/bin/pip uninstall" in p.read_text()
    ),
)
def test_a_service_image_serves_without_what_its_dockerfile_uninstalls(image):
    """Slim images uninstall packages their service never uses (Ray, kubernetes-validate, ruff): `fleet serve` of it
    must import with those blocked (the build checks it again inside the image)."""
    text = (ROOT / "deploy" / "docker" / f"{image}.Dockerfile").read_text()
    (packages,) = re.findall(r"/opt/fleet/bin/pip uninstall -y ([^\\\n&]+)", text)
    modules = {p.strip().replace("-", "_") for p in packages.split()}
    main = f"services.{image.replace('-', '_')}.main"
    script = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(modules)!r}:
            raise ImportError(f"{{name}} is not in the {image} image")
sys.meta_path.insert(0, Block())
for name in ("services.cli", {main!r}):
    importlib.import_module(name)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
