"""The gRPC bootstrap (health, reflection, error mapping) and the graph reached over Bolt."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fleet.context.v1 import context_pb2, context_pb2_grpc
from services.common import errors
from services.common.auth import Guard
from services.common.grpc_server import GrpcServer, method_names

pytestmark = pytest.mark.integration


def open_guard() -> Guard:
    """Authentication off: every method of the service open to every caller."""
    return Guard(None, {m: "viewer" for m in method_names("fleet.context.v1.ContextService")})


class Servicer(context_pb2_grpc.ContextServiceServicer):
    """Raises what the request's story_id names, to exercise the interceptor."""

    async def GetContext(self, request, context):
        match request.story_id:
            case "invalid":
                raise errors.InvalidArgument("token_budget", "must be at least 256")
            case "missing":
                raise errors.NotFound("story missing not found")
            case "down":
                raise errors.Unavailable("graph unreachable")
            case "bug":
                raise ZeroDivisionError("oops")
        return context_pb2.GetContextResponse(context="ok", version="v1")


@pytest.fixture
async def channel():
    server = GrpcServer(
        [(context_pb2_grpc.add_ContextServiceServicer_to_server, Servicer(), "fleet.context.v1.ContextService")],
        port=0,
        host="127.0.0.1",
        guard=open_guard(),
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch
    await server.stop(0.5)


async def test_health_answers_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "fleet.context.v1.ContextService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in reply.list_services_response.service}
        assert {"fleet.context.v1.ContextService", "grpc.health.v1.Health"} <= names
        break


def details(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    return status_pb2.Status.FromString(raw)


@pytest.mark.parametrize(
    ("story", "code"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
        ("missing", grpc.StatusCode.NOT_FOUND),
        ("down", grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_domain_errors_map_to_status_codes_with_details(channel, story, code):
    stub = context_pb2_grpc.ContextServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetContext(context_pb2.GetContextRequest(story_id=story))
    assert info.value.code() == code
    status = details(info.value)
    assert status.code == code.value[0]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == "token_budget"
        assert info.value.details() == "token_budget: must be at least 256"


async def test_unexpected_errors_say_where_to_look(channel):
    stub = context_pb2_grpc.ContextServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetContext(context_pb2.GetContextRequest(story_id="bug"), metadata=(("x-correlation-id", "cid-7"),))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in info.value.details() and "cid-7" in info.value.details()


async def test_ok_path(channel):
    reply = await context_pb2_grpc.ContextServiceStub(channel).GetContext(context_pb2.GetContextRequest(story_id="s"))
    assert reply.version == "v1"


async def test_graph_through_the_neo4j_driver_over_bolt(bolt_uri):
    """The official neo4j driver (async) talks to FalkorDB's Bolt port: MERGE is idempotent."""
    from neo4j import AsyncGraphDatabase

    story, plan = f"S-{uuid.uuid4().hex[:8]}", f"P-{uuid.uuid4().hex[:8]}"
    driver = AsyncGraphDatabase.driver(bolt_uri, auth=("falkordb", ""))
    try:
        for _ in range(2):
            await driver.execute_query(
                "MERGE (s:Story {id: $id}) ON CREATE SET s.title = $title "
                "MERGE (p:Plan {id: $plan}) MERGE (s)-[:HAS_PLAN]->(p)",
                id=story,
                title="t",
                plan=plan,
            )
        records, _, _ = await driver.execute_query(
            "MATCH (s:Story {id: $id})-[:HAS_PLAN]->(p:Plan) RETURN s.id AS story, p.id AS plan, count(*) AS n",
            id=story,
        )
        assert [dict(r) for r in records] == [{"story": story, "plan": plan, "n": 1}]
    finally:
        await driver.close()
