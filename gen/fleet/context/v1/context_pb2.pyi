from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_UNKNOWN: _ClassVar[Operation]
    OPERATION_CREATE: _ClassVar[Operation]
    OPERATION_UPDATE: _ClassVar[Operation]
    OPERATION_DELETE: _ClassVar[Operation]
OPERATION_UNKNOWN: Operation
OPERATION_CREATE: Operation
OPERATION_UPDATE: Operation
OPERATION_DELETE: Operation

class GetContextRequest(_message.Message):
    __slots__ = ("story_id", "role", "phase", "subtask_id", "token_budget")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SUBTASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    role: str
    phase: str
    subtask_id: str
    token_budget: int
    def __init__(self, story_id: _Optional[str] = ..., role: _Optional[str] = ..., phase: _Optional[str] = ..., subtask_id: _Optional[str] = ..., token_budget: _Optional[int] = ...) -> None: ...

class PromptBlocks(_message.Message):
    __slots__ = ("system", "context", "tools")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    system: str
    context: str
    tools: str
    def __init__(self, system: _Optional[str] = ..., context: _Optional[str] = ..., tools: _Optional[str] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("context", "token_count", "scopes", "version", "blocks", "dropped", "tokenizer")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    context: str
    token_count: int
    scopes: _containers.RepeatedScalarFieldContainer[str]
    version: str
    blocks: PromptBlocks
    dropped: _containers.RepeatedScalarFieldContainer[str]
    tokenizer: str
    def __init__(self, context: _Optional[str] = ..., token_count: _Optional[int] = ..., scopes: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., blocks: _Optional[_Union[PromptBlocks, _Mapping]] = ..., dropped: _Optional[_Iterable[str]] = ..., tokenizer: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("decision_id", "title", "rationale", "status", "decided_by", "decided_at", "alternatives", "affects_task_ids", "supersedes")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    ALTERNATIVES_FIELD_NUMBER: _ClassVar[int]
    AFFECTS_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    title: str
    rationale: str
    status: str
    decided_by: str
    decided_at: int
    alternatives: _containers.RepeatedScalarFieldContainer[str]
    affects_task_ids: _containers.RepeatedScalarFieldContainer[str]
    supersedes: str
    def __init__(self, decision_id: _Optional[str] = ..., title: _Optional[str] = ..., rationale: _Optional[str] = ..., status: _Optional[str] = ..., decided_by: _Optional[str] = ..., decided_at: _Optional[int] = ..., alternatives: _Optional[_Iterable[str]] = ..., affects_task_ids: _Optional[_Iterable[str]] = ..., supersedes: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "title", "description", "role", "status", "priority", "depends_on", "parent_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    title: str
    description: str
    role: str
    status: str
    priority: int
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    parent_task_id: str
    def __init__(self, task_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., role: _Optional[str] = ..., status: _Optional[str] = ..., priority: _Optional[int] = ..., depends_on: _Optional[_Iterable[str]] = ..., parent_task_id: _Optional[str] = ...) -> None: ...

class Milestone(_message.Message):
    __slots__ = ("milestone_id", "name", "description", "at")
    MILESTONE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    milestone_id: str
    name: str
    description: str
    at: int
    def __init__(self, milestone_id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., at: _Optional[int] = ...) -> None: ...

class ContextChange(_message.Message):
    __slots__ = ("operation", "decision", "task", "milestone")
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MILESTONE_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    decision: Decision
    task: Task
    milestone: Milestone
    def __init__(self, operation: _Optional[_Union[Operation, str]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., milestone: _Optional[_Union[Milestone, _Mapping]] = ...) -> None: ...

class UpdateContextRequest(_message.Message):
    __slots__ = ("story_id", "changes", "actor", "correlation_id")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    changes: _containers.RepeatedCompositeFieldContainer[ContextChange]
    actor: str
    correlation_id: str
    def __init__(self, story_id: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[ContextChange, _Mapping]]] = ..., actor: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class UpdateContextResponse(_message.Message):
    __slots__ = ("version", "applied", "warnings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    version: str
    applied: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., applied: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class RehydrateSessionRequest(_message.Message):
    __slots__ = ("story_id", "roles", "phase", "token_budget")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    phase: str
    token_budget: int
    def __init__(self, story_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., phase: _Optional[str] = ..., token_budget: _Optional[int] = ...) -> None: ...

class RoleContext(_message.Message):
    __slots__ = ("role", "context", "token_count", "scopes", "version", "blocks", "dropped")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    role: str
    context: str
    token_count: int
    scopes: _containers.RepeatedScalarFieldContainer[str]
    version: str
    blocks: PromptBlocks
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., context: _Optional[str] = ..., token_count: _Optional[int] = ..., scopes: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., blocks: _Optional[_Union[PromptBlocks, _Mapping]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class RehydrateSessionResponse(_message.Message):
    __slots__ = ("story_id", "packs")
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    PACKS_FIELD_NUMBER: _ClassVar[int]
    story_id: str
    packs: _containers.RepeatedCompositeFieldContainer[RoleContext]
    def __init__(self, story_id: _Optional[str] = ..., packs: _Optional[_Iterable[_Union[RoleContext, _Mapping]]] = ...) -> None: ...

class ValidateScopeRequest(_message.Message):
    __slots__ = ("role", "phase", "scopes")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    role: str
    phase: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., phase: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class ValidateScopeResponse(_message.Message):
    __slots__ = ("allowed", "denied", "missing", "reason")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    denied: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, allowed: _Optional[bool] = ..., denied: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...
