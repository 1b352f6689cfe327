"""The event catalog: the one place that names every subject, stream, consumer and payload.

Every service, the stream provisioning (`fleet streams init`), the exported JSON Schemas
(`specs/events/`), the AsyncAPI document (`specs/asyncapi.yaml`) and the tests import this module.
A subject string written anywhere else is a bug (a test looks for them).

Each event travels as JSON in an `Envelope` whose `event_id` is also sent as the `Nats-Msg-Id` header,
so JetStream drops a repeated publish inside the stream's duplicate window.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum, nonmember
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from services.common.errors import InvalidArgument
from services.common.execution import test_source_problem

# --- vocabulary ------------------------------------------------------------------------------------------


E = TypeVar("E", bound="Vocabulary")


class Vocabulary(StrEnum):
    """A closed set of upper-case names read from outside (gRPC, events, the CLI): `parse` is the one reader."""

    FIELD = nonmember("value")  # the field InvalidArgument names by default (each vocabulary names its own)

    @classmethod
    def parse(cls: type[E], value: str, field: str | None = None) -> E:
        """The member named by `value` (case-insensitive), or InvalidArgument naming `field`."""
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            raise InvalidArgument(field or cls.FIELD, f"must be one of {', '.join(cls)}, got {value!r}") from None


class Role(Vocabulary):
    """The five council roles. One spelling everywhere: events, gRPC, settings, the UI."""

    FIELD = nonmember("role")
    DEV = "DEV"
    QA = "QA"
    ARCHITECT = "ARCHITECT"
    DEVOPS = "DEVOPS"
    DATA = "DATA"


class StoryPhase(Vocabulary):
    """The phases of a story, which scope the context an agent gets. One spelling: gRPC, the graph, the prompts."""

    FIELD = nonmember("phase")
    DESIGN = "DESIGN"
    BUILD = "BUILD"
    TEST = "TEST"
    DOCS = "DOCS"


class DeliberationStatus(StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"

    @property
    def ended(self) -> bool:
        """COMPLETED, FAILED or TIMEOUT: nothing more will happen to it."""
        return self in ENDED


ENDED = frozenset({DeliberationStatus.COMPLETED, DeliberationStatus.FAILED, DeliberationStatus.TIMEOUT})


# Ids travel inside NATS subjects (token streams) and Valkey keys: no dots, spaces or wildcards.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_:\-]{0,127}$"
Id = Annotated[str, Field(pattern=ID_PATTERN, description="1-128 characters: letters, digits, _ : -")]
ShortText = Annotated[str, Field(max_length=200)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class Payload(BaseModel):
    """Base of every payload: unknown fields are rejected, strings are trimmed."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


# --- payloads ----------------------------------------------------------------------------------------------


class PlanTask(Payload):
    task_id: Id
    description: str = Field(min_length=1, max_length=4000)
    role: Role
    requirements: list[ShortText] = Field(default_factory=list, max_length=20)
    depends_on: list[Id] = Field(
        default_factory=list,
        max_length=50,
        description="Task ids of this plan that must complete first; their winners become this task's context.",
    )
    priority: int = Field(default=0, ge=0, le=10)
    tests: str = Field(
        "",
        max_length=64_000,
        description="Visible acceptance tests: one pytest file run against each proposal's solution.py.",
    )

    @field_validator("tests")
    @classmethod
    def _usable_tests(cls, tests: str) -> str:
        if tests.strip() and (problem := test_source_problem(tests)):
            raise ValueError(f"tests {problem}")
        return tests


def plan_dag_problem(tasks: list[PlanTask]) -> None:
    """A plan's tasks form a DAG: every `depends_on` names another task of the plan, and no cycle. ValueError
    naming the field (tasks[i].depends_on) otherwise."""
    index = {t.task_id: i for i, t in enumerate(tasks)}
    for i, t in enumerate(tasks):
        for dep in t.depends_on:
            if dep == t.task_id:
                raise ValueError(f"tasks[{i}].depends_on: task {t.task_id} depends on itself")
            if dep not in index:
                raise ValueError(f"tasks[{i}].depends_on: {dep!r} is not a task of this plan")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(task_id: str, path: list[str]) -> None:
        state[task_id] = 1
        for dep in tasks[index[task_id]].depends_on:
            if state.get(dep) == 1:
                cycle = " -> ".join([*path[path.index(dep) :], dep])
                raise ValueError(f"tasks[{index[dep]}].depends_on: a cycle: {cycle}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[task_id] = 2

    for t in tasks:
        if t.task_id not in state:
            visit(t.task_id, [t.task_id])


class PlanApproved(Payload):
    """A product owner approved a story's plan: the councils of the given roles deliberate on it."""

    story_id: Id
    plan_id: Id
    approved_by: str = Field(min_length=1, max_length=120)
    timestamp: datetime
    title: str = Field(default="", max_length=300)
    description: str = Field(default="", max_length=4000)
    roles: list[Role] | None = Field(default=None, description="Roles to deliberate; all five when absent.")
    tasks: list[PlanTask] | None = Field(default=None, max_length=100)

    @field_validator("roles")
    @classmethod
    def _distinct_roles(cls, roles: list[Role] | None) -> list[Role] | None:
        if roles is not None:
            if not roles:
                raise ValueError("roles must name at least one role when given")
            if len(set(roles)) != len(roles):
                raise ValueError("roles must not repeat")
        return roles

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[PlanTask] | None) -> list[PlanTask] | None:
        if tasks is not None and len({t.task_id for t in tasks}) != len(tasks):
            raise ValueError("task ids must be unique")
        if tasks:
            plan_dag_problem(tasks)
        return tasks

    def requested_roles(self) -> list[Role]:
        return list(self.roles) if self.roles else list(Role)


class DeliberationStarted(Payload):
    deliberation_id: Id
    task_id: Id
    role: Role
    council_id: str
    story_id: str = ""
    plan_id: str = ""
    num_agents: int = Field(ge=1)
    executor: str = ""


class TaskDispatched(Payload):
    """A task was handed to a council (one per task and role)."""

    task_id: Id
    role: Role
    deliberation_id: Id
    story_id: str = ""
    plan_id: str = ""
    description: str = Field(default="", max_length=4000)


class DeliberationCompleted(Payload):
    deliberation_id: Id
    task_id: Id
    role: Role
    story_id: str = ""
    plan_id: str = ""
    winner_id: str
    winner_proposal_id: str
    winner_content: str
    winner_score: float
    selection_method: Literal["ARCHITECT", "FALLBACK"]
    rationale: str = ""
    checks_passed: int = 0
    checks_failed: int = 0
    duration_ms: int = 0
    total_tokens: int = 0
    context_version: str = ""
    verified: bool = Field(False, description="The winner passed every gating check (its code ran against the tests)")
    verified_reason: str = Field("", max_length=2000)


class DeliberationFailed(Payload):
    deliberation_id: Id
    task_id: Id
    role: Role
    status: Literal[DeliberationStatus.FAILED, DeliberationStatus.TIMEOUT]
    error: str
    story_id: str = ""
    plan_id: str = ""
    duration_ms: int = 0


class AgentRequestDispatched(Payload):
    """An agent call was handed to an executor (in-process or Ray)."""

    request_id: str
    deliberation_id: Id
    agent_id: Id
    phase: str
    executor: str = ""


class AgentResponseCompleted(Payload):
    request_id: str
    deliberation_id: Id
    agent_id: Id
    phase: str
    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0


class AgentResponseFailed(Payload):
    request_id: str
    deliberation_id: Id
    agent_id: Id
    phase: str
    error: str
    error_kind: str = "error"


class TokenChunk(Payload):
    """Part of an agent's streamed answer: kind start, then tokens (batched ~100 ms), then end."""

    deliberation_id: Id
    agent_id: Id
    phase: str
    model_config = ConfigDict(str_strip_whitespace=False)  # tokens keep their spaces

    kind: Literal["start", "tokens", "end"]
    seq: int = Field(ge=0)
    text: str = ""


class ContextUpdated(Payload):
    story_id: Id
    version: str
    changes: int = Field(ge=0)
    actor: str = ""
    reason: str = ""


class DecisionAdded(Payload):
    story_id: Id
    decision_id: str
    title: str
    decided_by: str = ""
    task_id: str = ""
    deliberation_id: str = ""


# --- envelope ------------------------------------------------------------------------------------------------

P = TypeVar("P", bound=Payload)


class Envelope(BaseModel, Generic[P]):
    """What travels on the wire. `payload` is validated against the model its `event_type` names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    event_type: str
    occurred_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    producer: str = Field(min_length=1, max_length=120)
    correlation_id: str = Field(default="", max_length=128)
    actor: str = Field(
        default="",
        max_length=200,
        description="who caused it: the authenticated caller (email, else subject); empty for the fleet's own work",
    )
    payload: P

    @property
    def spec(self) -> EventSpec:
        return EVENTS[self.event_type]

    @property
    def subject(self) -> str:
        return self.spec.subject_for(self.payload)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


# --- streams, events, consumers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    # None: the STREAM_MAX_AGE_DAYS setting; a number: this stream's own retention.
    max_age_seconds: int | None = None
    duplicate_window_seconds: int = 120


@dataclass(frozen=True)
class EventSpec:
    """One kind of event: its type (= subject, or the subject's template), payload model and stream."""

    event_type: str
    payload: type[Payload]
    stream: str
    description: str
    producers: tuple[str, ...]
    # A template with {field} placeholders filled from the payload (token streams); else the event type.
    subject_template: str = ""

    @property
    def subject_pattern(self) -> str:
        """The NATS subject filter matching every subject of this event."""
        if not self.subject_template:
            return self.event_type
        return ".".join("*" if "{" in tok else tok for tok in self.subject_template.split("."))

    def subject_for(self, payload: Payload) -> str:
        if not self.subject_template:
            return self.event_type
        return self.subject_template.format(**payload.model_dump())


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer: one per (service, purpose). Delivery policy comes from settings."""

    durable: str
    stream: str
    filter_subjects: tuple[str, ...]
    service: str
    description: str


class Streams(StrEnum):
    PLANNING_EVENTS = "PLANNING_EVENTS"
    AGENT_REQUESTS = "AGENT_REQUESTS"
    AGENT_RESPONSES = "AGENT_RESPONSES"
    CONTEXT = "CONTEXT"
    ORCHESTRATOR_EVENTS = "ORCHESTRATOR_EVENTS"
    TOKEN_STREAMS = "TOKEN_STREAMS"
    DEAD_LETTERS = "DEAD_LETTERS"


DEAD_LETTER_PREFIX = "deadletter"

STREAMS: dict[str, StreamSpec] = {
    s.name: s
    for s in (
        StreamSpec(Streams.PLANNING_EVENTS, ("planning.>",), "Plan approvals from the product owner."),
        StreamSpec(Streams.AGENT_REQUESTS, ("agent.request.>",), "Agent calls handed to an executor."),
        StreamSpec(Streams.AGENT_RESPONSES, ("agent.response.>",), "Agent answers and failures."),
        StreamSpec(Streams.CONTEXT, ("context.>",), "Changes of the decision graph."),
        StreamSpec(Streams.ORCHESTRATOR_EVENTS, ("orchestration.>",), "Deliberation lifecycle."),
        StreamSpec(
            Streams.TOKEN_STREAMS,
            ("vllm.streaming.>",),
            "Agents' streamed tokens, kept briefly for dashboards that join late.",
            max_age_seconds=15 * 60,
        ),
        StreamSpec(
            Streams.DEAD_LETTERS,
            (f"{DEAD_LETTER_PREFIX}.>",),
            "Events no consumer could take, with the reason in headers.",
            max_age_seconds=30 * 24 * 3600,
        ),
    )
}

ORCHESTRATOR = "orchestrator"
CONTEXT = "context"
RAY_EXECUTOR = "ray-executor"
MONITORING = "monitoring"
PO_UI = "po-ui"  # the product owner's page and `fleet approve-plan`

EVENTS: dict[str, EventSpec] = {
    e.event_type: e
    for e in (
        EventSpec(
            "planning.plan.approved",
            PlanApproved,
            Streams.PLANNING_EVENTS,
            "A story's plan was approved; councils deliberate on it.",
            (PO_UI, MONITORING),
        ),
        EventSpec(
            "orchestration.deliberation.started",
            DeliberationStarted,
            Streams.ORCHESTRATOR_EVENTS,
            "A council started deliberating on a task.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "orchestration.deliberation.completed",
            DeliberationCompleted,
            Streams.ORCHESTRATOR_EVENTS,
            "A deliberation chose a winner.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "orchestration.deliberation.failed",
            DeliberationFailed,
            Streams.ORCHESTRATOR_EVENTS,
            "A deliberation ended FAILED or TIMEOUT.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "orchestration.task.dispatched",
            TaskDispatched,
            Streams.ORCHESTRATOR_EVENTS,
            "A task was handed to a council.",
            (ORCHESTRATOR,),
        ),
        EventSpec(
            "agent.request.dispatched",
            AgentRequestDispatched,
            Streams.AGENT_REQUESTS,
            "An agent call was handed to an executor.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "agent.response.completed",
            AgentResponseCompleted,
            Streams.AGENT_RESPONSES,
            "An agent answered.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "agent.response.failed",
            AgentResponseFailed,
            Streams.AGENT_RESPONSES,
            "An agent call failed.",
            (ORCHESTRATOR, RAY_EXECUTOR),
        ),
        EventSpec(
            "vllm.streaming.chunk",
            TokenChunk,
            Streams.TOKEN_STREAMS,
            "Tokens an agent is generating, batched every ~100 ms.",
            (ORCHESTRATOR, RAY_EXECUTOR),
            subject_template="vllm.streaming.{deliberation_id}.{agent_id}",
        ),
        EventSpec(
            "context.updated",
            ContextUpdated,
            Streams.CONTEXT,
            "A story's context changed; its version is new.",
            (CONTEXT,),
        ),
        EventSpec(
            "context.decision.added",
            DecisionAdded,
            Streams.CONTEXT,
            "A decision was recorded in the graph.",
            (CONTEXT,),
        ),
    )
}

PAYLOAD_TYPES: dict[type[Payload], EventSpec] = {e.payload: e for e in EVENTS.values()}


def _typed_envelope(spec: EventSpec) -> type[Envelope[Any]]:
    """Envelope[X] whose `event_type` is the literal of X's event: the tag of the catalog's discriminated union."""
    name = f"{spec.payload.__name__}Envelope"
    model = create_model(  # type: ignore[call-overload]
        name,
        __base__=Envelope[spec.payload],  # type: ignore[name-defined]
        __module__=__name__,
        event_type=(Literal[spec.event_type], ...),
    )
    model.__qualname__ = name
    globals()[name] = model  # importable by name (pickle)
    return model


# The envelope model of each event type, built once; make_event builds these and parse_event returns them.
ENVELOPES: dict[str, type[Envelope[Any]]] = {e.event_type: _typed_envelope(e) for e in EVENTS.values()}
# Every envelope of the catalog, told apart by `event_type`: one JSON pass validates a message whatever its type.
ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(
    Annotated[Union[tuple(ENVELOPES.values())], Field(discriminator="event_type")]  # noqa: UP007
)

CONSUMERS: dict[str, ConsumerSpec] = {
    c.durable: c
    for c in (
        ConsumerSpec(
            "orchestrator-plan-approved",
            Streams.PLANNING_EVENTS,
            ("planning.plan.approved",),
            ORCHESTRATOR,
            "Starts one deliberation per approved role.",
        ),
        ConsumerSpec(
            "context-plan-approved",
            Streams.PLANNING_EVENTS,
            ("planning.plan.approved",),
            CONTEXT,
            "Writes the story, plan and tasks into the graph.",
        ),
        ConsumerSpec(
            "context-deliberation-completed",
            Streams.ORCHESTRATOR_EVENTS,
            ("orchestration.deliberation.completed",),
            CONTEXT,
            "Records the decision and winning proposal.",
        ),
    )
}


def dead_letter_subject(original_subject: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{original_subject}"


class DeadLetterHeaders:
    """Headers of a dead-lettered message (its body is the original bytes, untouched)."""

    REASON = "Fleet-Dead-Reason"
    STREAM = "Fleet-Dead-Stream"
    SUBJECT = "Fleet-Dead-Subject"
    CONSUMER = "Fleet-Dead-Consumer"
    DELIVERIES = "Fleet-Dead-Deliveries"
    STREAM_SEQ = "Fleet-Dead-Stream-Seq"
    EVENT_ID = "Fleet-Dead-Event-Id"
    ALL = (REASON, STREAM, SUBJECT, CONSUMER, DELIVERIES, STREAM_SEQ, EVENT_ID)


def stream_for_subject(subject: str) -> list[str]:
    """Names of the streams whose subject filters match `subject` (exactly one, for a sound catalog)."""
    return [s.name for s in STREAMS.values() if any(subject_matches(f, subject) for f in s.subjects)]


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


# --- building and parsing ---------------------------------------------------------------------------------


def make_event(
    payload: P, producer: str, correlation_id: str = "", event_id: str | None = None, actor: str = ""
) -> Envelope[P]:
    spec = PAYLOAD_TYPES.get(type(payload))
    if spec is None:
        raise KeyError(f"{type(payload).__name__} is not in the event catalog")
    extra: dict[str, Any] = {"event_id": event_id} if event_id else {}
    return ENVELOPES[spec.event_type](
        event_type=spec.event_type,
        producer=producer,
        correlation_id=correlation_id,
        actor=actor,
        payload=payload,
        **extra,
    )


class InvalidEvent(ValueError):
    """A message that no handler can take: bad JSON, unknown type, wrong schema, wrong subject."""


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def parse_event(data: bytes, subject: str | None = None) -> Envelope[Any]:
    """Validate raw bytes into an Envelope with its typed payload, or raise InvalidEvent saying why.

    One pass for a valid message (the discriminated union on `event_type`); an invalid one is read again, in two
    steps, to say precisely why (the type, then that type's schema)."""
    try:
        env = ANY_ENVELOPE.validate_json(data, strict=True)
    except ValidationError:
        return _parse_invalid(data, subject)
    if subject is not None and env.subject != subject:
        raise InvalidEvent(f"event_type {env.event_type} does not belong on subject {subject}")
    return env


def _parse_invalid(data: bytes, subject: str | None) -> Envelope[Any]:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidEvent(f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("not a JSON object")
    event_type = raw.get("event_type")
    model = ENVELOPES.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        raise InvalidEvent(f"unknown event_type {event_type!r}")
    try:
        env = model.model_validate_json(data, strict=True)
    except ValidationError as e:
        raise InvalidEvent(f"invalid {event_type}: {_describe(e)}") from None
    if subject is not None and env.subject != subject:
        raise InvalidEvent(f"event_type {event_type} does not belong on subject {subject}")
    return env


# --- exported contracts (specs/events/*.json, specs/asyncapi.yaml) ------------------------------------------


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of the envelope carrying each event."""
    out: dict[str, dict[str, Any]] = {}
    for spec in EVENTS.values():
        schema = Envelope[spec.payload].model_json_schema(mode="validation")  # type: ignore[name-defined]
        schema["title"] = spec.event_type
        schema["description"] = spec.description
        schema["properties"]["event_type"] = {"const": spec.event_type, "type": "string"}
        out[f"{spec.event_type}.schema.json"] = schema
    return out


def asyncapi_document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in EVENTS.values():
        key = spec.event_type.replace(".", "_")
        address = spec.subject_template or spec.event_type
        channel: dict[str, Any] = {
            "address": address,
            "description": f"{spec.description} Stream: {spec.stream}.",
            "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        }
        params = [tok.strip("{}") for tok in address.split(".") if tok.startswith("{")]
        if params:
            channel["parameters"] = {p: {"description": f"The payload's {p}."} for p in params}
        channels[key] = channel
        messages[key] = {
            "name": spec.event_type,
            "title": spec.payload.__name__,
            "summary": spec.description,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {"Nats-Msg-Id": {"type": "string", "description": "= event_id (dedupe)"}},
            },
            "payload": {"$ref": f"./events/{spec.event_type}.schema.json"},
        }
        operations[f"publish_{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": "Published by: " + ", ".join(spec.producers),
        }
    for c in CONSUMERS.values():
        for subject in c.filter_subjects:
            key = subject.replace(".", "_")
            operations[f"{c.durable}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{key}"},
                "summary": f"{c.service}: {c.description} (durable consumer {c.durable} on {c.stream})",
            }
    channels["dead_letters"] = {
        "address": f"{DEAD_LETTER_PREFIX}.{{original_subject}}",
        "description": "Events no consumer could take. Body: the original bytes. Headers: "
        + ", ".join(DeadLetterHeaders.ALL)
        + f". Stream: {Streams.DEAD_LETTERS}.",
        "parameters": {"original_subject": {"description": "The subject the event was published on."}},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "SWE AI Fleet events",
            "version": "1.0.0",
            "description": "Generated from services/common/events.py by `make events`. Every message is a JSON "
            "envelope (event_id, event_type, occurred_at, producer, correlation_id, payload).",
        },
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "nats:4222", "protocol": "nats", "description": "NATS JetStream"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
