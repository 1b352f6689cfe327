"""Every context RPC through real gRPC, with the graph on FalkorDB (Bolt), Valkey and NATS."""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.context.v1 import context_pb2 as pb
from fleet.context.v1 import context_pb2_grpc
from services.common import events as ev
from services.context.main import start

from .conftest import T0, deliberation_event, plan_event, stream_messages, wait_for

pytestmark = pytest.mark.integration


async def seed(service, story_id: str, decisions: int = 0) -> None:
    """A plan and `decisions` deliberations (alternating over the DEV and DATA tasks), through the handlers."""
    await service.app.on_plan_approved(plan_event(story_id))
    for i in range(decisions):
        task, role = [("T-svc", "DEV"), ("T-db", "DATA"), ("T-api", "DEV")][i % 3]
        await service.app.on_deliberation_completed(
            deliberation_event(
                story_id,
                task,
                role,
                f"d{i:03d}",
                content=f"Decision number {i} about {task}: " + "reasoning " * 20,
                at=T0 + timedelta(minutes=i + 1),
            )
        )


def get(story_id: str, role: str = "DEV", phase: str = "BUILD", budget: int = 0, subtask: str = ""):
    return pb.GetContextRequest(story_id=story_id, role=role, phase=phase, token_budget=budget, subtask_id=subtask)


async def test_get_context_is_scoped_to_the_role(service, stub, story_id):
    await seed(service, story_id, decisions=3)  # d000 on T-svc (DEV), d001 on T-db (DATA), d002 on T-api (DEV)

    dev = await stub.GetContext(get(story_id, "DEV", "BUILD"))
    assert dev.tokenizer == service.app.counter.name and dev.tokenizer in ("qwen3-bpe", "estimate:chars/4")
    assert 0 < dev.token_count <= 2048 and not dev.dropped
    assert list(dev.scopes) == [
        "story",
        "plan",
        "tasks.own",
        "tasks.dependencies",
        "decisions.relevant",
        "proposals.winning",
    ]
    assert dev.context == "\n\n".join([dev.blocks.system, dev.blocks.context, dev.blocks.tools])
    assert "You are the DEV member" in dev.blocks.system and "fenced blocks" in dev.blocks.tools
    text = dev.blocks.context
    # Own tasks first, then the decisions on them with their winning proposals, then the dependency (T-db, DATA)
    # and the decision on it; the QA task is nobody's dependency of DEV: not shown.
    for needle in ("[T-api]", "[T-svc]", "[DEC-d000]", "[DEC-d002]", "## Winning proposals", "[T-db]", "[DEC-d001]"):
        assert needle in text, needle
    assert text.index("## Your tasks") < text.index("## Decisions on your tasks") < text.index("## Dependencies")
    assert "[T-e2e]" not in text

    qa = await stub.GetContext(get(story_id, "QA", "DESIGN"))
    assert "[T-e2e]" in qa.blocks.context and "[T-svc]" in qa.blocks.context  # its task and its dependency
    assert "[T-api]" not in qa.blocks.context and "Winning proposals" not in qa.blocks.context

    architect = await stub.GetContext(get(story_id, "ARCHITECT", "DESIGN"))
    for needle in ("[T-api]", "[T-svc]", "[T-db]", "[T-e2e]", "[DEC-d000]", "[DEC-d001]", "## Milestones"):
        assert needle in architect.blocks.context, needle
    assert "decisions.all" in architect.scopes and "decisions.all" not in dev.scopes
    assert len({dev.version, qa.version, architect.version}) == 3


async def test_the_budget_is_respected_and_what_was_dropped_is_reported(service, stub, story_id):
    await seed(service, story_id, decisions=12)
    small = await stub.GetContext(get(story_id, "ARCHITECT", "DESIGN", budget=300))
    assert small.token_count <= 300 and small.dropped
    for key in small.dropped:
        kind, _, ident = key.partition(":")
        if kind in ("decision", "task"):
            assert f"[{ident}]" not in small.blocks.context
    big = await stub.GetContext(get(story_id, "ARCHITECT", "DESIGN", budget=8000))
    assert not big.dropped and small.token_count < big.token_count <= 8000
    # Relevance decides what stays: the architect's own... has no tasks; the newest live decisions stay longest.
    medium = await stub.GetContext(get(story_id, "DEV", "BUILD", budget=600))
    assert medium.token_count <= 600
    kept = [k for k in ("[T-api]", "[T-svc]") if k in medium.blocks.context]
    assert kept, "the role's own tasks are the first things kept"
    assert "decision:DEC-d001" in medium.dropped or "[DEC-d001]" not in medium.blocks.context


async def test_update_context_invalidates_the_cache(service, stub, bus, story_id):
    await seed(service, story_id, decisions=1)
    first = await stub.GetContext(get(story_id))
    again = await stub.GetContext(get(story_id))
    assert again == first
    assert await service.valkey.hlen(f"fleet:ctx:{{{story_id}}}:cache") == 1  # served from the cache

    reply = await stub.UpdateContext(
        pb.UpdateContextRequest(
            story_id=story_id,
            actor="ARCHITECT-agent-1",
            correlation_id="cid-upd",
            changes=[
                pb.ContextChange(
                    operation=pb.OPERATION_CREATE,
                    decision=pb.Decision(
                        decision_id="D-pg",
                        title="Store orders in PostgreSQL",
                        rationale="Transactions and JSONB.",
                        status="ACCEPTED",
                        alternatives=["MongoDB", "SQLite"],
                        affects_task_ids=["T-svc", "T-nope"],
                    ),
                ),
                pb.ContextChange(
                    operation=pb.OPERATION_CREATE,
                    milestone=pb.Milestone(milestone_id="M-1", name="Schema frozen", at=1_790_000_000_000),
                ),
                pb.ContextChange(
                    operation=pb.OPERATION_UPDATE, task=pb.Task(task_id="T-svc", status="IN_PROGRESS", priority=9)
                ),
                pb.ContextChange(operation=pb.OPERATION_DELETE, decision=pb.Decision(decision_id="D-missing")),
            ],
        )
    )
    assert reply.applied == 3 and reply.version
    assert any("T-nope" in w for w in reply.warnings) and any("D-missing" in w for w in reply.warnings)
    assert await service.valkey.hlen(f"fleet:ctx:{{{story_id}}}:cache") == 0

    after = await stub.GetContext(get(story_id))
    assert after.version != first.version
    assert "[D-pg]" in after.blocks.context and "Store orders in PostgreSQL" in after.blocks.context
    assert "alternatives considered: MongoDB; SQLite" in after.blocks.context
    assert "[T-svc] DEV · IN_PROGRESS · priority 9" in after.blocks.context

    updated = await wait_for(
        lambda: stream_messages(bus, ev.Streams.CONTEXT, ev.PAYLOAD_TYPES[ev.ContextUpdated].event_type)
    )
    last = json.loads(updated[-1].data)
    assert last["payload"]["version"] == reply.version and last["correlation_id"] == "cid-upd"
    added = [
        json.loads(m.data)["payload"]
        for m in await stream_messages(bus, ev.Streams.CONTEXT, ev.PAYLOAD_TYPES[ev.DecisionAdded].event_type)
    ]
    assert {"D-pg", "DEC-d000"} == {a["decision_id"] for a in added}

    # Deleting it is visible at once too; the same update again changes nothing.
    delete = pb.UpdateContextRequest(
        story_id=story_id,
        changes=[pb.ContextChange(operation=pb.OPERATION_DELETE, decision=pb.Decision(decision_id="D-pg"))],
    )
    assert (await stub.UpdateContext(delete)).applied == 1
    assert "[D-pg]" not in (await stub.GetContext(get(story_id))).blocks.context
    again = await stub.UpdateContext(delete)
    assert again.applied == 0 and again.warnings


async def test_subtasks_narrow_the_context(service, stub, story_id):
    await seed(service, story_id, decisions=3)
    await stub.UpdateContext(
        pb.UpdateContextRequest(
            story_id=story_id,
            changes=[
                pb.ContextChange(
                    operation=pb.OPERATION_CREATE,
                    task=pb.Task(task_id="T-svc-1", description="Outbox relay", role="DEV", parent_task_id="T-svc"),
                )
            ],
        )
    )
    ctx = await stub.GetContext(get(story_id, "DEV", "BUILD", subtask="T-svc-1"))
    assert "subtask" in ctx.scopes and "## Focus" in ctx.blocks.context
    assert "[T-svc-1]" in ctx.blocks.context and "[T-svc]" in ctx.blocks.context  # the subtask and its parent
    assert "[DEC-d000]" in ctx.blocks.context  # on the parent
    assert "[T-api]" not in ctx.blocks.context and "[DEC-d002]" not in ctx.blocks.context


async def test_secrets_are_redacted(service, stub, story_id):
    await service.app.on_plan_approved(
        plan_event(
            story_id,
            description="Deploy with AWS key AKIAIOSFODNN7EXAMPLE and db_password=Sup3rS3cret!",
            tasks=[ev.PlanTask(task_id="T-1", description="Call the API with token ghp_" + "a1B2" * 9, role="DEV")],
        )
    )
    await service.app.on_deliberation_completed(
        deliberation_event(
            story_id,
            "T-1",
            content="Connect to postgres://orders:hunter2hunter2@db:5432/orders\n"
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        )
    )
    ctx = await stub.GetContext(get(story_id, "DEV", "BUILD"))
    for secret in ("AKIAIOSFODNN7EXAMPLE", "Sup3rS3cret!", "a1B2a1B2", "hunter2hunter2", "MIIEowIBAAKCAQEA"):
        assert secret not in ctx.context, secret
    assert "[REDACTED:aws-access-key]" in ctx.context and "db_password=[REDACTED:secret]" in ctx.context
    assert "postgres://orders:[REDACTED:password]@db:5432/orders" in ctx.context


async def test_rehydrate_session_and_validate_scope(service, stub, story_id):
    await seed(service, story_id, decisions=2)
    reply = await stub.RehydrateSession(
        pb.RehydrateSessionRequest(story_id=story_id, roles=["dev", "QA"], phase="TEST")
    )
    assert [p.role for p in reply.packs] == ["DEV", "QA"]
    single = await stub.GetContext(get(story_id, "QA", "TEST"))
    assert reply.packs[1].version == single.version and reply.packs[1].context == single.context
    all_roles = await stub.RehydrateSession(pb.RehydrateSessionRequest(story_id=story_id, phase="DOCS"))
    assert [p.role for p in all_roles.packs] == ["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"]

    ok = await stub.ValidateScope(pb.ValidateScopeRequest(role="DEV", phase="BUILD", scopes=["story", "tasks.own"]))
    assert ok.allowed and not ok.denied and "decisions.relevant" in ok.missing
    no = await stub.ValidateScope(pb.ValidateScopeRequest(role="DEV", phase="BUILD", scopes=["decisions.all"]))
    assert not no.allowed and list(no.denied) == ["decisions.all"] and "DEV may not see" in no.reason


def violation(err: grpc.aio.AioRpcError) -> str:
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field


async def test_get_context_errors(stub):
    cases = [
        (get("S-unknown"), grpc.StatusCode.NOT_FOUND, None),
        (get("S-x", budget=100), grpc.StatusCode.INVALID_ARGUMENT, "token_budget"),
        (get("S-x", budget=10**6), grpc.StatusCode.INVALID_ARGUMENT, "token_budget"),
        (get("S-x", role="CEO"), grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (get("S-x", phase="SHIP"), grpc.StatusCode.INVALID_ARGUMENT, "phase"),
        (get("bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "story_id"),
    ]
    for request, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetContext(request)
        assert info.value.code() == code, request
        if field:
            assert violation(info.value) == field


async def test_other_rpc_errors_name_the_field(service, stub, story_id):
    await seed(service, story_id)
    cases = [
        (
            stub.UpdateContext(
                pb.UpdateContextRequest(
                    story_id="S-nobody",
                    changes=[pb.ContextChange(operation=3, milestone=pb.Milestone(milestone_id="M"))],
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            None,
        ),
        (
            stub.UpdateContext(
                pb.UpdateContextRequest(
                    story_id=story_id,
                    changes=[
                        pb.ContextChange(
                            operation=1, decision=pb.Decision(decision_id="D-1", title="t", status="MAYBE")
                        )
                    ],
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "changes[0].decision.status",
        ),
        (
            stub.UpdateContext(pb.UpdateContextRequest(story_id=story_id, changes=[pb.ContextChange(operation=1)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "changes[0].entity",
        ),
        (stub.GetContext(get(story_id, subtask="T-none")), grpc.StatusCode.NOT_FOUND, None),
        (
            stub.ValidateScope(pb.ValidateScopeRequest(role="DEV", phase="BUILD", scopes=["story", "secrets"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scopes[1]",
        ),
        (
            stub.RehydrateSession(pb.RehydrateSessionRequest(story_id=story_id, roles=["DEV", "PM"], phase="TEST")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "roles[1]",
        ),
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code, info.value.details()
        if field:
            assert violation(info.value) == field


async def test_graph_down_is_unavailable(ctx_settings, bus):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    settings = ctx_settings.model_copy(update={"neo4j_uri": f"bolt://127.0.0.1:{closed}"})
    running = await start(settings, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="fleet.context.v1.ContextService")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await context_pb2_grpc.ContextServiceStub(channel).GetContext(get("S-1"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"127.0.0.1:{closed}" in info.value.details()
    finally:
        await running.stop(0.5)
