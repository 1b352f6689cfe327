"""`fleet`: the front door. `fleet --help` lists the commands."""

from __future__ import annotations

import asyncio
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
councils_app = typer.Typer(help="Councils of the orchestrator (reads ORCHESTRATOR_ADDRESS).", no_args_is_help=True)
app.add_typer(streams_app, name="streams")
app.add_typer(events_app, name="events")
app.add_typer(infra_app, name="infra")
app.add_typer(councils_app, name="councils")

console = Console()
err = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("orchestrator", "context", "ray-executor", "monitoring")


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


# --- approve-plan ----------------------------------------------------------------------------------------------


@app.command("approve-plan")
def approve_plan(
    story: Annotated[str, typer.Option(help="story id")],
    plan: Annotated[str, typer.Option(help="plan id")],
    approved_by: Annotated[str, typer.Option("--approved-by", help="who approves")],
    roles: Annotated[str, typer.Option(help="comma-separated roles (default: all five)")] = "",
    title: Annotated[str, typer.Option(help="what the plan is about")] = "",
    task: Annotated[
        list[str] | None,
        typer.Option(help="ROLE:TASK_ID:description (repeatable)"),
    ] = None,
) -> None:
    """Publish a valid planning.plan.approved (reads NATS_URL)."""
    from pydantic import ValidationError

    from services.common.bus import EventBus

    tasks = []
    for item in task or []:
        parts = item.split(":", 2)
        if len(parts) != 3:
            raise _fail(f"--task {item!r}: expected ROLE:TASK_ID:description", 2)
        tasks.append({"role": parts[0].strip().upper(), "task_id": parts[1].strip(), "description": parts[2]})
    data = {
        "story_id": story,
        "plan_id": plan,
        "approved_by": approved_by,
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

    async def go() -> str:
        bus = await EventBus.connect(load_settings(FleetSettings), catalog.PO_UI)
        try:
            event = catalog.make_event(payload, catalog.PO_UI, correlation_id=f"{story}:{plan}"[:128])
            ack = await bus.publish(event)
            return f"published {event.event_type} {event.event_id} (stream {ack.stream}, seq {ack.seq})"
        finally:
            await bus.close()

    console.print(_run(go()))


# --- councils and deliberations (gRPC clients of the orchestrator) ----------------------------------------------


def _orchestrator_address() -> str:
    return os.environ.get("ORCHESTRATOR_ADDRESS", "127.0.0.1:50055")


async def _ready_channel(address: str, wait_seconds: float):
    import grpc

    channel = grpc.aio.insecure_channel(address)
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
) -> None:
    """Run a deliberation on the orchestrator and print the ranking (reads ORCHESTRATOR_ADDRESS)."""
    from fleet.deliberation.v1 import deliberation_pb2 as dpb
    from fleet.orchestrator.v1 import orchestrator_pb2 as pb
    from fleet.orchestrator.v1 import orchestrator_pb2_grpc

    request = pb.DeliberateRequest(
        task_id=task_id or catalog.new_id("task"),
        task_description=task,
        role=role,
        rounds=rounds,
        story_id=story,
        constraints=dpb.Constraints(requirements=requirement or [], timeout_seconds=timeout),
    )

    async def go():
        import grpc

        channel = await _ready_channel(_orchestrator_address(), 10)
        try:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            async for update in stub.StreamDeliberation(pb.StreamDeliberationRequest(deliberation=request)):
                if update.HasField("progress"):
                    p = update.progress
                    err.print(f"[dim]{p.phase:<9} {p.kind:<18} {p.agent_id} {p.detail}[/dim]")
                else:
                    return update.result
        except grpc.aio.AioRpcError as e:
            raise FleetError(f"{e.code().name}: {e.details()}") from None
        finally:
            await channel.close()

    result = _run(go())
    print_result(result)
    if result.status != dpb.DELIBERATION_STATUS_COMPLETED:  # type: ignore[union-attr]
        raise typer.Exit(1)


def print_result(result) -> None:
    from fleet.deliberation.v1 import deliberation_pb2 as dpb

    status = dpb.DeliberationStatus.Name(result.status).removeprefix("DELIBERATION_STATUS_")
    console.print(
        f"[bold]{result.task_id}[/bold] ({result.role}): {status} in {result.duration_ms} ms, "
        f"{result.total_tokens} tokens" + (f" — {result.error_message}" if result.error_message else "")
    )
    table = Table("rank", "author", "score", "peer", "checks", "findings")
    for r in result.results:
        applicable = [c for c in r.checks if c.applicable]
        findings = sum(len(c.findings) for c in r.checks)
        table.add_row(
            str(r.rank),
            r.proposal.author_id,
            f"{r.score:.2f}",
            f"{r.peer_score:.2f}",
            f"{sum(c.passed for c in applicable)}/{len(applicable)} passed",
            str(findings),
        )
    console.print(table)
    if result.selection.winner_id:
        method = dpb.SelectionMethod.Name(result.selection.method).removeprefix("SELECTION_METHOD_")
        console.print(
            f"winner: [bold]{result.winner_id}[/bold] (chosen by {method} {result.selection.selected_by}): "
            f"{result.selection.rationale}"
        )


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
