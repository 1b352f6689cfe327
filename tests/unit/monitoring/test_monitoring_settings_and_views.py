"""Monitoring settings from the environment, and the orchestrator's replies as the API's JSON.

The API is called in-process (httpx's ASGI transport) and reaches a fake orchestrator over real gRPC on loopback,
so each reply crosses the wire, the client's conversion and the API's serialisation. Nothing is written by hand:
the result has every field of the domain set (tests/domain_filler.py's `filled`), the councils and
the status every field of their proto messages (`filled_message`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from domain_filler import filled
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from jsonschema import Draft202012Validator

from fleet.orchestrator.v1 import orchestrator_pb2 as o
from fleet.orchestrator.v1 import orchestrator_pb2_grpc
from services.common import events as ev
from services.common.settings import SettingsError, env_vars, load_settings
from services.deliberation.domain import DeliberationResult, RankedProposal, load
from services.deliberation.proto import result_to_proto
from services.monitoring.app import ApprovalRequest, create_app
from services.monitoring.orchestrator_client import OrchestratorClient, OrchestratorUnavailable, to_json
from services.monitoring.settings import MonitoringSettings

# --- settings -----------------------------------------------------------------------------------------------------


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch):
    assert load_settings(MonitoringSettings).monitoring_port == 8080
    monkeypatch.setenv("MONITORING_PORT", "9999")
    monkeypatch.setenv("ORCHESTRATOR_ADDRESS", "orchestrator:50055")
    monkeypatch.setenv("MONITORING_HISTORY_SIZE", "50")
    s = load_settings(MonitoringSettings)
    assert (s.monitoring_port, s.orchestrator_address, s.monitoring_history_size) == (9999, "orchestrator:50055", 50)
    assert {"MONITORING_PORT", "ORCHESTRATOR_ADDRESS", "NATS_URL"} <= set(env_vars(MonitoringSettings))


@pytest.mark.parametrize(("name", "value"), [("ORCHESTRATOR_ADDRESS", "http://x:1"), ("MONITORING_PORT", "80000")])
def test_bad_settings_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings(MonitoringSettings)


# --- a fake orchestrator over real gRPC, and the API in-process ----------------------------------------------------


class FakeOrchestrator(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Answers each method with `replies[method]`, or aborts with `errors[method]` (code, details)."""

    def __init__(self) -> None:
        self.address = ""
        self.replies: dict[str, Message] = {}
        self.errors: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.requests: list[Message] = []

    async def _answer(self, method: str, request: Message, context: grpc.aio.ServicerContext) -> Message:
        self.requests.append(request)
        if method in self.errors:
            await context.abort(*self.errors[method])
        return self.replies[method]

    async def GetDeliberationResult(self, request, context):
        return await self._answer("GetDeliberationResult", request, context)

    async def ListCouncils(self, request, context):
        return await self._answer("ListCouncils", request, context)

    async def GetStatus(self, request, context):
        return await self._answer("GetStatus", request, context)


@pytest.fixture
async def orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    server = grpc.aio.server()
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(fake, server)
    fake.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield fake
    await server.stop(0)


@pytest.fixture
async def api(orchestrator: FakeOrchestrator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MonitoringSettings(orchestrator_address=orchestrator.address, orchestrator_timeout_seconds=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://monitoring") as client:
        yield client
    await app.state.monitoring.orchestrator.close()


async def documented(api: httpx.AsyncClient, path: str) -> Draft202012Validator:
    """A validator for the 200 response of GET `path` as /openapi.json documents it."""
    spec = (await api.get("/openapi.json")).json()
    schema = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": spec["components"]})


# --- deliberation results: the domain's every field, no hand-written list -----------------------------------------


def dataclass_types(tp: Any) -> list[type]:
    """The dataclasses inside a type hint (through Optional and tuples)."""
    if dataclasses.is_dataclass(tp):
        return [tp]  # type: ignore[list-item]
    return [inner for arg in typing.get_args(tp) for inner in dataclass_types(arg)]


def fields_missing(cls: type, value: Any, path: str, seen: set[type]) -> list[str]:
    """Walk the dataclass `cls` and its JSON `value` together: the path of every field the JSON lacks (or has that
    the domain does not), recursing into nested dataclasses (lists: each item)."""
    seen.add(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [f"{path}{name}" for name in names if name not in value]
    problems += [f"{path}{name} (not a field of {cls.__name__})" for name in value if name not in names]
    hints = typing.get_type_hints(cls)
    for name in names:
        inner = dataclass_types(hints[name])
        if not inner or value.get(name) is None:
            continue
        items = value[name] if isinstance(value[name], list) else [value[name]]
        for i, item in enumerate(items):
            problems += fields_missing(inner[0], item, f"{path}{name}[{i}].", seen)
    return problems


def all_dataclasses(cls: type) -> set[type]:
    found, todo = set(), [cls]
    while todo:
        c = todo.pop()
        if c not in found:
            found.add(c)
            hints = typing.get_type_hints(c)
            todo += [t for f in dataclasses.fields(c) for t in dataclass_types(hints[f.name])]
    return found


async def test_every_field_of_a_result_reaches_the_api_json(orchestrator: FakeOrchestrator, api: httpx.AsyncClient):
    result: DeliberationResult = filled(DeliberationResult)
    orchestrator.replies["GetDeliberationResult"] = o.GetDeliberationResultResponse(result=result_to_proto(result))

    r = await api.get(f"/api/deliberations/{result.task_id}")
    assert r.status_code == 200, r.text
    body = r.json()
    seen: set[type] = set()
    assert fields_missing(DeliberationResult, body, "", seen) == []
    assert seen == all_dataclasses(DeliberationResult)  # the walk reached every dataclass of the result
    assert load(DeliberationResult, body) == result  # and the JSON is the domain's: it loads back, equal
    (await documented(api, "/api/deliberations/{task_id}")).validate(body)  # as /openapi.json says
    assert orchestrator.requests[-1] == o.GetDeliberationResultRequest(task_id=result.task_id)


def test_the_field_walk_finds_a_missing_field():
    body = {"rank": 1, "score": 1.0, "peer_score": 1.0, "check_score": 1.0, "checks": [], "votes": []}
    assert fields_missing(RankedProposal, body, "", set()) == ["proposal"]
    assert fields_missing(RankedProposal, {**body, "proposal": None, "extra": 1}, "", set()) == [
        "extra (not a field of RankedProposal)"
    ]


async def test_a_reply_that_is_not_a_valid_result_is_a_502_saying_so(
    orchestrator: FakeOrchestrator, api: httpx.AsyncClient
):
    orchestrator.replies["GetDeliberationResult"] = o.GetDeliberationResultResponse()  # status UNKNOWN, no ids
    r = await api.get("/api/deliberations/T-1")
    assert r.status_code == 502
    assert r.json()["dependency"] == "orchestrator"
    assert "GetDeliberationResult answered an invalid result" in r.json()["detail"]


@pytest.mark.parametrize(
    ("code", "status", "detail"),
    [
        (grpc.StatusCode.NOT_FOUND, 404, "no deliberation for task T-1"),
        (grpc.StatusCode.INVALID_ARGUMENT, 422, "task_id: bad"),
        (grpc.StatusCode.INTERNAL, 502, "orchestrator GetDeliberationResult failed: INTERNAL boom"),
        (grpc.StatusCode.UNAVAILABLE, 503, "orchestrator unavailable at 127.0.0.1:"),
    ],
)
async def test_orchestrator_errors_become_http_problems(
    orchestrator: FakeOrchestrator, api: httpx.AsyncClient, code: grpc.StatusCode, status: int, detail: str
):
    orchestrator.errors["GetDeliberationResult"] = (code, {404: detail, 422: detail}.get(status, "boom"))
    r = await api.get("/api/deliberations/T-1")
    assert r.status_code == status, r.text
    if status == 422:  # the field errors' shape: the orchestrator's words as the message
        assert r.json()["detail"] == [{"loc": ["request"], "msg": detail, "type": "value_error"}]
    else:
        assert detail in r.json()["detail"]
        assert r.json()["dependency"] == ("" if status == 404 else "orchestrator")


# --- councils and status: protobuf's JSON mapping of every field ----------------------------------------------------


def sample(field: FieldDescriptor) -> Any:
    if field.enum_type is not None:
        return field.enum_type.values[-1].number
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64):
        return 2**40 + 3  # beyond 32 bits: served as a JSON number, not the string protobuf's JSON would give
    return {
        FieldDescriptor.TYPE_STRING: f"{field.name}-value",
        FieldDescriptor.TYPE_BOOL: True,
        FieldDescriptor.TYPE_DOUBLE: 2.5,
        FieldDescriptor.TYPE_FLOAT: 2.5,
    }.get(field.type, 7)


def filled_message(message: Message) -> Message:
    """`message` with every field set to a non-default value, recursively (maps and lists get one entry)."""
    for f in message.DESCRIPTOR.fields:
        target = getattr(message, f.name)
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value = entry.fields_by_name["value"]
            if value.message_type is not None:
                filled_message(target[f"{f.name}-key"])
            else:
                target[f"{f.name}-key"] = sample(value)
        elif entry is not None:
            filled_message(target.add() if f.is_repeated else target)
        elif f.is_repeated:
            target.append(sample(f))
        else:
            setattr(message, f.name, sample(f))
    return message


def proto_fields_missing(descriptor: Any, value: dict[str, Any], path: str = "") -> list[str]:
    problems = [f"{path}{f.name}" for f in descriptor.fields if f.name not in value]
    for f in descriptor.fields:
        entry = f.message_type
        if entry is None or entry.GetOptions().map_entry or f.name not in value:
            continue
        for item in value[f.name] if f.is_repeated else [value[f.name]]:
            problems += proto_fields_missing(entry, item, f"{path}{f.name}.")
    return problems


@pytest.mark.parametrize(
    ("method", "reply", "path"),
    [
        ("ListCouncils", o.ListCouncilsResponse(), "/api/councils"),
        ("GetStatus", o.GetStatusResponse(), "/api/orchestrator/status"),
    ],
)
async def test_every_field_of_councils_and_status_reaches_the_api_json(
    orchestrator: FakeOrchestrator, api: httpx.AsyncClient, method: str, reply: Message, path: str
):
    orchestrator.replies[method] = filled_message(reply)
    r = await api.get(path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert proto_fields_missing(reply.DESCRIPTOR, body) == []
    assert body == to_json(reply)
    (await documented(api, path)).validate(body)


async def test_no_orchestrator_configured_is_said_plainly():
    client = OrchestratorClient("", timeout=1)
    with pytest.raises(OrchestratorUnavailable, match="not configured"):
        await client.councils()
    assert client.ok is False


# --- the approval request ---------------------------------------------------------------------------------------------


def test_the_approval_schema_is_the_catalogs_plus_what_its_validators_enforce():
    """ApprovalRequest is derived from the catalog's PlanApproved, not written again: its schema is the catalog's,
    with `timestamp` and `approved_by` optional and what the validators enforce stated where JSON Schema can."""
    ours, catalog = ApprovalRequest.model_json_schema(), ev.PlanApproved.model_json_schema()
    task, catalog_task = ours["$defs"].pop("ApprovalTask"), catalog["$defs"].pop("PlanTask")
    assert task["properties"]["description"].pop("pattern") == r"\S"
    assert task["properties"]["tests"].pop("format") == "pytest"
    for schema in (task, catalog_task, ours, catalog):
        schema.pop("title"), schema.pop("description", None)
    assert task == catalog_task

    props, catalog_props = ours["properties"], catalog["properties"]
    approver = props.pop("approved_by")  # optional: the token names the approver when the server authenticates
    assert approver["default"] is None and "approved_by" not in ours["required"]
    assert "token" in approver["description"]
    (text,) = [s for s in approver["anyOf"] if s.get("type") == "string"]
    catalog_approver = catalog_props.pop("approved_by")
    catalog_approver.pop("title")
    assert text.pop("pattern") == r"\S" and text == catalog_approver
    catalog["required"].remove("approved_by")
    assert props["roles"]["anyOf"][0].pop("minItems") == 1 and props["roles"]["anyOf"][0].pop("uniqueItems") is True
    assert "depends_on" in props["tasks"].pop("description")
    assert props["tasks"]["anyOf"][0].pop("items") == {"$ref": "#/$defs/ApprovalTask"}
    assert catalog_props["tasks"]["anyOf"][0].pop("items") == {"$ref": "#/$defs/PlanTask"}
    assert props.pop("timestamp")["default"] is None and "timestamp" not in ours["required"]
    catalog_props.pop("timestamp")
    catalog["required"].remove("timestamp")
    assert ours == catalog
