from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNKNOWN: _ClassVar[Outcome]
    OUTCOME_PASSED: _ClassVar[Outcome]
    OUTCOME_FAILED: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
    OUTCOME_TIMEOUT: _ClassVar[Outcome]
    OUTCOME_KILLED: _ClassVar[Outcome]
OUTCOME_UNKNOWN: Outcome
OUTCOME_PASSED: Outcome
OUTCOME_FAILED: Outcome
OUTCOME_ERROR: Outcome
OUTCOME_TIMEOUT: Outcome
OUTCOME_KILLED: Outcome

class ExecuteRequest(_message.Message):
    __slots__ = ("language", "files", "test_files", "entrypoint", "timeout_seconds", "memory_mb")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TestFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TEST_FILES_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    language: str
    files: _containers.ScalarMap[str, str]
    test_files: _containers.ScalarMap[str, str]
    entrypoint: str
    timeout_seconds: float
    memory_mb: int
    def __init__(self, language: _Optional[str] = ..., files: _Optional[_Mapping[str, str]] = ..., test_files: _Optional[_Mapping[str, str]] = ..., entrypoint: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., memory_mb: _Optional[int] = ...) -> None: ...

class TestCase(_message.Message):
    __slots__ = ("name", "outcome", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    outcome: str
    message: str
    def __init__(self, name: _Optional[str] = ..., outcome: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class TestCounts(_message.Message):
    __slots__ = ("passed", "failed", "errors", "skipped", "cases")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    passed: int
    failed: int
    errors: int
    skipped: int
    cases: _containers.RepeatedCompositeFieldContainer[TestCase]
    def __init__(self, passed: _Optional[int] = ..., failed: _Optional[int] = ..., errors: _Optional[int] = ..., skipped: _Optional[int] = ..., cases: _Optional[_Iterable[_Union[TestCase, _Mapping]]] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("outcome", "exit_code", "tests", "stdout", "stderr", "truncated", "duration_ms", "reason", "isolation")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    TESTS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    exit_code: int
    tests: TestCounts
    stdout: str
    stderr: str
    truncated: bool
    duration_ms: float
    reason: str
    isolation: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., exit_code: _Optional[int] = ..., tests: _Optional[_Union[TestCounts, _Mapping]] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., duration_ms: _Optional[float] = ..., reason: _Optional[str] = ..., isolation: _Optional[str] = ...) -> None: ...
