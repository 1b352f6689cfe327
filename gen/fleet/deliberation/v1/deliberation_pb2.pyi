import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeliberationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIBERATION_STATUS_UNKNOWN: _ClassVar[DeliberationStatus]
    DELIBERATION_STATUS_PENDING: _ClassVar[DeliberationStatus]
    DELIBERATION_STATUS_IN_PROGRESS: _ClassVar[DeliberationStatus]
    DELIBERATION_STATUS_COMPLETED: _ClassVar[DeliberationStatus]
    DELIBERATION_STATUS_FAILED: _ClassVar[DeliberationStatus]
    DELIBERATION_STATUS_TIMEOUT: _ClassVar[DeliberationStatus]

class SelectionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_METHOD_UNKNOWN: _ClassVar[SelectionMethod]
    SELECTION_METHOD_ARCHITECT: _ClassVar[SelectionMethod]
    SELECTION_METHOD_FALLBACK: _ClassVar[SelectionMethod]
DELIBERATION_STATUS_UNKNOWN: DeliberationStatus
DELIBERATION_STATUS_PENDING: DeliberationStatus
DELIBERATION_STATUS_IN_PROGRESS: DeliberationStatus
DELIBERATION_STATUS_COMPLETED: DeliberationStatus
DELIBERATION_STATUS_FAILED: DeliberationStatus
DELIBERATION_STATUS_TIMEOUT: DeliberationStatus
SELECTION_METHOD_UNKNOWN: SelectionMethod
SELECTION_METHOD_ARCHITECT: SelectionMethod
SELECTION_METHOD_FALLBACK: SelectionMethod

class Criterion(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Constraints(_message.Message):
    __slots__ = ("rubric", "requirements", "timeout_seconds", "max_tokens", "token_budget", "top_k", "rounds", "tests", "execute")
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    REQUIREMENTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_FIELD_NUMBER: _ClassVar[int]
    rubric: _containers.RepeatedCompositeFieldContainer[Criterion]
    requirements: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: float
    max_tokens: int
    token_budget: int
    top_k: int
    rounds: int
    tests: str
    execute: bool
    def __init__(self, rubric: _Optional[_Iterable[_Union[Criterion, _Mapping]]] = ..., requirements: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[float] = ..., max_tokens: _Optional[int] = ..., token_budget: _Optional[int] = ..., top_k: _Optional[int] = ..., rounds: _Optional[int] = ..., tests: _Optional[str] = ..., execute: _Optional[bool] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("agent_id", "role", "persona", "temperature", "seed")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PERSONA_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    role: str
    persona: str
    temperature: float
    seed: int
    def __init__(self, agent_id: _Optional[str] = ..., role: _Optional[str] = ..., persona: _Optional[str] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Revision(_message.Message):
    __slots__ = ("number", "content", "reason", "checks")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    number: int
    content: str
    reason: str
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    def __init__(self, number: _Optional[int] = ..., content: _Optional[str] = ..., reason: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("proposal_id", "author_id", "author_role", "content", "revisions")
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    proposal_id: str
    author_id: str
    author_role: str
    content: str
    revisions: _containers.RepeatedCompositeFieldContainer[Revision]
    def __init__(self, proposal_id: _Optional[str] = ..., author_id: _Optional[str] = ..., author_role: _Optional[str] = ..., content: _Optional[str] = ..., revisions: _Optional[_Iterable[_Union[Revision, _Mapping]]] = ...) -> None: ...

class Critique(_message.Message):
    __slots__ = ("round", "proposal_id", "critic_id", "author_id", "verdict", "summary", "issues")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    CRITIC_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    round: int
    proposal_id: str
    critic_id: str
    author_id: str
    verdict: str
    summary: str
    issues: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., proposal_id: _Optional[str] = ..., critic_id: _Optional[str] = ..., author_id: _Optional[str] = ..., verdict: _Optional[str] = ..., summary: _Optional[str] = ..., issues: _Optional[_Iterable[str]] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("message", "severity", "line", "block")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    message: str
    severity: str
    line: int
    block: int
    def __init__(self, message: _Optional[str] = ..., severity: _Optional[str] = ..., line: _Optional[int] = ..., block: _Optional[int] = ...) -> None: ...

class CheckResult(_message.Message):
    __slots__ = ("name", "passed", "applicable", "findings", "detail", "gating")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    APPLICABLE_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    GATING_FIELD_NUMBER: _ClassVar[int]
    name: str
    passed: bool
    applicable: bool
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    detail: str
    gating: bool
    def __init__(self, name: _Optional[str] = ..., passed: _Optional[bool] = ..., applicable: _Optional[bool] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., detail: _Optional[str] = ..., gating: _Optional[bool] = ...) -> None: ...

class Vote(_message.Message):
    __slots__ = ("voter_id", "proposal_id", "position", "scores", "reason")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VOTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    voter_id: str
    proposal_id: str
    position: int
    scores: _containers.ScalarMap[str, int]
    reason: str
    def __init__(self, voter_id: _Optional[str] = ..., proposal_id: _Optional[str] = ..., position: _Optional[int] = ..., scores: _Optional[_Mapping[str, int]] = ..., reason: _Optional[str] = ...) -> None: ...

class RankedProposal(_message.Message):
    __slots__ = ("rank", "score", "proposal", "checks", "votes", "peer_score", "check_score")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    PEER_SCORE_FIELD_NUMBER: _ClassVar[int]
    CHECK_SCORE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    score: float
    proposal: Proposal
    checks: _containers.RepeatedCompositeFieldContainer[CheckResult]
    votes: _containers.RepeatedCompositeFieldContainer[Vote]
    peer_score: float
    check_score: float
    def __init__(self, rank: _Optional[int] = ..., score: _Optional[float] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ..., checks: _Optional[_Iterable[_Union[CheckResult, _Mapping]]] = ..., votes: _Optional[_Iterable[_Union[Vote, _Mapping]]] = ..., peer_score: _Optional[float] = ..., check_score: _Optional[float] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("winner_id", "method", "rationale", "selected_by")
    WINNER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_BY_FIELD_NUMBER: _ClassVar[int]
    winner_id: str
    method: SelectionMethod
    rationale: str
    selected_by: str
    def __init__(self, winner_id: _Optional[str] = ..., method: _Optional[_Union[SelectionMethod, str]] = ..., rationale: _Optional[str] = ..., selected_by: _Optional[str] = ...) -> None: ...

class TokenUsage(_message.Message):
    __slots__ = ("agent_id", "phase", "prompt_tokens", "completion_tokens")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    phase: str
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, agent_id: _Optional[str] = ..., phase: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class PhaseDuration(_message.Message):
    __slots__ = ("phase", "duration_ms")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    duration_ms: float
    def __init__(self, phase: _Optional[str] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class AgentFailure(_message.Message):
    __slots__ = ("agent_id", "phase", "error")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    phase: str
    error: str
    def __init__(self, agent_id: _Optional[str] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class DeliberationResult(_message.Message):
    __slots__ = ("task_id", "status", "results", "winner_id", "duration_ms", "deliberation_id", "role", "council_id", "selection", "critiques", "usage", "phase_durations", "failures", "error_message", "context_version", "total_tokens", "executor", "story_id", "context_note", "verified", "verified_reason", "notes", "started_at", "finished_at", "interrupted", "requested_by")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    WINNER_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COUNCIL_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    CRITIQUES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PHASE_DURATIONS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_NOTE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_REASON_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: DeliberationStatus
    results: _containers.RepeatedCompositeFieldContainer[RankedProposal]
    winner_id: str
    duration_ms: float
    deliberation_id: str
    role: str
    council_id: str
    selection: Selection
    critiques: _containers.RepeatedCompositeFieldContainer[Critique]
    usage: _containers.RepeatedCompositeFieldContainer[TokenUsage]
    phase_durations: _containers.RepeatedCompositeFieldContainer[PhaseDuration]
    failures: _containers.RepeatedCompositeFieldContainer[AgentFailure]
    error_message: str
    context_version: str
    total_tokens: int
    executor: str
    story_id: str
    context_note: str
    verified: bool
    verified_reason: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    interrupted: bool
    requested_by: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[DeliberationStatus, str]] = ..., results: _Optional[_Iterable[_Union[RankedProposal, _Mapping]]] = ..., winner_id: _Optional[str] = ..., duration_ms: _Optional[float] = ..., deliberation_id: _Optional[str] = ..., role: _Optional[str] = ..., council_id: _Optional[str] = ..., selection: _Optional[_Union[Selection, _Mapping]] = ..., critiques: _Optional[_Iterable[_Union[Critique, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[TokenUsage, _Mapping]]] = ..., phase_durations: _Optional[_Iterable[_Union[PhaseDuration, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[AgentFailure, _Mapping]]] = ..., error_message: _Optional[str] = ..., context_version: _Optional[str] = ..., total_tokens: _Optional[int] = ..., executor: _Optional[str] = ..., story_id: _Optional[str] = ..., context_note: _Optional[str] = ..., verified: _Optional[bool] = ..., verified_reason: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interrupted: _Optional[bool] = ..., requested_by: _Optional[str] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("deliberation_id", "task_id", "role", "phase", "kind", "agent_id", "detail", "completion_tokens")
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    task_id: str
    role: str
    phase: str
    kind: str
    agent_id: str
    detail: str
    completion_tokens: int
    def __init__(self, deliberation_id: _Optional[str] = ..., task_id: _Optional[str] = ..., role: _Optional[str] = ..., phase: _Optional[str] = ..., kind: _Optional[str] = ..., agent_id: _Optional[str] = ..., detail: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...
