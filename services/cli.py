"""`fleet`: the front door. `fleet --help` lists the commands."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from services.common import events as catalog
from services.common.errors import FleetError
from services.common.settings import FleetSettings, SettingsError, load_settings

app = typer.Typer(help="SWE AI Fleet: councils of LLM agents deliberating on software tasks.", no_args_is_help=True)
streams_app = typer.Typer(help="JetStream streams of the event catalog.", no_args_is_help=True)
events_app = typer.Typer(help="The event catalog's exported contracts.", no_args_is_help=True)
infra_app = typer.Typer(help="Local infrastructure: NATS, Valkey, FalkorDB on loopback.", no_args_is_help=True)
llm_app = typer.Typer(help="The local LLM: vLLM (CPU) in its own venv, two cached models.", no_args_is_help=True)
councils_app = typer.Typer(help="Councils of the orchestrator (reads ORCHESTRATOR_ADDRESS).", no_args_is_help=True)
app.add_typer(streams_app, name="streams")
app.add_typer(events_app, name="events")
app.add_typer(infra_app, name="infra")
app.add_typer(llm_app, name="llm")
app.add_typer(councils_app, name="councils")
deliberations_app = typer.Typer(help="Deliberations of the running fleet.", no_args_is_help=True)
app.add_typer(deliberations_app, name="deliberations")

console = Console()
err = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("orchestrator", "context", "ray-executor", "sandbox", "monitoring")


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _run(coro: object) -> object:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except SettingsError as e:
        raise _fail(str(e), 2) from None
    except FleetError as e:
        raise _fail(e.message) from None


# --- serve -------------------------------------------------------------------------------------------------


@app.command()
def serve(service: Annotated[str, typer.Argument(help=" | ".join(SERVICES))]) -> None:
    """Start one service (the command the container images run)."""
    if service not in SERVICES:
        raise _fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}", 2)
    import importlib

    try:
        module = importlib.import_module(f"services.{service.replace('-', '_')}.main")
    except ModuleNotFoundError as e:
        raise _fail(f"service {service} is not available in this build ({e})") from None
    try:
        module.run()
    except SettingsError as e:
        raise _fail(str(e), 2) from None
    except FleetError as e:  # a known reason it cannot start (the sandbox without bwrap, ...)
        raise _fail(e.message) from None


# --- streams -------------------------------------------------------------------------------------------------


@streams_app.command("init")
def streams_init() -> None:
    """Create or update every stream of the catalog (idempotent). Reads NATS_URL and STREAM_* settings."""
    from services.common.bus import connect_nats, provision_streams

    async def go() -> dict[str, str]:
        settings = load_settings(FleetSettings)
        nc = await connect_nats(settings.nats_url, "fleet-streams-init")
        try:
            return await provision_streams(nc.jetstream(), settings)
        finally:
            await nc.close()

    result = _run(go())
    table = Table("stream", "subjects", "result")
    for name, outcome in result.items():  # type: ignore[union-attr]
        table.add_row(name, " ".join(catalog.STREAMS[name].subjects), outcome)
    console.print(table)


# --- events --------------------------------------------------------------------------------------------------


@events_app.command("export")
def events_export(
    out: Annotated[Path, typer.Option(help="specs folder to write into")] = ROOT / "specs",
) -> None:
    """Write specs/events/*.schema.json and specs/asyncapi.yaml from the catalog."""
    written = export_contracts(out)
    console.print(f"wrote {len(written)} files under {out}")


def export_contracts(out: Path) -> list[Path]:
    events_dir = out / "events"
    events_dir.mkdir(parents=True, exist_ok=True)
    schemas = catalog.json_schemas()
    for stale in events_dir.glob("*.json"):
        if stale.name not in schemas:
            stale.unlink()
    written = []
    for name, schema in schemas.items():
        path = events_dir / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    asyncapi = out / "asyncapi.yaml"
    asyncapi.write_text(
        "# Generated from services/common/events.py by `make events`; do not edit.\n"
        + yaml.safe_dump(catalog.asyncapi_document(), sort_keys=False, width=110)
    )
    written.append(asyncapi)
    return written


# --- infra ---------------------------------------------------------------------------------------------------


@infra_app.command("up")
def infra_up(
    base_dir: Annotated[Path, typer.Option(help="data and logs go here")] = ROOT / ".fleet" / "infra",
) -> None:
    """Start NATS JetStream, Valkey and FalkorDB (Bolt) on free loopback ports until Ctrl-C."""
    from services.local.infra import LocalInfra

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalInfra(base_dir) as infra:
        table = Table("component", "endpoint", "pid", "state", "log")
        for c in infra.components:
            table.add_row(c.name, c.address, str(c.pid), c.state, str(c.log_path))
        console.print(table)
        console.print("environment for the services:")
        for k, v in infra.env().items():
            console.print(f"  export {k}={v!r}")
        console.print("[dim]Ctrl-C stops everything.[/dim]")
        sys.stdout.flush()
        stop.wait()
    console.print("stopped")


@infra_app.command("down")
def infra_down(
    base_dir: Annotated[Path, typer.Option(help="the folder `fleet infra up` used")] = ROOT / ".fleet" / "infra",
) -> None:
    """Stop an infrastructure started by `fleet infra up` (e.g. in the background), by the PIDs it recorded."""
    from services.local.infra import stop_infra

    outcome = stop_infra(base_dir)
    if not outcome:
        console.print(f"nothing to stop: no state in {base_dir}")
    for name, what in outcome.items():
        console.print(f"{name}: {what}")


# --- llm -----------------------------------------------------------------------------------------------------


@llm_app.command("setup")
def llm_setup(
    force: Annotated[bool, typer.Option(help="reinstall and rebuild even if the cache is complete")] = False,
) -> None:
    """Install vLLM (CPU) in its own venv and build the local models (once, cached outside the repository).

    One line per step with its size and time (`cached` when there was nothing to do); pip's and the converters'
    output go to the log file it names, and to the terminal only when a step fails (its last lines)."""
    from contextlib import contextmanager

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from services.local.vllm import SetupFailed, cache_dir, duration, setup

    @contextmanager
    def running(what: str):
        if not console.is_terminal:  # a log (CI, make): a line when a long step starts, one when it ends
            console.print(f"  {what} …", highlight=False, markup=False, soft_wrap=True)
            yield
            return
        spinner = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        )
        with spinner:
            spinner.add_task(f"{what} …")
            yield

    log_path = cache_dir() / "logs" / "setup.log"
    console.print(
        f"vLLM (CPU) and the local models in {cache_dir()} (log: {log_path})", highlight=False, soft_wrap=True
    )
    started = datetime.now(UTC)
    try:
        report = setup(
            force=force,
            echo=lambda line: console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True),
            status=running,
        )
    except SetupFailed as e:
        for line in e.tail:
            err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
        raise _fail(f"{e.step} failed (exit {e.code}) after {duration(e.seconds)}; the whole output: {e.log}") from None
    took = (datetime.now(UTC) - started).total_seconds()
    console.print(f"vLLM ready ({duration(took)}; cached: {', '.join(report.skipped) or 'nothing'})", highlight=False)


@llm_app.command("serve")
def llm_serve(
    model: Annotated[str, typer.Option(help="qwen3-tiny | smollm2-135m")] = "smollm2-135m",
    port: Annotated[int | None, typer.Option(help="default: a free loopback port")] = None,
    log_dir: Annotated[Path, typer.Option(help="the server log goes here")] = ROOT / ".fleet" / "llm",
) -> None:
    """Start the real vLLM OpenAI-compatible server on loopback until Ctrl-C (stopped by PID)."""
    from services.local.processes import ProcessStartError
    from services.local.vllm import MODELS, VLLMNotInstalled, start_vllm

    if model not in MODELS:
        raise _fail(f"unknown model {model!r}; one of: {', '.join(MODELS)}", 2)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"starting vLLM with {model} (1-2 min on 2 CPU cores; log in {log_dir}) ...")
    try:
        server = start_vllm(model, log_dir, port)
    except VLLMNotInstalled as e:
        raise _fail(str(e)) from None
    except ProcessStartError as e:
        raise _fail(str(e)) from None
    try:
        console.print(f"vLLM ready in {server.started_in:.0f}s (pid {server.pid})")
        console.print(f"  export VLLM_URL={server.url}")
        console.print(f"  export VLLM_MODEL={server.model}")
        console.print("[dim]Ctrl-C stops it.[/dim]")
        sys.stdout.flush()
        while not stop.wait(1.0):
            if not server.alive():
                raise _fail(f"vLLM exited; see {server.log_path}")
    finally:
        server.stop()
    console.print("stopped")


# --- the whole fleet ------------------------------------------------------------------------------------------

ModelOption = Annotated[str, typer.Option(help="local model for vLLM: smollm2-135m (real weights) or qwen3-tiny")]
LlmUrlOption = Annotated[str, typer.Option("--llm-url", help="use this OpenAI-compatible server instead of vLLM")]
LlmModelOption = Annotated[str, typer.Option("--llm-model", help="the model name to ask --llm-url for")]
ExecutorOption = Annotated[str, typer.Option(help="where agent calls run: ray (the ray-executor) or in-process")]
FleetDirOption = Annotated[Path, typer.Option("--base-dir", help="logs, state and endpoints.json go here")]


def _start_fleet(base_dir: Path, model: str, llm_url: str, llm_model: str, executor: str):
    """Start a LocalFleet with a live status table; SIGTERM stops it as Ctrl-C does."""
    from rich.live import Live

    from services.local.fleet import FleetOptions, LocalFleet, rows
    from services.local.processes import ProcessStartError

    if executor not in ("ray", "in-process"):
        raise _fail(f"--executor: must be ray or in-process, got {executor!r}", 2)

    def table(fleet: LocalFleet) -> Table:
        t = Table("component", "endpoint", "state", title=f"fleet ({fleet.log_dir} has the logs)")
        for name, address, state in rows(fleet):
            colour = "green" if state.startswith("ready") else "red" if state == "failed" else "yellow"
            t.add_row(name, address, f"[{colour}]{state}[/{colour}]")
        return t

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `fleet down` / kill: stop cleanly, by PID
    options = FleetOptions(base_dir=base_dir, model=model, llm_url=llm_url, llm_model=llm_model, executor=executor)
    fleet = LocalFleet(options)
    with Live(table(fleet), console=console, refresh_per_second=4, transient=False) as live:
        fleet.on_change = lambda f: live.update(table(f))
        try:
            fleet.start()
        except ProcessStartError as e:
            raise _fail(str(e)) from None
        except (RuntimeError, FleetError) as e:
            raise _fail(str(e)) from None
    console.print()
    return fleet


@app.command()
def up(
    model: ModelOption = "smollm2-135m",
    llm_url: LlmUrlOption = "",
    llm_model: LlmModelOption = "",
    executor: ExecutorOption = "ray",
    base_dir: FleetDirOption = ROOT / ".fleet",
) -> None:
    """Start the whole fleet on free loopback ports (NATS, Valkey, FalkorDB, Ray, vLLM and the four services)
    until Ctrl-C; writes the endpoints to <base-dir>/endpoints.json. `fleet down` stops it from elsewhere."""
    fleet = _start_fleet(base_dir, model, llm_url, llm_model, executor)
    try:
        console.print(f"endpoints: {fleet.base_dir / 'endpoints.json'}")
        console.print(
            f"every call is authenticated (issuer {fleet.endpoints['issuer']}); your token, every role: "
            f"{fleet.tokens['user']} (the CLI sends it; the dashboard asks for it; "
            "`fleet token --user alice@example.com --role product-owner` mints more)"
        )
        console.print(f"dashboard: [bold]{fleet.endpoints['monitoring']}[/bold]   Ctrl-C stops everything.")
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    console.print("stopped")


@app.command()
def down(base_dir: FleetDirOption = ROOT / ".fleet") -> None:
    """Stop a fleet started by `fleet up` or `fleet demo` (e.g. in the background), by the PIDs it recorded."""
    from services.local.fleet import stop_fleet

    outcome = stop_fleet(base_dir)
    if not outcome:
        console.print(f"nothing to stop: no fleet state in {base_dir}")
    for name, what in outcome.items():
        console.print(f"{name}: {what}")


def _follow_live(endpoints: dict[str, str], approval, timeout: float):
    """`follow` the demo's deliberations: on a terminal a live table of the agents (phase, tokens streamed,
    elapsed) under the lifecycle lines; otherwise (a log, a test) a plain line per event."""
    from rich.live import Live

    from services.local.demo import follow
    from services.local.live import CouncilBoard

    def say(line: str) -> None:
        console.print(line, highlight=False)

    if not console.is_terminal:
        return _run(follow(endpoints, approval, say, timeout))
    board = CouncilBoard()
    with Live(console=console, get_renderable=board.render, refresh_per_second=4, transient=False):
        return _run(follow(endpoints, approval, say, timeout, board=board))


@app.command()
def demo(
    once: Annotated[bool, typer.Option("--once", help="stop the fleet and exit after the results")] = False,
    model: ModelOption = "smollm2-135m",
    llm_url: LlmUrlOption = "",
    llm_model: LlmModelOption = "",
    executor: ExecutorOption = "ray",
    base_dir: FleetDirOption = ROOT / ".fleet",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the deliberations")] = 900.0,
) -> None:
    """Bring the fleet up, approve a sample plan (DEV + QA), follow the deliberations and print the winners.
    Exits non-zero when a deliberation did not complete."""
    from fleet.deliberation.v1 import deliberation_pb2 as dpb
    from services.local.demo import sample_plan

    fleet = _start_fleet(base_dir, model, llm_url, llm_model, executor)
    failed = False
    try:
        approval = sample_plan()
        console.print(
            f"approving plan {approval.plan_id} of story {approval.story_id} for "
            f"{', '.join(str(r) for r in approval.roles or [])}: `fleet approve-plan` does the same"
        )
        try:
            results = _follow_live(fleet.endpoints, approval, timeout)
        except FleetError as e:
            err.print(f"[red]error:[/red] {e}")
            results, failed = [], True
        summary = Table("role", "task", "status", "verified", "winner", "why")
        for result in results:  # type: ignore[union-attr]
            console.rule(f"{result.role} · {result.task_id}")
            print_result(result)
            failed |= result.status != dpb.DELIBERATION_STATUS_COMPLETED
            status = dpb.DeliberationStatus.Name(result.status).removeprefix("DELIBERATION_STATUS_")
            verified = "[green]verified[/green]" if result.verified else "[red]not verified[/red]"
            why = result.verified_reason if result.status == dpb.DELIBERATION_STATUS_COMPLETED else result.error_message
            summary.add_row(result.role, result.task_id, status, verified, result.winner_id or "-", why[:120])
        if results:
            console.print(summary)
        console.print(f"dashboard: [bold]{fleet.endpoints['monitoring']}[/bold]")
        if not once:
            console.print("the fleet keeps running; Ctrl-C stops everything.")
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    console.print("stopped" + (" — some deliberations did not complete" if failed else ""))
    if failed:
        raise typer.Exit(1)


# --- approve-plan ----------------------------------------------------------------------------------------------


@app.command("approve-plan")
def approve_plan(
    story: Annotated[str, typer.Option(help="story id")],
    plan: Annotated[str, typer.Option(help="plan id")],
    approved_by: Annotated[
        str,
        typer.Option("--approved-by", help="who approves, when the fleet does not authenticate (else: the token's)"),
    ] = "",
    roles: Annotated[str, typer.Option(help="comma-separated roles (default: all five)")] = "",
    title: Annotated[str, typer.Option(help="what the plan is about")] = "",
    task: Annotated[
        list[str] | None,
        typer.Option(help="ROLE:TASK_ID:description (repeatable)"),
    ] = None,
    tests: Annotated[
        list[str] | None,
        typer.Option(help="TASK_ID=FILE: the task's visible pytest tests, run against solution.py (repeatable)"),
    ] = None,
    depends: Annotated[
        list[str] | None,
        typer.Option(help="TASK_ID=DEP[,DEP...]: the task starts once these tasks completed (repeatable)"),
    ] = None,
) -> None:
    """Approve a plan through the monitoring API, as the product owner's page does (reads MONITORING_URL, else the
    running local fleet's; sends FLEET_TOKEN, else the local user's token)."""
    from pydantic import ValidationError

    tasks = []
    for item in task or []:
        parts = item.split(":", 2)
        if len(parts) != 3:
            raise _fail(f"--task {item!r}: expected ROLE:TASK_ID:description", 2)
        tasks.append({"role": parts[0].strip().upper(), "task_id": parts[1].strip(), "description": parts[2]})
    by_id = {t["task_id"]: t for t in tasks}
    for option, items in (("--tests", tests), ("--depends", depends)):
        for item in items or []:
            task_id, sep, value = item.partition("=")
            if not sep or task_id.strip() not in by_id:
                raise _fail(f"{option} {item!r}: expected TASK_ID=..., TASK_ID one of the --task ids", 2)
            if option == "--tests":
                by_id[task_id.strip()]["tests"] = _read_tests(value.strip(), option)
            else:
                by_id[task_id.strip()]["depends_on"] = [d.strip() for d in value.split(",") if d.strip()]
    data = {
        "story_id": story,
        "plan_id": plan,
        "approved_by": approved_by or "cli",  # replaced by the token's caller when the fleet authenticates
        "timestamp": datetime.now(UTC).isoformat(),
        "title": title,
        "roles": [r.strip().upper() for r in roles.split(",") if r.strip()] or None,
        "tasks": tasks or None,
    }
    try:
        payload = catalog.PlanApproved.model_validate_json(json.dumps(data))
    except ValidationError as e:
        raise _fail(
            "invalid plan approval:\n" + "\n".join(f"  {'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()),
            2,
        ) from None

    from services.local.demo import publish_approval

    monitoring = _address("monitoring", "MONITORING_URL")
    if not monitoring:
        raise _fail("no monitoring service: set MONITORING_URL, or start a local fleet (`fleet up`)", 2)
    console.print(_run(publish_approval(monitoring, payload, _token_value())))


# --- the running fleet -----------------------------------------------------------------------------------------


@app.command()
def status(base_dir: FleetDirOption = ROOT / ".fleet") -> None:
    """Every component of the running local fleet: its endpoint and whether it answers (exit 1 if one does not)."""
    from services.local.fleet import check_endpoints

    endpoints = _local_fleet(base_dir)
    if not endpoints:
        raise _fail(f"no running fleet in {base_dir} (no endpoints.json): start one with `fleet up`")
    table = Table("component", "endpoint", "health", title=f"fleet of {Path(base_dir) / 'endpoints.json'}")
    down = 0
    for name, address, ok, detail in check_endpoints(endpoints):
        down += not ok
        table.add_row(name, address, f"[green]{detail}[/green]" if ok else f"[red]{detail}[/red]")
    console.print(table)
    if down:
        raise typer.Exit(1)


@app.command("env")
def env_(base_dir: FleetDirOption = ROOT / ".fleet") -> None:
    """`export` lines for the running local fleet's endpoints and the local user's token: eval "$(fleet env)"."""
    import shlex

    from services.local.fleet import client_env

    endpoints = _local_fleet(base_dir)
    if not endpoints:
        raise _fail(f"no running fleet in {base_dir} (no endpoints.json): start one with `fleet up`")
    for name, value in sorted(client_env(endpoints).items()):
        print(f"export {name}={shlex.quote(value)}")


# --- tokens ----------------------------------------------------------------------------------------------------


@app.command()
def token(
    user: Annotated[str, typer.Option(help="who the token is for (its subject; an email also becomes `email`)")],
    role: Annotated[list[str], typer.Option(help="viewer, deliberator, product-owner, admin or service (repeatable)")],
    ttl: Annotated[str, typer.Option(help="how long it is valid: 90s, 30m, 12h, 7d")] = "1h",
    base_dir: FleetDirOption = ROOT / ".fleet",
) -> None:
    """Mint a bearer token from the running local fleet's issuer (prints it: `export FLEET_TOKEN=$(fleet token ...)`)."""
    from services.common.auth import ROLES
    from services.local.issuer import SigningKey, mint

    unknown = [r for r in role if r not in ROLES]
    if unknown:
        raise _fail(f"--role: unknown {', '.join(unknown)} (known: {', '.join(ROLES)})", 2)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(ttl) < 2 or ttl[-1] not in units or not ttl[:-1].isdigit() or int(ttl[:-1]) == 0:
        raise _fail(f"--ttl: expected a positive number with s, m, h or d (e.g. 1h), got {ttl!r}", 2)
    issuer = _local_fleet(base_dir).get("issuer")
    key_file = Path(base_dir) / "auth" / "signing-key.pem"
    if not issuer or not key_file.exists():
        raise _fail(f"no local fleet with an issuer in {base_dir}: start one with `fleet up`")
    email = user if "@" in user else ""
    print(
        mint(
            SigningKey.load_or_create(key_file),
            issuer,
            user,
            role,
            ttl_seconds=int(ttl[:-1]) * units[ttl[-1]],
            email=email,
        )
    )


# --- councils and deliberations (gRPC clients of the orchestrator) ----------------------------------------------


@functools.lru_cache(maxsize=4)  # a command asks for an address and for the token: read and checked once
def _local_fleet(base_dir: str | Path | None = None) -> dict[str, str]:
    """The endpoints of the fleet `fleet up` runs from this checkout (FLEET_DIR, default .fleet), or {}; a stale
    endpoints.json (its fleet killed) fails saying so."""
    from services.local.fleet import StaleFleet, running_endpoints

    try:
        return running_endpoints(base_dir or os.environ.get("FLEET_DIR") or ROOT / ".fleet")
    except StaleFleet as e:
        raise _fail(str(e)) from None


def _address(name: str, variable: str, default: str = "") -> str:
    """The variable, else the running local fleet's endpoint (said on stderr: which fleet this talks to), else
    `default`."""
    if value := os.environ.get(variable):
        return value
    if value := _local_fleet().get(name, ""):
        err.print(f"[dim]{name} {value} (the local fleet's, {os.environ.get('FLEET_DIR') or ROOT / '.fleet'})[/dim]")
        return value
    return default


def _orchestrator_address() -> str:
    """ORCHESTRATOR_ADDRESS, else the running local fleet's orchestrator, else the default port."""
    return _address("orchestrator", "ORCHESTRATOR_ADDRESS", "127.0.0.1:50055")


def _token_value() -> str:
    """The caller's bearer token: FLEET_TOKEN, else the local user's token of the running local fleet, else ""."""
    from services.local.fleet import user_token

    return os.environ.get("FLEET_TOKEN") or user_token(_local_fleet())


def _token():
    from services.common.auth import BearerToken

    return BearerToken(value=_token_value())


async def _ready_channel(address: str, wait_seconds: float):
    from services.common.auth import channel as authenticated_channel

    channel = authenticated_channel(address, _token())
    try:
        await asyncio.wait_for(channel.channel_ready(), wait_seconds)
    except TimeoutError:
        await channel.close()
        raise FleetError(f"orchestrator at {address} not reachable within {wait_seconds:.0f} s") from None
    return channel


@councils_app.command("init")
def councils_init(
    agents: Annotated[int, typer.Option(help="agents per council")] = 3,
    wait_seconds: Annotated[float, typer.Option(help="how long to wait for the orchestrator")] = 120.0,
) -> None:
    """Create the five councils (idempotent: existing ones are kept)."""
    import grpc

    from fleet.orchestrator.v1 import orchestrator_pb2 as pb
    from fleet.orchestrator.v1 import orchestrator_pb2_grpc

    async def go() -> list[tuple[str, str, int]]:
        channel = await _ready_channel(_orchestrator_address(), wait_seconds)
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        rows = []
        try:
            for role in catalog.Role:
                try:
                    reply = await stub.CreateCouncil(pb.CreateCouncilRequest(role=role, num_agents=agents))
                    rows.append((reply.council_id, "created", len(reply.agent_ids)))
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise FleetError(f"CreateCouncil {role}: {e.code().name}: {e.details()}") from None
                    listed = await stub.ListCouncils(pb.ListCouncilsRequest(role_filter=role))
                    rows.append((listed.councils[0].council_id, "exists", listed.councils[0].num_agents))
        finally:
            await channel.close()
        return rows

    table = Table("council", "result", "agents")
    for council_id, outcome, n in _run(go()):  # type: ignore[union-attr]
        table.add_row(council_id, outcome, str(n))
    console.print(table)


@app.command()
def deliberate(
    task: Annotated[str, typer.Option(help="what to deliberate on")],
    role: Annotated[str, typer.Option(help="DEV, QA, ARCHITECT, DEVOPS or DATA")] = "DEV",
    task_id: Annotated[str, typer.Option(help="task id (default: a new one)")] = "",
    requirement: Annotated[list[str] | None, typer.Option(help="a requirement (repeatable)")] = None,
    rounds: Annotated[int, typer.Option(help="peer-review rounds")] = 1,
    timeout: Annotated[float, typer.Option(help="deadline in seconds")] = 600.0,
    story: Annotated[str, typer.Option(help="story id, to deliberate with its context")] = "",
    tests: Annotated[
        str, typer.Option(help="a pytest file: the task's visible tests, run in the sandbox against solution.py")
    ] = "",
) -> None:
    """Run a deliberation on the orchestrator and print the ranking and the winner (reads ORCHESTRATOR_ADDRESS)."""
    from fleet.deliberation.v1 import deliberation_pb2 as dpb
    from fleet.orchestrator.v1 import orchestrator_pb2 as pb
    from fleet.orchestrator.v1 import orchestrator_pb2_grpc

    request = pb.DeliberateRequest(
        task_id=task_id or catalog.new_id("task"),
        task_description=task,
        role=role,
        story_id=story,
        constraints=dpb.Constraints(
            requirements=requirement or [],
            timeout_seconds=timeout,
            rounds=rounds,
            tests=_read_tests(tests, "--tests") if tests else "",
        ),
    )

    live = console.is_terminal
    board = None
    if live:
        from services.local.live import CouncilBoard

        board = CouncilBoard()

    async def go():
        import grpc

        channel = await _ready_channel(_orchestrator_address(), 10)
        tokens = await _token_stream(board) if board is not None else None
        try:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            async for update in stub.StreamDeliberation(pb.StreamDeliberationRequest(deliberation=request)):
                if not update.HasField("progress"):
                    return update.result
                p = update.progress
                if board is not None:
                    board.progress(p)
                else:
                    err.print(f"[dim]{p.phase:<9} {p.kind:<18} {p.agent_id} {p.detail}[/dim]")
        except grpc.aio.AioRpcError as e:
            raise FleetError(f"{e.code().name}: {e.details()}") from None
        finally:
            await channel.close()
            if tokens is not None:
                await tokens.close()

    if board is not None:
        from rich.live import Live

        with Live(console=console, get_renderable=board.render, refresh_per_second=4):
            result = _run(go())
    else:
        result = _run(go())
    print_result(result)
    if result.status != dpb.DELIBERATION_STATUS_COMPLETED:  # type: ignore[union-attr]
        raise typer.Exit(1)


async def _token_stream(board):
    """Feed `board` the agents' streamed tokens from NATS (NATS_URL, else the local fleet's), best effort: without a
    reachable NATS the live view shows phases and the exact counts of finished answers only. Returns the
    connection (to close), or None."""
    import nats

    url = os.environ.get("NATS_URL") or _local_fleet().get("nats", "")
    if not url:
        return None

    async def quiet(_: Exception) -> None:
        return None

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False, error_cb=quiet)
    except Exception:  # the tokens are a nicety; the deliberation goes on without them
        return None

    async def on_chunk(msg) -> None:
        try:
            board.feed(catalog.parse_event(msg.data, msg.subject).payload)
        except catalog.InvalidEvent:
            return

    for subject in catalog.STREAMS[catalog.Streams.TOKEN_STREAMS].subjects:
        await nc.subscribe(subject, cb=on_chunk)
    return nc


@councils_app.command("list")
def councils_list() -> None:
    """The councils and their agents (the orchestrator's ListCouncils)."""
    import grpc

    from fleet.orchestrator.v1 import orchestrator_pb2 as pb
    from fleet.orchestrator.v1 import orchestrator_pb2_grpc

    async def go():
        channel = await _ready_channel(_orchestrator_address(), 10)
        try:
            return await orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListCouncils(
                pb.ListCouncilsRequest(include_agents=True), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise FleetError(f"ListCouncils: {e.code().name}: {e.details()}") from None
        finally:
            await channel.close()

    reply = _run(go())
    table = Table("council", "role", "agents")
    for c in reply.councils:  # type: ignore[union-attr]
        agents = ", ".join(f"{a.agent_id} (t={a.temperature:g})" for a in c.agents)
        table.add_row(c.council_id, c.role, f"{c.num_agents}: {agents}" if agents else str(c.num_agents))
    console.print(table)


@deliberations_app.command("list")
def deliberations_list(
    story: Annotated[str, typer.Option(help="only this story's")] = "",
    limit: Annotated[int, typer.Option(help="at most this many, most recent first")] = 20,
) -> None:
    """Deliberations seen by the monitoring service (reads MONITORING_URL, else the local fleet's)."""
    import httpx

    monitoring = _address("monitoring", "MONITORING_URL")
    if not monitoring:
        raise _fail("no monitoring service: set MONITORING_URL, or start a local fleet (`fleet up`)", 2)
    headers = {"Authorization": f"Bearer {token}"} if (token := _token_value()) else {}
    params: dict[str, str | int] = {"limit": limit, **({"story": story} if story else {})}
    try:
        reply = httpx.get(f"{monitoring}/api/deliberations", params=params, headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise _fail(f"monitoring at {monitoring}: {type(e).__name__}: {e}") from None
    if reply.status_code != 200:
        raise _fail(f"monitoring at {monitoring}: {reply.status_code} {reply.text[:300]}")
    table = Table("task", "role", "status", "verified", "story", "winner", "tokens")
    for d in reply.json():
        verified = {True: "yes", False: "no"}.get(d.get("verified"), "-")
        winner = d.get("winner_id") or "-"
        table.add_row(d["task_id"], d["role"], d["status"], verified, d["story_id"], winner, str(d["total_tokens"]))
    console.print(table)


@deliberations_app.command("show")
def deliberations_show(task_id: Annotated[str, typer.Argument(help="the task's id")]) -> None:
    """The latest deliberation of a task: ranking, the winner's content (its code) and its checks."""
    import grpc

    from fleet.orchestrator.v1 import orchestrator_pb2 as pb
    from fleet.orchestrator.v1 import orchestrator_pb2_grpc

    async def go():
        channel = await _ready_channel(_orchestrator_address(), 10)
        try:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            return (
                await stub.GetDeliberationResult(pb.GetDeliberationResultRequest(task_id=task_id), timeout=10)
            ).result
        except grpc.aio.AioRpcError as e:
            raise FleetError(f"{e.code().name}: {e.details()}") from None
        finally:
            await channel.close()

    print_result(_run(go()))


def _read_tests(path: str, option: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise _fail(f"{option} {path}: {e.strerror or e}", 2) from None


def print_result(message) -> None:
    """A deliberation result (the proto, read through the contract's one mapping): outcome, verification,
    ranking, the winner's content (its code) and what its checks found."""
    from rich.syntax import Syntax

    from services.deliberation.grounding import program_of
    from services.deliberation.proto import result_from_proto

    result = result_from_proto(message)
    console.print(
        f"[bold]{result.task_id}[/bold] ({result.role}): {result.status} in {result.duration_ms:.0f} ms, "
        f"{result.total_tokens} tokens" + (f" — {result.error_message}" if result.error_message else "")
    )
    if result.phase_durations_ms:
        phases = " · ".join(f"{phase} {ms / 1000:.1f} s" for phase, ms in result.phase_durations_ms.items())
        console.print(f"phases: {phases}", highlight=False)
    table = Table("rank", "author", "score", "peer", "checks", "gates", "errors")
    for r in result.results:
        applicable = [c for c in r.checks if c.applicable]
        blocked = [c.name for c in r.checks if c.blocks]
        table.add_row(
            str(r.rank),
            r.proposal.author_id,
            f"{r.score:.2f}",
            f"{r.peer_score:.2f}",
            f"{sum(c.passed for c in applicable)}/{len(applicable)} passed",
            "[green]passed[/green]" if not blocked else f"[red]failed {', '.join(blocked)}[/red]",
            str(r.error_count),
        )
    console.print(table)
    winner = result.winner
    if result.selection is not None and winner is not None:
        s = result.selection
        console.print(f"winner: [bold]{result.winner_id}[/bold] (chosen by {s.method} {s.selected_by}): {s.rationale}")
        verdict = "[bold green]VERIFIED[/bold green]" if result.verified else "[bold red]NOT VERIFIED[/bold red]"
        console.print(f"{verdict}: {result.verified_reason}", highlight=False)
        code = program_of(winner.proposal.content).code
        if code.strip():
            console.print(Syntax(code, "python", line_numbers=True, word_wrap=True))
        else:
            console.print(winner.proposal.content, highlight=False, markup=False)
        for c in winner.checks:
            mark = "[green]✓[/green]" if c.passed and c.applicable else "[red]✗[/red]" if c.applicable else "-"
            gate = " (gating)" if c.gating and c.applicable else ""
            console.print(f"  {mark} {c.name}{gate} {c.detail}", highlight=False)
            for f in c.findings[:5]:
                console.print(f"      {f.message}", highlight=False, markup=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)


# --- eval ------------------------------------------------------------------------------------------------------

EVAL_OUTPUT = ROOT / ".fleet" / "eval"


@app.command("eval")
def eval_(
    llm_url: Annotated[str, typer.Option("--llm-url", help="OpenAI-compatible server root (default: VLLM_URL)")] = "",
    llm_model: Annotated[str, typer.Option("--llm-model", help="its model name (default: VLLM_MODEL)")] = "",
    orchestrator: Annotated[str, typer.Option(help="host:port (default: ORCHESTRATOR_ADDRESS)")] = "",
    sandbox: Annotated[str, typer.Option(help="host:port (default: SANDBOX_ADDRESS)")] = "",
    dataset: Annotated[
        Path | None, typer.Option(help="a JSONL file in HumanEval's format (default: the installed HumanEval)")
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="only the first N problems (0: all)")] = 0,
    problems: Annotated[str, typer.Option(help="only these problem ids, comma-separated")] = "",
    modes: Annotated[str, typer.Option(help="comma-separated")] = "single,self-consistency,council,council-no-exec",
    concurrency: Annotated[int, typer.Option(min=1, help="(problem, mode) jobs at once")] = 4,
    seed: Annotated[int, typer.Option(help="shifts the seeds of single and self-consistency")] = 0,
    k: Annotated[int, typer.Option("--k", min=1, help="self-consistency's samples (unless --match-budget)")] = 3,
    match_budget: Annotated[
        bool, typer.Option("--match-budget", help="k from the council's measured tokens per problem")
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=16, help="per LLM call, every mode")] = 512,
    sandbox_timeout: Annotated[float, typer.Option(min=1, max=60, help="seconds per sandbox execution")] = 10.0,
    deliberation_timeout: Annotated[float, typer.Option(min=10, help="deadline of one deliberation, seconds")] = 1800.0,
    output: Annotated[Path, typer.Option(help="records.jsonl, summary.md, plot.png (a rerun resumes)")] = EVAL_OUTPUT,
    base_dir: Annotated[
        Path, typer.Option("--base-dir", help="a local fleet's folder: its endpoints.json fills what is not given")
    ] = ROOT / ".fleet",
) -> None:
    """Does the council beat one agent at equal budget? HumanEval (or --dataset) in four modes, scored on the
    hidden tests in the sandbox: pass@1 with 95% intervals, tokens, paired McNemar tests, a summary and a plot.
    Endpoints: the options, else the environment, else the local fleet's <base-dir>/endpoints.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.eval.dataset import HumanEvalJsonl, installed_humaneval
    from services.eval.modes import Mode
    from services.eval.run import EvalConfig, resolve_endpoints, run_eval

    names = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in {str(x) for x in Mode}]
    if unknown or not names:
        raise _fail(f"--modes: unknown {', '.join(unknown) or 'nothing'}; choose from {', '.join(Mode)}", 2)
    given = {"llm_url": llm_url, "llm_model": llm_model, "orchestrator": orchestrator, "sandbox": sandbox}
    try:
        source = HumanEvalJsonl(dataset) if dataset else installed_humaneval()
    except FleetError as e:
        raise _fail(e.message) from None
    config = EvalConfig(
        dataset=source,
        output=output,
        endpoints=resolve_endpoints(given, os.environ, base_dir),
        modes=tuple(Mode(m) for m in names),
        problems=tuple(p.strip() for p in problems.split(",") if p.strip()),
        limit=limit,
        concurrency=concurrency,
        seed=seed,
        k=k,
        match_budget=match_budget,
        max_tokens=max_tokens,
        sandbox_timeout=sandbox_timeout,
        deliberation_timeout=deliberation_timeout,
    )
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    solved: dict[str, list[int]] = {}

    class Shown:
        def say(self, text: str) -> None:
            bar.console.print(text, highlight=False, markup=False)

        def planned(self, total: int, recorded: int) -> None:
            self.task = bar.add_task("eval", total=total, completed=recorded)
            self.say(f"{total} (problem, mode) pairs, {recorded} already recorded in {output}")

        def recorded(self, record) -> None:
            counts = solved.setdefault(record.mode, [0, 0])
            counts[0] += record.passed
            counts[1] += record.scored
            bar.advance(self.task)
            bar.update(self.task, description=" · ".join(f"{m} {s}/{n}" for m, (s, n) in solved.items()))
            self.say(
                f"{record.problem} {record.mode}: {record.outcome} ({record.tokens} tokens, {record.seconds:.0f} s)"
                + (f" — {record.reason}" if not record.passed else "")
            )

    try:
        with bar:
            outcome = _run(run_eval(config, Shown()))
    except KeyboardInterrupt:
        raise _fail(
            f"interrupted: what was recorded is in {output}; the same command resumes from there", 130
        ) from None
    console.print(outcome.summary.read_text(), highlight=False, markup=False, soft_wrap=True)  # type: ignore[union-attr]
    console.print(f"summary: {outcome.summary}\nplot: {outcome.plot}\nrecords: {output / 'records.jsonl'}")  # type: ignore[union-attr]


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
