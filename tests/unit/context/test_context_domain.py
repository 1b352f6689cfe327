"""The context domain without I/O: scopes, selection, trimming to a budget, redaction, versions, supersession,
and the pure conversions of the gRPC adapter and the Cypher literal renderer."""

from __future__ import annotations

import dataclasses

import pytest

from fleet.context.v1 import context_pb2 as pb
from services.common.errors import InvalidArgument
from services.common.events import Role, StoryPhase
from services.common.falkordb import batches, cypher_literal, inline
from services.common.settings import SettingsError, env_vars, load_settings
from services.common.tokens import QwenBPE
from services.context.adapters.grpc_api import change_from_proto
from services.context.adapters.tokenizer import make_counter
from services.context.domain import (
    SCOPES,
    Decision,
    DecisionStatus,
    Milestone,
    Operation,
    Plan,
    Proposal,
    Scope,
    Story,
    StorySnapshot,
    Summary,
    Task,
    check_scopes,
    plan_chain,
    redact,
    scopes_for,
    story_version,
    supersession,
    title_from,
    with_versions,
)
from services.context.rendering import (
    Budget,
    CharEstimate,
    ContextRequest,
    RenderedContext,
    SubtaskNotFound,
    assemble,
    proposal_candidates,
    select,
)
from services.context.settings import ContextSettings

# --- a story ---------------------------------------------------------------------------------------------------

TASKS = (
    Task("T-api", description="Build the REST API", role=Role.DEV, priority=5, depends_on=("T-svc",)),
    Task("T-svc", description="Order service", role=Role.DEV, priority=3, depends_on=("T-db",)),
    Task("T-db", description="Orders schema", role=Role.DATA, priority=7),
    Task("T-e2e", description="End-to-end tests", role=Role.QA, depends_on=("T-api",)),
    Task("T-ops", description="Helm chart", role=Role.DEVOPS),
    Task("T-svc-1", description="Outbox relay", role=Role.DEV, parent_task_id="T-svc"),
)
DECISIONS = (
    Decision("D-api", "REST with OpenAPI", "standard", decided_at=3, affects_task_ids=("T-api",), proposal_id="P-api"),
    Decision("D-old", "SOAP", status=DecisionStatus.SUPERSEDED, decided_at=1, affects_task_ids=("T-api",)),
    Decision("D-db", "PostgreSQL", "transactions", decided_at=2, affects_task_ids=("T-db",)),
    Decision("D-wide", "Python 3.11 everywhere", decided_at=4),
    Decision("D-ops", "Helm over kustomize", decided_at=5, affects_task_ids=("T-ops",)),
    Decision("D-prop", "Maybe GraphQL", status=DecisionStatus.PROPOSED, decided_at=9, affects_task_ids=("T-api",)),
)
SNAP = StorySnapshot(
    story=Story("S-1", "Orders", "Customers place orders."),
    plans=with_versions([Plan("P-2", "po", 2000, (Role.DEV,)), Plan("P-1", "po", 1000, (Role.DEV, Role.QA))]),
    tasks=TASKS,
    decisions=DECISIONS,
    milestones=(Milestone("M-1", "Plan approved", at=1000),),
    summary=Summary("Latest: DEV decided on T-api.", 5),
)


def ids(items) -> list[str]:
    return [getattr(i, "task_id", None) or i.decision_id for i in items]


# --- scopes ----------------------------------------------------------------------------------------------------


def test_every_role_has_scopes_for_every_phase_with_the_api_names():
    assert set(SCOPES) == set(Role)
    for role in Role:
        assert set(SCOPES[role]) == set(StoryPhase)
        for phase in StoryPhase:
            granted = SCOPES[role][phase]
            assert {Scope.STORY, Scope.PLAN, Scope.TASKS_OWN, Scope.DECISIONS_RELEVANT} <= granted
    assert [p.value for p in StoryPhase] == ["DESIGN", "BUILD", "TEST", "DOCS"]
    assert Scope.DECISIONS_ALL in SCOPES[Role.ARCHITECT][StoryPhase.DESIGN]
    assert Scope.DECISIONS_ALL not in SCOPES[Role.DEV][StoryPhase.BUILD]
    assert Scope.PROPOSALS_WINNING in SCOPES[Role.DEV][StoryPhase.BUILD]
    assert scopes_for(Role.DEV, StoryPhase.DESIGN) == (
        Scope.STORY,
        Scope.PLAN,
        Scope.TASKS_OWN,
        Scope.TASKS_DEPENDENCIES,
        Scope.DECISIONS_RELEVANT,
    )


def test_check_scopes_reports_denied_and_missing():
    ok = check_scopes(Role.DEV, StoryPhase.BUILD, ["story", "TASKS.OWN"])
    assert ok.allowed and ok.denied == () and "proposals.winning" in ok.missing and "story" not in ok.missing
    no = check_scopes(Role.QA, StoryPhase.DESIGN, ["story", "decisions.all", "tasks.all", "decisions.all"])
    assert not no.allowed and no.denied == ("decisions.all", "tasks.all") and "QA may not see" in no.reason
    with pytest.raises(InvalidArgument) as info:
        check_scopes(Role.DEV, StoryPhase.BUILD, ["story", "passwords"])
    assert info.value.field == "scopes[1]"


@pytest.mark.parametrize(("value", "parsed"), [("build", StoryPhase.BUILD), (" DOCS ", StoryPhase.DOCS)])
def test_phase_parse(value, parsed):
    assert StoryPhase.parse(value) is parsed


def test_phase_parse_names_the_field():
    with pytest.raises(InvalidArgument) as info:
        StoryPhase.parse("SHIP")
    assert info.value.field == "phase" and "DESIGN, BUILD, TEST, DOCS" in info.value.description


def test_budget_defaults_and_limits():
    b = Budget(default=2048, minimum=256, maximum=32768)
    assert b.resolve(0) == 2048 and b.resolve(256) == 256
    for bad in (255, 1, -5, 40000):
        with pytest.raises(InvalidArgument) as info:
            b.resolve(bad)
        assert info.value.field == "token_budget"


# --- selection ---------------------------------------------------------------------------------------------


def test_selection_bands_for_a_developer():
    sel = select(SNAP, Role.DEV, StoryPhase.BUILD)
    assert ids(sel.own) == ["T-api", "T-svc", "T-svc-1"]  # by priority, then id
    assert ids(sel.dependencies) == ["T-db"]  # transitive: T-svc depends on T-db
    assert ids(sel.own_decisions) == ["D-api", "D-prop"]  # ACCEPTED before PROPOSED
    assert ids(sel.story_wide) == ["D-wide"]
    assert ids(sel.dependency_decisions) == ["D-db"]
    assert sel.others == () and sel.other_decisions == () and sel.history == ()  # not in DEV's scopes
    assert proposal_candidates(sel) == ["P-api"]


def test_selection_for_the_architect_includes_everything_else():
    sel = select(SNAP, Role.ARCHITECT, StoryPhase.DESIGN)
    assert sel.own == () and ids(sel.others) == ["T-db", "T-api", "T-svc", "T-e2e", "T-ops", "T-svc-1"]
    assert ids(sel.other_decisions) == ["D-ops", "D-api", "D-db", "D-prop"]
    assert ids(sel.history) == ["D-old"]
    assert proposal_candidates(sel) == []  # no proposals.winning for the architect in DESIGN


def test_a_subtask_narrows_to_itself_and_its_parents():
    sel = select(SNAP, Role.DEV, StoryPhase.BUILD, "T-svc-1")
    assert ids(sel.focus) == ["T-svc-1", "T-svc"] and sel.own == ()
    assert ids(sel.dependencies) == ["T-db"] and ids(sel.own_decisions) == []
    with pytest.raises(SubtaskNotFound):
        select(SNAP, Role.DEV, StoryPhase.BUILD, "T-nope")


# --- assembling and trimming -----------------------------------------------------------------------------------


def req(role=Role.DEV, phase=StoryPhase.BUILD, budget=4096, subtask=""):
    return ContextRequest("S-1", role, phase, budget, subtask)


@pytest.fixture(scope="module", params=["estimate", "qwen"])
def counter(request):
    if request.param == "estimate":
        return CharEstimate()
    return QwenBPE()


def test_the_context_is_rendered_in_relevance_order(counter):
    ctx = assemble(SNAP, req(), counter, {"P-api": Proposal("P-api", "agent-1", "```python\nprint(1)\n```", 8.0)})
    text = ctx.context
    order = ["## Plan", "## Your tasks", "[T-api]", "## Decisions on your tasks", "[D-api]", "[D-prop]"]
    order += ["## Winning proposals", "print(1)", "## Story-wide decisions", "[D-wide]", "## Dependencies", "[T-db]"]
    order += ["## Decisions on dependencies", "[D-db]"]
    positions = [text.index(x) for x in order]
    assert positions == sorted(positions)
    assert "[T-e2e]" not in text and "[D-ops]" not in text and "[D-old]" not in text and "## Summary" not in text
    assert "P-2 (version 2)" in text  # the current plan
    assert ctx.text == f"{ctx.system}\n\n{ctx.context}\n\n{ctx.tools}"
    assert ctx.token_count == counter.count(ctx.text) and ctx.tokenizer == counter.name and ctx.dropped == ()


@pytest.mark.parametrize("budget", [256, 300, 400, 600])
def test_the_budget_is_never_exceeded_and_drops_are_reported(counter, budget):
    big = dataclasses.replace(
        SNAP,
        decisions=SNAP.decisions
        + tuple(
            Decision(f"D-{i:03d}", f"Decision {i} " + "word " * 30, decided_at=100 + i, affects_task_ids=("T-db",))
            for i in range(60)
        ),
    )
    ctx = assemble(big, req(Role.ARCHITECT, StoryPhase.DESIGN, budget), counter)
    assert ctx.token_count <= budget and ctx.token_count == counter.count(ctx.text)
    assert ctx.dropped
    for key in ctx.dropped:
        kind, _, ident = key.partition(":")
        if kind in ("task", "decision"):
            assert f"[{ident}]" not in ctx.context
    kept = [f"D-{i:03d}" for i in range(60) if f"[D-{i:03d}]" in ctx.context]
    if kept:  # the newest decisions are kept first
        assert kept == [f"D-{i:03d}" for i in range(60 - len(kept), 60)]


def test_the_most_relevant_items_survive_a_tight_budget(counter):
    ctx = assemble(SNAP, req(budget=256), counter)
    fixed = counter.count(ctx.system) + counter.count(ctx.tools)
    assert fixed < 256
    assert ctx.dropped, "this budget cannot hold the whole context"
    # What is kept is a prefix of the ranking: the items dropped rank after everything kept, save those too large.
    ranking = ["story.description", "plan", "task:T-api", "task:T-svc", "task:T-svc-1", "decision:D-api"]
    kept = [k for k in ranking if k not in ctx.dropped]
    assert kept and kept[0] == "story.description"


def test_secrets_are_redacted_in_every_block():
    leaky = dataclasses.replace(
        SNAP,
        story=Story("S-1", "Orders", "Use AKIAIOSFODNN7EXAMPLE and password: hunter2hunter2"),
        decisions=(Decision("D-1", "Token", "Authorization: Bearer abcdefghijklmnopqrstuvwxyz123456"),),
    )
    ctx = assemble(leaky, req(), CharEstimate())
    assert "AKIAIOSFODNN7EXAMPLE" not in ctx.text and "hunter2hunter2" not in ctx.text
    assert "abcdefghijklmnopqrstuvwxyz123456" not in ctx.text
    assert ctx.redactions == 3


def test_versions_follow_the_content():
    a = assemble(SNAP, req(), CharEstimate())
    assert assemble(SNAP, req(), CharEstimate()).version == a.version  # deterministic
    changed = dataclasses.replace(
        SNAP, decisions=(*SNAP.decisions, Decision("D-new", "New", affects_task_ids=("T-api",)))
    )
    assert assemble(changed, req(), CharEstimate()).version != a.version
    assert assemble(SNAP, req(Role.QA), CharEstimate()).version != a.version
    # The story version ignores the order things were read in, but not their content.
    shuffled = dataclasses.replace(SNAP, tasks=tuple(reversed(SNAP.tasks)), decisions=tuple(reversed(SNAP.decisions)))
    assert story_version(shuffled) == story_version(SNAP)
    assert story_version(changed) != story_version(SNAP)
    assert story_version(dataclasses.replace(SNAP, summary=Summary("other", 6))) != story_version(SNAP)


def test_rendered_context_round_trips_through_json():
    ctx = assemble(SNAP, req(budget=300), CharEstimate())
    assert RenderedContext.from_json(ctx.to_json()) == ctx


# --- redaction -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("key AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
        ("token ghp_" + "x1" * 18, "ghp_x1x1"),
        ("OPENAI_API_KEY=sk-proj-abcdefghij0123456789XYZ", "abcdefghij0123456789"),
        ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890"),
        ('{"password": "correct horse battery"}', "correct"),
        ("db_password = 'Pa55word!'", "Pa55word!"),
        ("client_secret: s3cr3t-value", "s3cr3t-value"),
        ("redis://default:verysecret@valkey:6379/0", "verysecret"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlc2ln", "eyJhbGci"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXk"),
        ("AIza" + "B" * 35, "AIzaBBBB"),
    ],
)
def test_redaction_removes_secrets(text, secret):
    out, n = redact(text)
    assert secret not in out and n >= 1 and "[REDACTED:" in out


@pytest.mark.parametrize(
    "text",
    [
        "the token budget is 2048 tokens",
        "max_tokens=512",
        "password: ${DB_PASSWORD}",
        "secretKeyRef:\n  name: db",
        "api_key: <your key>",
        "password: str",
        "https://example.com/path@v1",
        "tokens: 12",
    ],
)
def test_redaction_leaves_ordinary_text_alone(text):
    assert redact(text) == (text, 0)


# --- deliberations, plans -----------------------------------------------------------------------------------


def test_supersession_keeps_the_newest_whatever_the_order():
    ds = [Decision("D-b", "b", decided_at=2), Decision("D-c", "c", decided_at=3), Decision("D-a", "a", decided_at=1)]
    statuses, edges = supersession(ds)
    assert statuses == {"D-a": "SUPERSEDED", "D-b": "SUPERSEDED", "D-c": "ACCEPTED"}
    assert edges == [("D-b", "D-a"), ("D-c", "D-b")]
    assert supersession([]) == ({}, [])


def test_plans_are_versioned_by_approval_time():
    plans = [Plan("P-b", approved_at=20), Plan("P-a", approved_at=10), Plan("P-c", approved_at=30)]
    assert [(p.plan_id, p.version) for p in with_versions(plans)] == [("P-a", 1), ("P-b", 2), ("P-c", 3)]
    assert plan_chain(plans) == [("P-b", "P-a"), ("P-c", "P-b")]
    assert SNAP.current_plan.plan_id == "P-2"


@pytest.mark.parametrize(
    ("content", "title"),
    [
        ("# Use an outbox\nbody", "Use an outbox"),
        ("```python\nx = 1\n```\n- **Cache with Valkey**", "Cache with Valkey"),
        ("", "fallback"),
        ("word " * 60, ("word " * 23).strip() + "…"),
    ],
)
def test_decision_titles_come_from_the_proposal(content, title):
    assert title_from(content, "fallback") == title


# --- adapters' pure parts ----------------------------------------------------------------------------------


def test_change_from_proto_validates_and_names_fields():
    c = change_from_proto(
        pb.ContextChange(operation=pb.OPERATION_UPDATE, task=pb.Task(task_id="T-1", status="done", priority=4)), 0
    )
    assert c.operation is Operation.UPDATE and c.entity.status == "DONE" and c.fields == {"status", "priority"}
    bad = [
        (pb.ContextChange(task=pb.Task(task_id="T-1")), "changes[2].operation"),
        (pb.ContextChange(operation=pb.OPERATION_CREATE), "changes[2].entity"),
        (pb.ContextChange(operation=pb.OPERATION_CREATE, task=pb.Task(task_id="T 1")), "changes[2].task.task_id"),
        (
            pb.ContextChange(operation=pb.OPERATION_CREATE, task=pb.Task(task_id="T-1", title="x")),
            "changes[2].task.role",
        ),
        (
            pb.ContextChange(
                operation=pb.OPERATION_CREATE, decision=pb.Decision(decision_id="D-1", title="t", status="NO")
            ),
            "changes[2].decision.status",
        ),
        (
            pb.ContextChange(operation=pb.OPERATION_CREATE, decision=pb.Decision(decision_id="D-1", title="x" * 301)),
            "changes[2].decision.title",
        ),
        (
            pb.ContextChange(
                operation=pb.OPERATION_CREATE, task=pb.Task(task_id="T-1", title="x", role="DEV", depends_on=["T-1"])
            ),
            "changes[2].task.depends_on",
        ),
    ]
    for change, field in bad:
        with pytest.raises(InvalidArgument) as info:
            change_from_proto(change, 2)
        assert info.value.field == field


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("it's", r"'it\'s'"),
        ("back\\slash", r"'back\\slash'"),
        ("nul\x00", "'nul'"),
        ([1, "a", None, True], "[1, 'a', null, true]"),
        ({"a b": 1.5}, "{`a b`: 1.5}"),
    ],
)
def test_cypher_literals(value, literal):
    assert cypher_literal(value) == literal


def test_inline_replaces_every_parameter_once():
    q = inline("MATCH (n {id: $id}) SET n.t = $text RETURN $id", {"id": "x", "text": "$id"})
    assert q == "MATCH (n {id: 'x'}) SET n.t = '$id' RETURN 'x'"
    with pytest.raises(ValueError):
        cypher_literal(float("nan"))


def test_batches_respect_the_size_limit():
    rows = [{"id": i, "text": "x" * 1000} for i in range(100)]
    groups = list(batches(rows, max_bytes=10_000))
    assert sum(len(g) for g in groups) == 100 and all(len(g) <= 10 for g in groups)
    assert [r["id"] for g in groups for r in g] == list(range(100))


# --- settings and token counters -----------------------------------------------------------------------------


def test_settings_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("NEO4J_URI", "neo4j://graph:7687")
    monkeypatch.setenv("NEO4J_PASSWORD", "s3cret")
    s = load_settings(ContextSettings)
    assert s.grpc_port == 50054 and s.neo4j_uri == "neo4j://graph:7687" and s.neo4j_database == "neo4j"
    assert s.neo4j_password.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    assert {"NEO4J_URI", "NEO4J_USER", "NEO4J_PASSWORD", "NEO4J_DATABASE", "GRPC_PORT", "VALKEY_URL"} <= set(
        env_vars(ContextSettings)
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [("NEO4J_URI", "http://graph"), ("GRAPH_BACKEND", "sqlite"), ("CONTEXT_MIN_TOKEN_BUDGET", "4096")],
)
def test_a_wrong_setting_is_reported(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings(ContextSettings)
    assert var in str(info.value) or "CONTEXT_MIN_TOKEN_BUDGET" in str(info.value)


def test_token_counters():
    assert make_counter("estimate").name == "estimate:chars/4" and CharEstimate().count("abcdefgh") == 2
    qwen = make_counter("auto")
    assert qwen.name == "qwen3-bpe" and qwen.count("hello world") == 2 and qwen.count("") == 0
