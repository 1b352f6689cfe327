"""How much of a deliberation's prompt does vLLM's prefix cache serve? The real vLLM (CPU) server, vLLM's own
counters (GET /metrics), one deliberation and then a second one on the same server.

    make bench-prefix-cache [COMPARE=<commit>]
    (or: python -m bench.bench_prefix_cache --block-size 32 --block-size 0 --deliberations 2 --compare <commit>)

vLLM is started by the project's launcher (`services.local.vllm.start_vllm`, the local fleet's flags) with its
statistics on (`stats=True`: the fleet runs it with --disable-log-stats, which leaves /metrics without vLLM's
counters) and its dev endpoints (to empty the cache between layouts); prefix caching is vLLM v1's default, and the
bench refuses to run when the server's logged config says otherwise. The deliberation is the orchestrator's
in-process runner's (services/orchestrator/main.py): `DeliberationEngine` over `InProcessExecutor(VLLMClient)` with
the served model's window, the checks executed by the real sandbox service (started in this process, its own uid
range); the DEV council of 3 (`make_council`), an ARCHITECT, the demo's DEV task (services/local/demo.py: slugify
with SLUGIFY_TESTS, a new story each time as in the demo; the default constraints but a long deadline, so a busy
machine still reaches SELECT). No context service: the shared system prompt holds the task's tests but no story
context (with one, the shared prefix only grows).

The engine's LLM port is wrapped: the first call of each phase reads /metrics before it is sent (the phases' LLM
calls never overlap: each phase's calls have all answered before the next phase's first call; an overlap would be
reported), so the difference between two reads is one phase's:
  prompt tokens        vllm:prompt_tokens (the answers' usage.prompt_tokens must agree; reported when not)
  queries / hits       vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens looked up / found in the cache)
  hit share            hits / queries: the share of prompt tokens whose KV came from the cache
vLLM caches whole blocks: 128 tokens on CPU by default, 16 on GPU (vLLM's default there). A shared prefix counts in
whole blocks only and a prompt's last partial block never hits, so with prompts of a few hundred tokens the CPU
default understates what the GPU deployment gets; the CPU attention backend takes multiples of 32 only (16 fails
at start: "No common block size for 16"), so 32 is the closest to the GPU's. Each --block-size is one server
(default: 32, then 0 = the CPU default). `--compare COMMIT` runs the same deliberations with services/deliberation/prompts.py as it was at COMMIT
(loaded beside the current one, its builders patched into the engine), on the same server from an empty cache:
the layouts side by side. Writes bench/results/prefix_cache.md and .json (every call, its messages and tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from services.common.llm import VLLMClient
from services.common.sandbox import SandboxClient
from services.deliberation import engine as engine_module
from services.deliberation.domain import DeliberationResult, Role, Task, make_council
from services.deliberation.engine import DeliberationEngine, InProcessExecutor
from services.deliberation.grounding import ProposalChecker
from services.deliberation.llm import LLMRequest, LLMResponse
from services.local.demo import sample_plan
from services.local.vllm import MODELS, start_vllm
from services.sandbox.main import RunningSandbox, start
from services.sandbox.settings import SandboxSettings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VLLM_TIMEOUT = 900.0  # seconds for vLLM to start (slow on a busy box)
UID_BASE = 290_000  # the sandbox's uid range, apart from the test suite's and the other benches'
DEADLINE = 1800.0  # seconds: the task's deadline (the default 300 s can cut a deliberation short on a busy box)
SETTLE = 0.3  # seconds before a read: vLLM records a step's statistics just after it hands out the step's answers
COUNTERS = {
    "queries": "vllm:prefix_cache_queries",
    "hits": "vllm:prefix_cache_hits",
    "prompt": "vllm:prompt_tokens",
    "cached": "vllm:prompt_tokens_cached",
    "generated": "vllm:generation_tokens",
    "requests": "vllm:request_success",
}
PHASE_OF = {"proposal": "GENERATE", "critique": "CRITIQUE", "revision": "REVISE", "scores": "SCORE"}
PHASE_OF["selection"] = "SELECT"


# --- vLLM's counters ----------------------------------------------------------------------------------------------


def parse_counters(text: str) -> dict[str, float]:
    """The COUNTERS from Prometheus text, each summed over its labels (`name_total{...} value`)."""
    wanted = {f"{metric}_total": key for key, metric in COUNTERS.items()}
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def read_counters(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    await asyncio.sleep(SETTLE)
    reply = await http.get(f"{url}/metrics")
    reply.raise_for_status()
    counters = parse_counters(reply.text)
    if not counters["requests"] and "vllm:prefix_cache_queries" not in reply.text:
        raise SystemExit(f"{url}/metrics has no vLLM counters: was vLLM started with --disable-log-stats?")
    return counters


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in COUNTERS}


# --- the engine's LLM port, metered per phase ----------------------------------------------------------------------


@dataclass
class Call:
    deliberation: str
    phase: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    messages: list[dict[str, str]]


@dataclass
class Metered:
    """The LLM port: passes every call to `llm`; reads vLLM's counters before the first call of each phase (and
    when `mark` says so), so consecutive reads bracket one phase's calls."""

    llm: VLLMClient
    read: Callable[[], Awaitable[dict[str, float]]]
    deliberation: str = ""
    marks: list[tuple[tuple[str, str], dict[str, float]]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    _current: tuple[str, str] | None = None
    _in_flight: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def mark(self, key: tuple[str, str]) -> None:
        self.marks.append((key, await self.read()))
        self._current = key

    async def complete(self, request: LLMRequest, on_delta: Any = None) -> LLMResponse:
        key = (self.deliberation, PHASE_OF.get(request.schema_name, request.schema_name))
        async with self._lock:
            if key != self._current:
                if self._in_flight:
                    self.overlaps.append(f"{key[1]} started with {self._in_flight} call(s) of {self._current} open")
                await self.mark(key)
            self._in_flight += 1
        try:
            response = await self.llm.complete(request, on_delta)
        finally:
            self._in_flight -= 1
        self.calls.append(
            Call(
                key[0],
                key[1],
                request.request_id,
                response.usage.prompt_tokens,
                response.usage.completion_tokens,
                [{"role": m.role, "content": m.content} for m in request.messages],
            )
        )
        return response


@dataclass
class Row:
    deliberation: str
    phase: str  # "all" for the deliberation's total
    counters: dict[str, float]
    api_prompt: int  # the answers' usage.prompt_tokens
    calls: int

    @property
    def share(self) -> float:
        q = self.counters["queries"]
        return self.counters["hits"] / q if q else 0.0


def rows_of(meter: Metered) -> list[Row]:
    """One row per (deliberation, phase) from consecutive marks, then one per deliberation (phase "all")."""
    out: list[Row] = []
    totals: dict[str, Row] = {}
    for ((deliberation, phase), before), (_, after) in zip(meter.marks, meter.marks[1:], strict=False):
        if phase == "end":
            continue
        calls = [c for c in meter.calls if (c.deliberation, c.phase) == (deliberation, phase)]
        row = Row(deliberation, phase, delta(after, before), sum(c.prompt_tokens for c in calls), len(calls))
        out.append(row)
        total = totals.setdefault(deliberation, Row(deliberation, "all", dict.fromkeys(COUNTERS, 0.0), 0, 0))
        total.counters = {k: total.counters[k] + row.counters[k] for k in COUNTERS}
        total.api_prompt += row.api_prompt
        total.calls += row.calls
    return out + list(totals.values())


# --- the run -------------------------------------------------------------------------------------------------------


def demo_task() -> Task:
    """The demo's DEV task as the orchestrator builds it from a fresh sample plan (`plan_tasks`): each deliberation
    gets its own story, so its task id differs, as between two runs of the demo."""
    plan = sample_plan()
    dev = plan.tasks[0]
    return Task.create(
        task_id=dev.task_id,
        description=dev.description,
        role=Role.DEV,
        requirements=tuple(dev.requirements),
        story_id=plan.story_id,
        tests=dev.tests or "",
        timeout_seconds=DEADLINE,
    )


# The prompt builders the engine calls; `--compare COMMIT` runs the same deliberations with COMMIT's.
LAYOUT_FUNCTIONS = (
    "system_prompt",
    "generate_messages",
    "critique_messages",
    "revise_messages",
    "score_messages",
    "select_messages",
)


def short_commit(ref: str) -> str:
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", ref]
    return subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()


def layout_at(commit: str) -> dict[str, Any]:
    """services/deliberation/prompts.py as it was at `commit`, loaded as a module of its own: its prompt builders."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:services/deliberation/prompts.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"bench_prompts_at_{commit.replace('~', '_').replace('^', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:services/deliberation/prompts.py", "exec"), module.__dict__)
    return {f: getattr(module, f) for f in LAYOUT_FUNCTIONS}


@contextlib.contextmanager
def layout(functions: dict[str, Any] | None) -> Iterator[None]:
    """The engine builds its prompts with `functions` (None: the working tree's) while inside."""
    if functions is None:
        yield
        return
    saved = {f: getattr(engine_module, f) for f in LAYOUT_FUNCTIONS}
    for f, fn in functions.items():
        setattr(engine_module, f, fn)
    try:
        yield
    finally:
        for f, fn in saved.items():
            setattr(engine_module, f, fn)


async def start_sandbox() -> RunningSandbox:
    settings = SandboxSettings(grpc_port=0, metrics_port=0, sandbox_uid_base=UID_BASE, sandbox_concurrency=2)
    return await start(settings, host="127.0.0.1")


def prefix_caching_on(log_dir: Path) -> str:
    """What the server's log says about prefix caching (vLLM prints its config at start)."""
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "enable_prefix_caching=" in line:
                return line.split("enable_prefix_caching=", 1)[1].split(",", 1)[0]
    return "not found in the log"


async def reset_cache(http: httpx.AsyncClient, url: str) -> None:
    """An empty prefix cache (vLLM's dev endpoint; the server runs with VLLM_SERVER_DEV_MODE=1, on loopback)."""
    for _ in range(20):
        reply = await http.post(f"{url}/reset_prefix_cache")
        reply.raise_for_status()
        if reply.json().get("success"):
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"{url}/reset_prefix_cache kept failing")


@dataclass
class Run:
    label: str  # "block 32, before (7b0d918)"
    meter: Metered
    results: list[DeliberationResult]


async def one_server(
    args: argparse.Namespace, block_size: int, layouts: list[tuple[str, dict[str, Any] | None]], base: Path
) -> tuple[list[Run], str, str]:
    """Start vLLM with `block_size`; per layout: an empty cache, then the deliberations one after another."""
    logs = base / f"block-{block_size or 'default'}"
    extra = ("--block-size", str(block_size)) if block_size else ()
    t0 = time.monotonic()
    print(f"starting vLLM ({args.model}, block size {block_size or 'default'}; logs in {logs})", flush=True)
    vllm = await asyncio.to_thread(
        start_vllm,
        args.model,
        logs,
        timeout=VLLM_TIMEOUT,
        extra_args=extra,
        stats=True,
        env={"VLLM_SERVER_DEV_MODE": "1"},
    )
    caching = await asyncio.to_thread(prefix_caching_on, logs)
    print(f"vLLM at {vllm.url} after {time.monotonic() - t0:.0f}s; enable_prefix_caching={caching}", flush=True)
    runs: list[Run] = []
    sandbox = None
    try:
        if caching != "True":
            raise SystemExit(f"prefix caching is not on in {logs} (enable_prefix_caching={caching})")
        sandbox = await start_sandbox()
        sandbox_client = SandboxClient(f"127.0.0.1:{sandbox.port}")
        async with (
            VLLMClient(vllm.url, vllm.model, timeout=900.0, max_retries=2) as llm,
            httpx.AsyncClient(timeout=30) as http,
        ):
            window = await llm.window()
            council = make_council(Role.DEV, 3)
            architect = make_council(Role.ARCHITECT, 1).agents[0]
            checker = ProposalChecker(sandbox_client)
            for n, (name, functions) in enumerate(layouts, start=1):
                await reset_cache(http, vllm.url)
                run = Run(
                    f"block {block_size or 'default'}, {name}", Metered(llm, partial(read_counters, http, vllm.url)), []
                )
                for i in range(1, args.deliberations + 1):
                    run.meter.deliberation = f"deliberation {i}"
                    engine = DeliberationEngine(InProcessExecutor(run.meter), checker=checker, window=window)
                    t = time.monotonic()
                    with layout(functions):
                        result = await engine.run(demo_task(), council, architect, f"bench-prefix-{block_size}-{n}-{i}")
                    await run.meter.mark((run.meter.deliberation, "end"))
                    run.results.append(result)
                    print(f"{run.label}, deliberation {i}: {result.status} in {time.monotonic() - t:.0f}s", flush=True)
                runs.append(run)
        await sandbox_client.close()
    finally:
        if sandbox is not None:
            await sandbox.stop()
        vllm.stop()
    return runs, caching, window.describe() if window else "unknown"


async def main(args: argparse.Namespace) -> int:
    t0, load_before = time.monotonic(), os.getloadavg()
    base = Path(tempfile.mkdtemp(prefix="bench-prefix-cache-"))
    layouts: list[tuple[str, dict[str, Any] | None]] = []
    if args.compare:
        commit = short_commit(args.compare)
        layouts.append((f"before ({commit})", layout_at(commit)))
    layouts.append(("after" if args.compare else "this layout", None))
    runs: list[Run] = []
    for block_size in args.block_size:
        more, caching, window = await one_server(args, block_size, layouts, base)
        runs += more
    meta = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_state(),
        "model": f"{args.model} (served as {MODELS[args.model].served_as}), {window}",
        "enable_prefix_caching": caching,
        "statuses": "; ".join(
            f"{run.label} {i}: {r.status}, winner {r.winner_id or '-'} by {r.selection.method if r.selection else '-'}"
            for run in runs
            for i, r in enumerate(run.results, start=1)
        ),
        "took": f"{time.monotonic() - t0:.0f} s",
        "machine": f"{os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in os.getloadavg())} after",
        "prompt tokens, vLLM vs the answers' usage": "; ".join(
            f"{run.label} {r.deliberation} {r.phase}: {r.counters['prompt']:,.0f} vs {r.api_prompt:,}"
            for run in runs
            for r in rows_of(run.meter)
            if r.counters["prompt"] != r.api_prompt
        )
        or "equal in every phase",
        "overlapping phases": "; ".join(o for run in runs for o in run.meter.overlaps) or "none",
        "command": "python -m bench.bench_prefix_cache "
        + " ".join(f"--block-size {b}" for b in args.block_size)
        + f" --model {args.model} --deliberations {args.deliberations}"
        + (f" --compare {args.compare}" if args.compare else ""),
    }
    text = markdown(runs, meta)
    print(text, flush=True)
    data = {
        "meta": meta,
        "runs": [
            {
                "label": run.label,
                "rows": [
                    {"deliberation": r.deliberation, "phase": r.phase, **r.counters, "api_prompt": r.api_prompt}
                    for r in rows_of(run.meter)
                ],
                "calls": [c.__dict__ for c in run.meter.calls],
            }
            for run in runs
        ],
    }
    out = Path(args.out)
    await asyncio.to_thread(write, out, args.name, text, data)
    print(f"wrote {out / args.name}.md and .json", flush=True)
    return 0


def write(out: Path, name: str, text: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))


def git_state() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "services/deliberation/prompts.py"]).returncode
    return head + (" (prompts.py differs: the working tree's)" if dirty else "")


def markdown(runs: list[Run], meta: dict[str, Any]) -> str:
    lines = [
        "# Prefix cache: the share of a deliberation's prompt tokens vLLM serves from its cache",
        "",
        "`make bench-prefix-cache` (bench/bench_prefix_cache.py; its docstring says how it measures). vLLM's own",
        "counters, read from GET /metrics before each phase's first call: hit share = vllm:prefix_cache_hits /",
        "vllm:prefix_cache_queries (tokens). Goal: >= 60% per deliberation. Each layout starts from an empty cache;",
        "deliberation 2 is the same task in a new story (another task id) on the same server, after deliberation 1.",
        "",
        "| server, prompt layout | "
        + " | ".join(f"deliberation {i}" for i in range(1, len(runs[0].results) + 1))
        + " |",
        "|---|" + "---:|" * len(runs[0].results),
    ]
    for run in runs:
        totals = [r for r in rows_of(run.meter) if r.phase == "all"]
        lines.append(f"| {run.label} | " + " | ".join(f"**{r.share:.0%}**" for r in totals) + " |")
    lines += [
        "",
        "| server, prompt layout | deliberation | phase | calls | prompt tokens | queries | hits | hit share |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for r in rows_of(run.meter):
            c, b = r.counters, "**" * (r.phase == "all")
            lines.append(
                f"| {run.label} | {r.deliberation} | {b}{r.phase}{b} | {r.calls} | {c['prompt']:,.0f} | "
                f"{c['queries']:,.0f} | {c['hits']:,.0f} | {b}{r.share:.0%}{b} |"
            )
    lines += ["", *(f"- {k}: {v}" for k, v in meta.items() if v not in ([], "", None))]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS), help="a model `make llm` built")
    p.add_argument("--deliberations", type=int, default=2, help="one after another on the same server")
    p.add_argument(
        "--block-size",
        type=int,
        action="append",
        help="vLLM's KV block size, one server each (0: the CPU default, 128); default: 32 (CPU refuses 16) and 0",
    )
    p.add_argument("--compare", default="", help="also run the deliberations with the prompt layout of this commit")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="prefix_cache")
    args = p.parse_args(argv)
    args.block_size = args.block_size or [32, 0]
    return args


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
