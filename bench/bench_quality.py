"""Does the council beat one agent at equal budget, on the local model? `fleet eval` on HumanEval's first N
problems with SmolLM2-135M served by the real vLLM (CPU), all four modes, self-consistency's k matched to the
council's measured tokens, fixed seeds.

    make bench-quality     (or: python -m bench.bench_quality --limit 35 --max-tokens 384 --concurrency 4)

The fleet is the local one `fleet up --executor in-process` starts (services/local/fleet.py): NATS, Valkey,
FalkorDB, vLLM, the sandbox, context, orchestrator and monitoring on loopback ports, agent calls run by the
orchestrator's in-process executor (the same engine as with Ray, without Ray's ~0.8 GiB and 11 processes on two
cores). The sandbox gets its own uid range (SANDBOX_UID_BASE 280000), so it can run beside the test suite's.
Writes bench/results/quality.md (the summary, with this machine's load) and bench/results/quality.png (the plot);
the per-problem records stay in .fleet/bench-quality/eval/records.jsonl (not committed). A new run starts from
scratch unless --resume is given (then it continues the records there, as `fleet eval` does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from services.common.errors import FleetError
from services.eval.dataset import installed_humaneval
from services.eval.records import Record
from services.eval.report import markdown
from services.eval.run import Endpoints, EvalConfig, run_eval
from services.local.fleet import FleetOptions, LocalFleet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASE = ROOT / ".fleet" / "bench-quality"
MODEL = "smollm2-135m"


class Log:
    """Progress as plain log lines, with the time since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.total = self.done = 0

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", flush=True)

    def planned(self, total: int, recorded: int) -> None:
        self.total, self.done = total, recorded
        self.say(f"{total} (problem, mode) pairs, {recorded} already recorded")

    def recorded(self, record: Record) -> None:
        self.done += 1
        self.say(
            f"{self.done}/{self.total} {record.problem} {record.mode}: {record.outcome} "
            f"({record.tokens} tokens, {record.llm_calls} calls, {record.seconds:.0f} s)"
        )


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(args: argparse.Namespace) -> int:
    output = BASE / "eval"
    if not args.resume:
        shutil.rmtree(output, ignore_errors=True)
    os.environ.setdefault("SANDBOX_UID_BASE", "280000")
    log, before = Log(), load()
    log.say(f"starting the local fleet with {MODEL} (in-process executor; vLLM takes 1-2 min) in {BASE} ...")
    with LocalFleet(FleetOptions(base_dir=BASE, model=MODEL, executor="in-process")) as fleet:
        e = fleet.endpoints
        started = time.monotonic() - log.t0
        endpoints = Endpoints(
            e["vllm"], e["vllm_model"], e["orchestrator"], e["sandbox"], dict.fromkeys(
                ("llm_url", "llm_model", "orchestrator", "sandbox"), "the bench's local fleet"
            )
        )  # fmt: skip
        config = EvalConfig(
            dataset=installed_humaneval(),
            output=output,
            endpoints=endpoints,
            limit=args.limit,
            concurrency=args.concurrency,
            seed=args.seed,
            match_budget=True,
            max_tokens=args.max_tokens,
        )
        try:
            outcome = asyncio.run(run_eval(config, log))
        except FleetError as err:
            log.say(f"error: {err.message}")
            return 1
    took = time.monotonic() - log.t0
    facts = [
        *outcome.report.facts,
        ("machine", f"{os.cpu_count()} cores; load average {before} before, {load()} after"),
        ("took", f"{took / 60:.0f} min in all ({started:.0f} s to start the fleet), --concurrency {args.concurrency}"),
    ]
    report = replace(outcome.report, facts=facts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text(markdown(report, "quality.png"))
    shutil.copyfile(outcome.plot, RESULTS / "quality.png")
    print(markdown(report, "quality.png"), flush=True)
    log.say(f"wrote {RESULTS / 'quality.md'} and quality.png; records in {output / 'records.jsonl'}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=35, help="HumanEval's first N problems (~1 min each here, four modes)")
    p.add_argument("--max-tokens", type=int, default=384, help="per LLM call, every mode")
    p.add_argument("--concurrency", type=int, default=4, help="(problem, mode) jobs at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="continue the records of the last run instead of starting anew"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
