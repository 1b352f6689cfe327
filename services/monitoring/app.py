"""The monitoring HTTP service: probes, metrics, the JSON API under /api/, the live feed (SSE) and the page.

Every JSON endpoint has a response model, so /openapi.json describes the whole API. Errors are JSON:
422 = FastAPI's field errors ({"detail": [{"loc": [...], "msg": ...}]}), 404/502/503 = {"detail", "dependency"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError

from services.common import events as ev
from services.common.errors import FleetError, InvalidArgument, NotFound, Unavailable
from services.monitoring.feed import (
    DEAD_LETTER_FAMILY,
    FAMILIES,
    STREAM_FAMILY,
    TOKEN_FAMILY,
    DeliberationSummary,
    FeedEvent,
    LiveFeed,
    StreamStatus,
)
from services.monitoring.orchestrator_client import (
    Councils,
    DeliberationResult,
    OrchestratorClient,
    OrchestratorStatus,
)
from services.monitoring.settings import MonitoringSettings

STATIC = Path(__file__).resolve().parent / "static"
ID_RULE = next((m.description for m in getattr(ev.Id, "__metadata__", ()) if getattr(m, "description", None)), "")

Family = StrEnum("Family", {f: f for f in FAMILIES})  # type: ignore[misc]
StoryQuery = Annotated[str | None, Query(max_length=128, description="only events of this story")]
FamilyQuery = Annotated[Family | None, Query(description="only this subject family")]  # type: ignore[valid-type]


# --- models of the API -------------------------------------------------------------------------------------------


class Problem(BaseModel):
    detail: str
    dependency: str = Field("", description="the dependency that is down (503), e.g. nats or orchestrator")


class Dependency(BaseModel):
    name: str
    ok: bool
    address: str
    detail: str


class Dependencies(BaseModel):
    ready: bool = Field(description="NATS reachable and every live-feed consumer exists")
    dependencies: list[Dependency]
    streams: list[StreamStatus]


class Readiness(BaseModel):
    ready: bool
    reasons: list[str] = Field(default_factory=list)


class FamilyInfo(BaseModel):
    name: str
    streams: list[str]
    subjects: list[str]


class Catalog(BaseModel):
    families: list[FamilyInfo]
    roles: list[ev.Role]
    event_types: list[str]
    token_family: str = Field(description="the family of agents' token chunks")
    dead_letter_family: str
    id_pattern: str = ev.ID_PATTERN
    id_rule: str = Field(ID_RULE, description="the id rule in words")


class ApprovalRequest(ev.PlanApproved):
    """The catalog's PlanApproved, with `timestamp` defaulting to now (the page does not send it)."""

    timestamp: datetime | None = Field(None, description="when the plan was approved; now when absent")


class ApprovalAccepted(BaseModel):
    event_id: str
    event_type: str
    subject: str
    stream: str
    seq: int
    duplicate: bool = Field(description="the same event id was already published (JetStream dropped this one)")
    correlation_id: str
    story_id: str
    plan_id: str


PROBLEMS: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "A dependency (NATS or the orchestrator) is unavailable"}
}
ORCHESTRATOR_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    502: {"model": Problem, "description": "The orchestrator answered with an error"},
}


# --- composition ---------------------------------------------------------------------------------------------------


class Monitoring:
    """Everything the endpoints use: settings, the live feed (NATS), the orchestrator client."""

    def __init__(self, settings: MonitoringSettings) -> None:
        self.settings = settings
        self.feed = LiveFeed(settings)
        self.orchestrator = OrchestratorClient(settings.orchestrator_address, settings.orchestrator_timeout_seconds)
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.feed.start()
        self._poller = asyncio.create_task(self.orchestrator.poll(self.settings.orchestrator_poll_seconds))

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.feed.stop()
        await self.orchestrator.close()

    def dependencies(self) -> Dependencies:
        o = self.orchestrator
        return Dependencies(
            ready=self.feed.ready,
            dependencies=[
                Dependency(
                    name="nats", ok=self.feed.connected, address=self.feed.nats_address, detail=self.feed.nats_status()
                ),
                Dependency(
                    name="orchestrator",
                    ok=o.ok,
                    address=o.address,
                    detail="serving" if o.ok else o.unavailable_message(),
                ),
            ],
            streams=self.feed.streams(),
        )


def create_app(settings: MonitoringSettings) -> FastAPI:
    monitoring = Monitoring(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await monitoring.start()
        try:
            yield
        finally:
            await monitoring.stop()

    app = FastAPI(
        title="SWE AI Fleet monitoring",
        version="1.0.0",
        description="Live feed of every event of the fleet, councils and deliberations from the orchestrator, "
        "dead letters, and the product owner's plan approval.",
        lifespan=lifespan,
    )
    app.state.monitoring = monitoring
    feed = monitoring.feed

    # --- errors ------------------------------------------------------------------------------------------------

    @app.exception_handler(Unavailable)
    async def unavailable(_: Request, e: Unavailable) -> JSONResponse:
        dependency = getattr(e, "dependency", "nats")
        return JSONResponse({"detail": e.message, "dependency": dependency}, status_code=503)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, e: NotFound) -> JSONResponse:
        return JSONResponse({"detail": e.message, "dependency": ""}, status_code=404)

    @app.exception_handler(InvalidArgument)
    async def invalid(_: Request, e: InvalidArgument) -> JSONResponse:
        errors = [{"loc": e.field.split("."), "msg": e.description, "type": "value_error"}]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(FleetError)
    async def failed(_: Request, e: FleetError) -> JSONResponse:
        return JSONResponse({"detail": e.message, "dependency": "orchestrator"}, status_code=502)

    # --- probes and metrics ------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> Any:
        """Readiness: NATS is reachable and every live-feed consumer exists."""
        reasons = [] if feed.connected else [feed.nats_status()]
        reasons += [f"{s.stream}: {s.detail}" for s in feed.streams() if not s.ok and feed.connected]
        body = Readiness(ready=feed.ready, reasons=reasons)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # --- the page --------------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- the API ---------------------------------------------------------------------------------------------------

    @app.get("/api/catalog", response_model=Catalog, tags=["feed"])
    async def catalog() -> Catalog:
        """Subject families, roles and event types of the event catalog (the page builds its filters from it)."""
        families = [
            FamilyInfo(
                name=f,
                streams=[s for s, fam in STREAM_FAMILY.items() if fam == f],
                subjects=[sub for s, fam in STREAM_FAMILY.items() if fam == f for sub in ev.STREAMS[s].subjects],
            )
            for f in FAMILIES
        ]
        return Catalog(
            families=families,
            roles=list(ev.Role),
            event_types=list(ev.EVENTS),
            token_family=TOKEN_FAMILY,
            dead_letter_family=DEAD_LETTER_FAMILY,
        )

    @app.get("/api/dependencies", response_model=Dependencies, tags=["feed"])
    async def dependencies() -> Dependencies:
        """Which dependency is up, which is down and why, and the state of each stream's live-feed consumer."""
        return monitoring.dependencies()

    @app.get("/api/events", response_model=list[FeedEvent], tags=["feed"])
    async def events(
        family: FamilyQuery = None,
        story: StoryQuery = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    ) -> list[FeedEvent]:
        """Recent events (the feed's bounded history), oldest first."""
        return feed.history.select(family.value if family else None, story, limit)

    @app.get("/api/events/stream", response_class=EventSourceResponse, tags=["feed"])
    async def stream(family: FamilyQuery = None, story: StoryQuery = None) -> AsyncIterator[ServerSentEvent]:
        """Server-Sent Events: `feed` events (the history, then live), one `replayed` marker after the history,
        and `dropped` (then the stream ends) when this client fell too far behind."""
        client, replay = feed.hub.join(feed.history, family.value if family else None, story)
        try:
            for event in replay:
                yield ServerSentEvent(data=event, event="feed", id=event.id)
            yield ServerSentEvent(data={"replayed": len(replay)}, event="replayed", retry=2000)
            while True:
                event = await client.queue.get()
                if event is None:
                    yield ServerSentEvent(data={"reason": client.dropped}, event="dropped")
                    return
                yield ServerSentEvent(data=event, event="feed", id=event.id)
        finally:
            feed.hub.leave(client)

    @app.get("/api/dead-letters", response_model=list[FeedEvent], tags=["feed"])
    async def dead_letters(limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[FeedEvent]:
        """Recent dead letters, newest first, each with its reason and origin (`dead_letter`)."""
        return list(reversed(feed.history.select(DEAD_LETTER_FAMILY, None, limit)))

    @app.get("/api/deliberations", response_model=list[DeliberationSummary], tags=["deliberations"])
    async def deliberations(
        story: StoryQuery = None,
        status: ev.DeliberationStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[DeliberationSummary]:
        """Deliberations seen in the events, most recently active first."""
        return feed.deliberations.list(story, status.value if status else None, limit)

    @app.get(
        "/api/deliberations/{task_id}",
        response_model=DeliberationResult,
        tags=["deliberations"],
        responses={404: {"model": Problem, "description": "No deliberation for this task"}, **ORCHESTRATOR_PROBLEMS},
    )
    async def deliberation(task_id: Annotated[str, PathParam(pattern=ev.ID_PATTERN)]) -> DeliberationResult:
        """The latest deliberation of a task (the orchestrator's GetDeliberationResult): proposals, revisions,
        critiques, checks, votes, scores, the winner and the rationale."""
        return await monitoring.orchestrator.deliberation(task_id)

    @app.get("/api/councils", response_model=Councils, tags=["councils"], responses=ORCHESTRATOR_PROBLEMS)
    async def councils(role: ev.Role | None = None) -> Councils:
        """Councils and their agents (the orchestrator's ListCouncils)."""
        return await monitoring.orchestrator.councils(role.value if role else "")

    @app.get(
        "/api/orchestrator/status",
        response_model=OrchestratorStatus,
        tags=["councils"],
        responses=ORCHESTRATOR_PROBLEMS,
    )
    async def orchestrator_status() -> OrchestratorStatus:
        """The orchestrator's GetStatus with its statistics."""
        return await monitoring.orchestrator.status()

    @app.post(
        "/api/approve-plan",
        status_code=201,
        response_model=ApprovalAccepted,
        tags=["planning"],
        responses={400: {"model": Problem, "description": "The body is not JSON"}, **PROBLEMS},
    )
    async def approve_plan(
        approval: ApprovalRequest,
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=r"^[A-Za-z0-9_:.\-]{1,128}$",
                description="becomes the event id: a repeated submit is published once",
            ),
        ] = None,
    ) -> ApprovalAccepted:
        """Publish `planning.plan.approved`, validated with the catalog's PlanApproved exactly as its consumers
        validate it (strict JSON). 422 names each bad field."""
        raw = await request.json()  # `approval` passed the lax checks; now the consumers' strict ones
        if raw.get("timestamp") is None:
            raw["timestamp"] = datetime.now(UTC).isoformat()
        try:
            payload = ev.PlanApproved.model_validate_json(json.dumps(raw), strict=True)
        except ValidationError as e:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_context=False)]
            ) from None
        bus = feed.require_bus()
        correlation = f"{payload.story_id}:{payload.plan_id}"[:128]  # two ids of up to 128: the envelope takes 128
        event = ev.make_event(payload, ev.MONITORING, correlation_id=correlation, event_id=idempotency_key)
        ack = await bus.publish(event)
        return ApprovalAccepted(
            event_id=event.event_id,
            event_type=event.event_type,
            subject=event.subject,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
            correlation_id=event.correlation_id,
            story_id=payload.story_id,
            plan_id=payload.plan_id,
        )

    return app
