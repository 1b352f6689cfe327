from fleet.deliberation.v1 import deliberation_pb2 as _deliberation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecuteDeliberationRequest(_message.Message):
    __slots__ = ("deliberation_id", "task_id", "task_description", "role", "constraints", "agents", "architect", "vllm_url", "model", "story_id", "context", "context_version", "council_id", "caller_publishes_lifecycle", "base_code")
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECT_FIELD_NUMBER: _ClassVar[int]
    VLLM_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STORY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNCIL_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_PUBLISHES_LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    BASE_CODE_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    task_id: str
    task_description: str
    role: str
    constraints: _deliberation_pb2.Constraints
    agents: _containers.RepeatedCompositeFieldContainer[_deliberation_pb2.Agent]
    architect: _deliberation_pb2.Agent
    vllm_url: str
    model: str
    story_id: str
    context: str
    context_version: str
    council_id: str
    caller_publishes_lifecycle: bool
    base_code: str
    def __init__(self, deliberation_id: _Optional[str] = ..., task_id: _Optional[str] = ..., task_description: _Optional[str] = ..., role: _Optional[str] = ..., constraints: _Optional[_Union[_deliberation_pb2.Constraints, _Mapping]] = ..., agents: _Optional[_Iterable[_Union[_deliberation_pb2.Agent, _Mapping]]] = ..., architect: _Optional[_Union[_deliberation_pb2.Agent, _Mapping]] = ..., vllm_url: _Optional[str] = ..., model: _Optional[str] = ..., story_id: _Optional[str] = ..., context: _Optional[str] = ..., context_version: _Optional[str] = ..., council_id: _Optional[str] = ..., caller_publishes_lifecycle: _Optional[bool] = ..., base_code: _Optional[str] = ...) -> None: ...

class ExecuteDeliberationResponse(_message.Message):
    __slots__ = ("deliberation_id", "status")
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    status: _deliberation_pb2.DeliberationStatus
    def __init__(self, deliberation_id: _Optional[str] = ..., status: _Optional[_Union[_deliberation_pb2.DeliberationStatus, str]] = ...) -> None: ...

class GetDeliberationStatusRequest(_message.Message):
    __slots__ = ("deliberation_id",)
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    def __init__(self, deliberation_id: _Optional[str] = ...) -> None: ...

class GetDeliberationStatusResponse(_message.Message):
    __slots__ = ("deliberation_id", "status", "result", "error_message")
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    status: _deliberation_pb2.DeliberationStatus
    result: _deliberation_pb2.DeliberationResult
    error_message: str
    def __init__(self, deliberation_id: _Optional[str] = ..., status: _Optional[_Union[_deliberation_pb2.DeliberationStatus, str]] = ..., result: _Optional[_Union[_deliberation_pb2.DeliberationResult, _Mapping]] = ..., error_message: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status", "total", "active", "completed", "failed", "average_duration_ms", "uptime_seconds", "ray_address")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    status: str
    total: int
    active: int
    completed: int
    failed: int
    average_duration_ms: float
    uptime_seconds: int
    ray_address: str
    def __init__(self, status: _Optional[str] = ..., total: _Optional[int] = ..., active: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., average_duration_ms: _Optional[float] = ..., uptime_seconds: _Optional[int] = ..., ray_address: _Optional[str] = ...) -> None: ...

class GetActiveJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActiveJob(_message.Message):
    __slots__ = ("deliberation_id", "task_id", "role", "phase", "started_at", "agents")
    DELIBERATION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    deliberation_id: str
    task_id: str
    role: str
    phase: str
    started_at: int
    agents: int
    def __init__(self, deliberation_id: _Optional[str] = ..., task_id: _Optional[str] = ..., role: _Optional[str] = ..., phase: _Optional[str] = ..., started_at: _Optional[int] = ..., agents: _Optional[int] = ...) -> None: ...

class GetActiveJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[ActiveJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[ActiveJob, _Mapping]]] = ...) -> None: ...
