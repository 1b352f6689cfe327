from fleet.deliberation.v1 import deliberation_pb2 as _deliberation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeliberateRequest(_message.Message):
    __slots__ = ("task_id", "task_description", "role", "constraints", "num_agents", "story_id", "phase", "base_code")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    NUM_AGENTS_FIELD_NUMBER: _ClassVar[int]
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BASE_CODE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_description: str
    role: str
    constraints: _deliberation_pb2.Constraints
    num_agents: int
    story_id: str
    phase: str
    base_code: str
    def __init__(self, task_id: _Optional[str] = ..., task_description: _Optional[str] = ..., role: _Optional[str] = ..., constraints: _Optional[_Union[_deliberation_pb2.Constraints, _Mapping]] = ..., num_agents: _Optional[int] = ..., story_id: _Optional[str] = ..., phase: _Optional[str] = ..., base_code: _Optional[str] = ...) -> None: ...

class DeliberateResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _deliberation_pb2.DeliberationResult
    def __init__(self, result: _Optional[_Union[_deliberation_pb2.DeliberationResult, _Mapping]] = ...) -> None: ...

class StreamDeliberationRequest(_message.Message):
    __slots__ = ("deliberation",)
    DELIBERATION_FIELD_NUMBER: _ClassVar[int]
    deliberation: DeliberateRequest
    def __init__(self, deliberation: _Optional[_Union[DeliberateRequest, _Mapping]] = ...) -> None: ...

class StreamDeliberationResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _deliberation_pb2.ProgressEvent
    result: _deliberation_pb2.DeliberationResult
    def __init__(self, progress: _Optional[_Union[_deliberation_pb2.ProgressEvent, _Mapping]] = ..., result: _Optional[_Union[_deliberation_pb2.DeliberationResult, _Mapping]] = ...) -> None: ...

class GetDeliberationResultRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetDeliberationResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _deliberation_pb2.DeliberationResult
    def __init__(self, result: _Optional[_Union[_deliberation_pb2.DeliberationResult, _Mapping]] = ...) -> None: ...

class Council(_message.Message):
    __slots__ = ("council_id", "role", "num_agents", "agents")
    COUNCIL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_AGENTS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    council_id: str
    role: str
    num_agents: int
    agents: _containers.RepeatedCompositeFieldContainer[_deliberation_pb2.Agent]
    def __init__(self, council_id: _Optional[str] = ..., role: _Optional[str] = ..., num_agents: _Optional[int] = ..., agents: _Optional[_Iterable[_Union[_deliberation_pb2.Agent, _Mapping]]] = ...) -> None: ...

class CreateCouncilRequest(_message.Message):
    __slots__ = ("role", "num_agents")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_AGENTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    num_agents: int
    def __init__(self, role: _Optional[str] = ..., num_agents: _Optional[int] = ...) -> None: ...

class CreateCouncilResponse(_message.Message):
    __slots__ = ("council_id", "agent_ids", "council")
    COUNCIL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNCIL_FIELD_NUMBER: _ClassVar[int]
    council_id: str
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    council: Council
    def __init__(self, council_id: _Optional[str] = ..., agent_ids: _Optional[_Iterable[str]] = ..., council: _Optional[_Union[Council, _Mapping]] = ...) -> None: ...

class ListCouncilsRequest(_message.Message):
    __slots__ = ("role_filter", "include_agents")
    ROLE_FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    role_filter: str
    include_agents: bool
    def __init__(self, role_filter: _Optional[str] = ..., include_agents: _Optional[bool] = ...) -> None: ...

class ListCouncilsResponse(_message.Message):
    __slots__ = ("councils",)
    COUNCILS_FIELD_NUMBER: _ClassVar[int]
    councils: _containers.RepeatedCompositeFieldContainer[Council]
    def __init__(self, councils: _Optional[_Iterable[_Union[Council, _Mapping]]] = ...) -> None: ...

class DeleteCouncilRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class DeleteCouncilResponse(_message.Message):
    __slots__ = ("council_id", "agents_removed")
    COUNCIL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    council_id: str
    agents_removed: int
    def __init__(self, council_id: _Optional[str] = ..., agents_removed: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("include_stats",)
    INCLUDE_STATS_FIELD_NUMBER: _ClassVar[int]
    include_stats: bool
    def __init__(self, include_stats: _Optional[bool] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("total_deliberations", "deliberations_by_status", "average_duration_ms", "active_councils", "deliberations_by_role", "in_flight", "executor")
    class DeliberationsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DeliberationsByRoleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_DELIBERATIONS_FIELD_NUMBER: _ClassVar[int]
    DELIBERATIONS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_COUNCILS_FIELD_NUMBER: _ClassVar[int]
    DELIBERATIONS_BY_ROLE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    total_deliberations: int
    deliberations_by_status: _containers.ScalarMap[str, int]
    average_duration_ms: float
    active_councils: int
    deliberations_by_role: _containers.ScalarMap[str, int]
    in_flight: int
    executor: str
    def __init__(self, total_deliberations: _Optional[int] = ..., deliberations_by_status: _Optional[_Mapping[str, int]] = ..., average_duration_ms: _Optional[float] = ..., active_councils: _Optional[int] = ..., deliberations_by_role: _Optional[_Mapping[str, int]] = ..., in_flight: _Optional[int] = ..., executor: _Optional[str] = ...) -> None: ...

class CallerUsage(_message.Message):
    __slots__ = ("caller", "deliberations_this_minute", "deliberations_per_minute", "tokens_last_day", "tokens_per_day")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    DELIBERATIONS_THIS_MINUTE_FIELD_NUMBER: _ClassVar[int]
    DELIBERATIONS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    caller: str
    deliberations_this_minute: int
    deliberations_per_minute: int
    tokens_last_day: int
    tokens_per_day: int
    def __init__(self, caller: _Optional[str] = ..., deliberations_this_minute: _Optional[int] = ..., deliberations_per_minute: _Optional[int] = ..., tokens_last_day: _Optional[int] = ..., tokens_per_day: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status", "uptime_seconds", "stats", "usage")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    status: str
    uptime_seconds: int
    stats: Stats
    usage: _containers.RepeatedCompositeFieldContainer[CallerUsage]
    def __init__(self, status: _Optional[str] = ..., uptime_seconds: _Optional[int] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., usage: _Optional[_Iterable[_Union[CallerUsage, _Mapping]]] = ...) -> None: ...
