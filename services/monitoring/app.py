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

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from services.common import auth
from services.common import events as ev
from services.common.errors import (
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.deliberation.domain import DeliberationResult, dump
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
from services.monitoring.orchestrator_client import Councils, OrchestratorClient, OrchestratorStatus
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


# The request model of POST /api/approve-plan is derived from the catalog's PlanApproved and PlanTask (not written
# again), so that its published schema is exactly what is accepted:
# - strings are taken as sent (the catalog trims them before its checks; the published event has them trimmed),
#   so a pattern or a maximum length means what it says;
# - what the catalog's validators enforce is added to the schema where JSON Schema can state it (below); the rules
#   across a plan's tasks (unique ids, depends_on a DAG) are stated in words in the `tasks` description;
# - the body is read as strict JSON (no "3" for 3), with an integral number an integer as in JSON Schema (3.0 is 3).

# JSON Schema patterns are searched, not matched: "some character that is not whitespace" (the catalog trims before
# checking the length, so a required text of only whitespace is refused).
NOT_BLANK = r"\S"
TESTS_FORMAT = "pytest"  # a format of our own (JSON Schema allows them): pytest source defining a test function


def _plan_task_rules(schema: dict[str, Any]) -> None:
    properties = schema["properties"]
    properties["description"]["pattern"] = NOT_BLANK
    properties["tests"]["format"] = TESTS_FORMAT


def _plan_rules(schema: dict[str, Any]) -> None:
    properties = schema["properties"]
    approver = next(s for s in properties["approved_by"]["anyOf"] if s.get("type") == "string")
    approver["pattern"] = NOT_BLANK
    roles = next(s for s in properties["roles"]["anyOf"] if s.get("type") == "array")
    roles |= {"minItems": 1, "uniqueItems": True}
    properties["tasks"]["description"] = (
        "The plan's tasks: their task_id unique; each depends_on names other tasks of this plan, without a cycle "
        "(422 naming tasks[i].depends_on otherwise)."
    )


def _integral(text: str) -> int | float:
    number = float(text)
    return int(number) if number.is_integer() else number


class ApprovalTask(ev.PlanTask):
    """A task of the plan (`tests`: its visible acceptance tests, pytest source that imports from `solution`)."""

    model_config = ConfigDict(str_strip_whitespace=False, json_schema_extra=_plan_task_rules)


class ApprovalRequest(ev.PlanApproved):
    """The approval of a story's plan: the councils of `roles` (all five when absent) deliberate on its tasks.
    `timestamp` is now when absent."""

    model_config = ConfigDict(str_strip_whitespace=False, json_schema_extra=_plan_rules)

    timestamp: AwareDatetime | None = Field(None, description="when the plan was approved; now when absent")
    approved_by: Annotated[str | None, *ev.PlanApproved.model_fields["approved_by"].metadata] = Field(
        None,
        description="ignored when the server authenticates callers: the approver is the token's caller; "
        "without authentication, this name ('anonymous' when absent)",
    )
    tasks: Annotated[list[ApprovalTask] | None, *ev.PlanApproved.model_fields["tasks"].metadata] = None

    @classmethod
    def read(cls, body: bytes) -> ApprovalRequest:
        """The request in `body` (JSON), validated strictly: pydantic.ValidationError naming each bad field."""
        return cls.model_validate_json(json.dumps(json.loads(body, parse_float=_integral)), strict=True)

    def payload(self, approver: str | None) -> ev.PlanApproved:
        """The catalog's event payload, validated as its consumers validate it (strict JSON; strings trimmed).
        `approver`: the authenticated caller, who replaces any `approved_by` of the body (None: no authentication)."""
        data = self.model_dump(mode="json", exclude_unset=True)
        data["approved_by"] = approver or data.get("approved_by") or auth.ANONYMOUS.actor
        data["timestamp"] = data.get("timestamp") or datetime.now(UTC).isoformat()
        return ev.PlanApproved.model_validate_json(json.dumps(data), strict=True)


class Me(BaseModel):
    authentication: bool = Field(description="false: the server trusts every caller (AUTH_ISSUER unset)")
    actor: str = Field(description="the name approvals record: the token's email, else its subject")
    subject: str
    roles: list[str] = Field(description="the roles the token carries")


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
AUTH_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No bearer token, or one that does not verify"},
    403: {"model": Problem, "description": "The token lacks the role this needs"},
}
ORCHESTRATOR_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    502: {"model": Problem, "description": "The orchestrator answered with an error"},
}


# --- who is calling -----------------------------------------------------------------------------------------------

BEARER = HTTPBearer(auto_error=False, description="an OIDC access token; `fleet token` mints one locally")


def caller(role: str | None) -> Any:
    """The dependency admitting a caller with `role` (None: any authenticated caller)."""

    async def admit(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> auth.Principal:
        authorization = f"Bearer {credentials.credentials}" if credentials else None
        guard = request.app.state.monitoring.guard
        return await guard.admit(f"{request.method} {request.url.path}", authorization, role)

    return admit


viewer, product_owner, anyone = caller(auth.VIEWER), caller(auth.PRODUCT_OWNER), caller(None)


# --- composition ---------------------------------------------------------------------------------------------------


class Monitoring:
    """Everything the endpoints use: settings, the live feed (NATS), the orchestrator client."""

    def __init__(self, settings: MonitoringSettings) -> None:
        self.settings = settings
        self.feed = LiveFeed(settings)
        self.orchestrator = OrchestratorClient(
            settings.orchestrator_address,
            settings.orchestrator_timeout_seconds,
            auth.BearerToken(settings.auth_token_file),
        )
        self.guard = auth.Guard(auth.Authenticator.from_settings(settings), roles={})
        auth.announce(self.guard, "monitoring")
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

    @app.exception_handler(Unauthenticated)
    async def unauthenticated(_: Request, e: Unauthenticated) -> JSONResponse:
        challenge = f'Bearer error="invalid_token", error_description="{e.message.replace(chr(34), chr(39))}"'
        return JSONResponse({"detail": e.message}, status_code=401, headers={"WWW-Authenticate": challenge})

    @app.exception_handler(PermissionDenied)
    async def forbidden(_: Request, e: PermissionDenied) -> JSONResponse:
        return JSONResponse({"detail": e.message}, status_code=403)

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

    @app.get("/api/me", response_model=Me, tags=["auth"], responses=AUTH_PROBLEMS)
    async def me(principal: Annotated[auth.Principal, Depends(anyone)]) -> Me:
        """Who the token says the caller is, and its roles (the page shows it)."""
        return Me(
            authentication=monitoring.guard.enabled,
            actor=principal.actor,
            subject=principal.subject,
            roles=sorted(principal.roles),
        )

    # Everything the page reads: viewers (each route documents the 401 and 403 through the router).
    viewers = APIRouter(dependencies=[Depends(viewer)], responses=AUTH_PROBLEMS)

    @viewers.get("/api/catalog", response_model=Catalog, tags=["feed"])
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

    @viewers.get("/api/dependencies", response_model=Dependencies, tags=["feed"])
    async def dependencies() -> Dependencies:
        """Which dependency is up, which is down and why, and the state of each stream's live-feed consumer."""
        return monitoring.dependencies()

    @viewers.get("/api/events", response_model=list[FeedEvent], tags=["feed"])
    async def events(
        family: FamilyQuery = None,
        story: StoryQuery = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    ) -> list[FeedEvent]:
        """Recent events (the feed's bounded history), oldest first."""
        return feed.history.select(family.value if family else None, story, limit)

    @viewers.get(
        "/api/events/stream",
        response_class=EventSourceResponse,
        tags=["feed"],
    )
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

    @viewers.get(
        "/api/dead-letters",
        response_model=list[FeedEvent],
        tags=["feed"],
    )
    async def dead_letters(limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[FeedEvent]:
        """Recent dead letters, newest first, each with its reason and origin (`dead_letter`)."""
        return list(reversed(feed.history.select(DEAD_LETTER_FAMILY, None, limit)))

    @viewers.get(
        "/api/deliberations",
        response_model=list[DeliberationSummary],
        tags=["deliberations"],
    )
    async def deliberations(
        story: StoryQuery = None,
        status: ev.DeliberationStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[DeliberationSummary]:
        """Deliberations seen in the events, most recently active first."""
        return feed.deliberations.list(story, status.value if status else None, limit)

    @viewers.get(
        "/api/deliberations/{task_id}",
        response_model=DeliberationResult,
        tags=["deliberations"],
        responses={
            404: {"model": Problem, "description": "No deliberation for this task"},
            **ORCHESTRATOR_PROBLEMS,
        },
    )
    async def deliberation(task_id: Annotated[str, PathParam(pattern=ev.ID_PATTERN)]) -> JSONResponse:
        """The latest deliberation of a task (the orchestrator's GetDeliberationResult), as the domain's
        DeliberationResult serialises itself: proposals, revisions and their checks, critiques, checks (the tests
        run against each proposal's code, with the failing ones), votes, scores, the winner and the rationale,
        whether the winner is verified and why, notes."""
        return JSONResponse(dump(await monitoring.orchestrator.deliberation(task_id)))

    @viewers.get(
        "/api/councils",
        response_model=Councils,
        tags=["councils"],
        responses=ORCHESTRATOR_PROBLEMS,
    )
    async def councils(role: ev.Role | None = None) -> Any:
        """Councils and their agents (the orchestrator's ListCouncils)."""
        return await monitoring.orchestrator.councils(role.value if role else "")

    @viewers.get(
        "/api/orchestrator/status",
        response_model=OrchestratorStatus,
        tags=["councils"],
        responses=ORCHESTRATOR_PROBLEMS,
    )
    async def orchestrator_status() -> Any:
        """The orchestrator's GetStatus with its statistics."""
        return await monitoring.orchestrator.status()

    @app.post(
        "/api/approve-plan",
        status_code=201,
        response_model=ApprovalAccepted,
        tags=["planning"],
        responses={400: {"model": Problem, "description": "The body is not JSON"}, **PROBLEMS, **AUTH_PROBLEMS},
    )
    async def approve_plan(
        approval: ApprovalRequest,
        request: Request,
        principal: Annotated[auth.Principal, Depends(product_owner)],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                pattern=r"^[A-Za-z0-9_:.\-]{1,128}$",
                description="becomes the event id: a repeated submit is published once",
            ),
        ] = None,
    ) -> ApprovalAccepted:
        """Publish `planning.plan.approved`. The body is validated as its schema says (strict JSON), then becomes the
        event catalog's PlanApproved exactly as its consumers validate it. 422 names each bad field."""
        try:  # `approval` passed FastAPI's lax checks; now the strict ones, on the body as it was sent
            approver = principal.actor[:120] if monitoring.guard.enabled else None
            payload = ApprovalRequest.read(await request.body()).payload(approver)
        except ValidationError as e:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_context=False)]
            ) from None
        bus = feed.require_bus()
        correlation = f"{payload.story_id}:{payload.plan_id}"[:128]  # two ids of up to 128: the envelope takes 128
        event = ev.make_event(
            payload, ev.MONITORING, correlation_id=correlation, event_id=idempotency_key, actor=principal.actor
        )
        try:
            ack = await bus.publish(event)
        except FleetError as e:
            auth.audit(principal.actor, "POST /api/approve-plan", e.code, e.message)
            raise
        auth.audit(
            principal.actor, "POST /api/approve-plan", "OK", f"{payload.story_id}/{payload.plan_id} {event.event_id}"
        )
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

    app.include_router(viewers)

    if not monitoring.guard.enabled:  # the published API is the enforced one: no bearer scheme when none is checked
        full = app.openapi

        def openapi() -> dict[str, Any]:
            schema = full()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.pop("security", None)
                    for code in ("401", "403"):
                        operation.get("responses", {}).pop(code, None)
            schema.get("components", {}).pop("securitySchemes", None)
            return schema

        app.openapi = openapi  # type: ignore[method-assign]
    return app
