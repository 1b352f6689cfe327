"""The context service's gRPC API: request validation and proto <-> domain conversion (only here)."""

from __future__ import annotations

from fleet.context.v1 import context_pb2 as pb
from fleet.context.v1 import context_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.events import Role
from services.context.application import ContextService
from services.context.domain import (
    MAX_LIST_ITEM,
    MAX_LIST_ITEMS,
    MAX_TEXT,
    MAX_TITLE,
    Change,
    Decision,
    DecisionStatus,
    Milestone,
    Operation,
    Task,
    TaskStatus,
    check_id,
)
from services.context.rendering import RenderedContext

OPERATIONS = {
    pb.OPERATION_CREATE: Operation.CREATE,
    pb.OPERATION_UPDATE: Operation.UPDATE,
    pb.OPERATION_DELETE: Operation.DELETE,
}


def _text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")
    return value.replace("\x00", "")


def _texts(values, field: str) -> tuple[str, ...]:
    if len(values) > MAX_LIST_ITEMS:
        raise InvalidArgument(field, f"must have at most {MAX_LIST_ITEMS} items, got {len(values)}")
    return tuple(_text(v, f"{field}[{i}]", MAX_LIST_ITEM) for i, v in enumerate(values) if v.strip())


def _ids(values, field: str) -> tuple[str, ...]:
    if len(values) > 100:
        raise InvalidArgument(field, f"must have at most 100 ids, got {len(values)}")
    return tuple(dict.fromkeys(check_id(v, f"{field}[{i}]") for i, v in enumerate(values)))


def _decision(d: pb.Decision, f: str, op: Operation) -> tuple[Decision, frozenset[str]]:
    decision_id = check_id(d.decision_id, f"{f}.decision_id")
    if op is Operation.CREATE and not d.title.strip():
        raise InvalidArgument(f"{f}.title", "is required to create a decision")
    if d.decided_at < 0:
        raise InvalidArgument(f"{f}.decided_at", "must be unix milliseconds >= 0")
    decision = Decision(
        decision_id=decision_id,
        title=_text(d.title.strip(), f"{f}.title", MAX_TITLE),
        rationale=_text(d.rationale, f"{f}.rationale", MAX_TEXT),
        status=DecisionStatus.parse(d.status, f"{f}.status") if d.status.strip() else DecisionStatus.ACCEPTED,
        decided_by=_text(d.decided_by.strip(), f"{f}.decided_by", 120),
        decided_at=d.decided_at,
        alternatives=_texts(d.alternatives, f"{f}.alternatives"),
        affects_task_ids=_ids(d.affects_task_ids, f"{f}.affects_task_ids"),
        supersedes=(check_id(d.supersedes, f"{f}.supersedes"),) if d.supersedes.strip() else (),
    )
    given = {
        "title": bool(d.title.strip()),
        "rationale": bool(d.rationale),
        "status": bool(d.status.strip()),
        "decided_by": bool(d.decided_by.strip()),
        "decided_at": d.decided_at > 0,
        "alternatives": len(d.alternatives) > 0,
        "affects_task_ids": len(d.affects_task_ids) > 0,
        "supersedes": bool(d.supersedes.strip()),
    }
    return decision, frozenset(k for k, v in given.items() if v)


def _task(t: pb.Task, f: str, op: Operation) -> tuple[Task, frozenset[str]]:
    task_id = check_id(t.task_id, f"{f}.task_id")
    if op is Operation.CREATE and not t.role.strip():
        raise InvalidArgument(f"{f}.role", "is required to create a task")
    if op is Operation.CREATE and not (t.title.strip() or t.description.strip()):
        raise InvalidArgument(f"{f}.description", "a title or a description is required to create a task")
    if not 0 <= t.priority <= 10:
        raise InvalidArgument(f"{f}.priority", f"must be 0..10, got {t.priority}")
    parent = check_id(t.parent_task_id, f"{f}.parent_task_id") if t.parent_task_id.strip() else ""
    if parent == task_id:
        raise InvalidArgument(f"{f}.parent_task_id", "a task cannot be its own parent")
    depends = _ids(t.depends_on, f"{f}.depends_on")
    if task_id in depends:
        raise InvalidArgument(f"{f}.depends_on", "a task cannot depend on itself")
    task = Task(
        task_id=task_id,
        title=_text(t.title.strip(), f"{f}.title", MAX_TITLE),
        description=_text(t.description, f"{f}.description", MAX_TEXT),
        role=Role.parse(t.role, f"{f}.role") if t.role.strip() else None,
        status=TaskStatus.parse(t.status, f"{f}.status") if t.status.strip() else TaskStatus.PLANNED,
        priority=t.priority,
        depends_on=depends,
        parent_task_id=parent,
    )
    given = {
        "title": bool(t.title.strip()),
        "description": bool(t.description),
        "role": bool(t.role.strip()),
        "status": bool(t.status.strip()),
        "priority": t.priority > 0,
        "depends_on": len(t.depends_on) > 0,
        "parent_task_id": bool(parent),
    }
    return task, frozenset(k for k, v in given.items() if v)


def _milestone(m: pb.Milestone, f: str, op: Operation) -> tuple[Milestone, frozenset[str]]:
    milestone_id = check_id(m.milestone_id, f"{f}.milestone_id")
    if op is Operation.CREATE and not m.name.strip():
        raise InvalidArgument(f"{f}.name", "is required to create a milestone")
    if m.at < 0:
        raise InvalidArgument(f"{f}.at", "must be unix milliseconds >= 0")
    milestone = Milestone(
        milestone_id=milestone_id,
        name=_text(m.name.strip(), f"{f}.name", MAX_TITLE),
        description=_text(m.description, f"{f}.description", MAX_TEXT),
        at=m.at,
    )
    given = {"name": bool(m.name.strip()), "description": bool(m.description), "at": m.at > 0}
    return milestone, frozenset(k for k, v in given.items() if v)


def change_from_proto(c: pb.ContextChange, i: int) -> Change:
    f = f"changes[{i}]"
    op = OPERATIONS.get(c.operation)
    if op is None:
        raise InvalidArgument(f"{f}.operation", "must be OPERATION_CREATE, OPERATION_UPDATE or OPERATION_DELETE")
    kind = c.WhichOneof("entity")
    if kind == "decision":
        entity, fields = _decision(c.decision, f"{f}.decision", op)
    elif kind == "task":
        entity, fields = _task(c.task, f"{f}.task", op)
    elif kind == "milestone":
        entity, fields = _milestone(c.milestone, f"{f}.milestone", op)
    else:
        raise InvalidArgument(f"{f}.entity", "one of decision, task or milestone is required")
    return Change(op, entity, fields)


def _blocks(ctx: RenderedContext) -> pb.PromptBlocks:
    return pb.PromptBlocks(system=ctx.system, context=ctx.context, tools=ctx.tools)


def context_to_proto(ctx: RenderedContext) -> pb.GetContextResponse:
    return pb.GetContextResponse(
        context=ctx.text,
        token_count=ctx.token_count,
        scopes=list(ctx.scopes),
        version=ctx.version,
        blocks=_blocks(ctx),
        dropped=list(ctx.dropped),
        tokenizer=ctx.tokenizer,
    )


class ContextServicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self, app: ContextService) -> None:
        self.app = app

    async def GetContext(self, request: pb.GetContextRequest, context) -> pb.GetContextResponse:
        ctx = await self.app.get_context(
            request.story_id, request.role, request.phase, request.subtask_id, request.token_budget
        )
        return context_to_proto(ctx)

    async def UpdateContext(self, request: pb.UpdateContextRequest, context) -> pb.UpdateContextResponse:
        if len(request.changes) > 200:
            raise InvalidArgument("changes", f"at most 200 changes per request, got {len(request.changes)}")
        changes = [change_from_proto(c, i) for i, c in enumerate(request.changes)]
        result = await self.app.update_context(
            request.story_id, changes, request.actor.strip()[:120], request.correlation_id.strip()[:128]
        )
        return pb.UpdateContextResponse(version=result.version, applied=result.applied, warnings=list(result.warnings))

    async def RehydrateSession(self, request: pb.RehydrateSessionRequest, context) -> pb.RehydrateSessionResponse:
        packs = await self.app.rehydrate_session(
            request.story_id, list(request.roles), request.phase, request.token_budget
        )
        return pb.RehydrateSessionResponse(
            story_id=request.story_id.strip(),
            packs=[
                pb.RoleContext(
                    role=str(ctx.role),
                    context=ctx.text,
                    token_count=ctx.token_count,
                    scopes=list(ctx.scopes),
                    version=ctx.version,
                    blocks=_blocks(ctx),
                    dropped=list(ctx.dropped),
                )
                for ctx in packs
            ],
        )

    async def ValidateScope(self, request: pb.ValidateScopeRequest, context) -> pb.ValidateScopeResponse:
        check = self.app.validate_scope(request.role, request.phase, list(request.scopes))
        return pb.ValidateScopeResponse(
            allowed=check.allowed, denied=list(check.denied), missing=list(check.missing), reason=check.reason
        )
