"""The one mapping between the deliberation's domain (domain.py) and its contract (fleet.deliberation.v1).

The proto messages carry the domain's fields under the same names, so a result crosses with the domain's own
serialisation (`dump`/`load`) and protobuf's JSON mapping; what differs is listed here once: enum prefixes,
`phase_durations_ms` (a map in the domain, a list in the proto), `total_tokens` (derived in the domain), and 0
standing for "not known" in findings' line and block. A domain field that the proto lacks fails the mapping
loudly, and tests/unit/deliberation/test_proto.py round-trips a result with every field set, so nothing is
dropped silently. Used by the orchestrator, the ray-executor, the monitoring service and the CLI.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from services.common.errors import InvalidArgument
from services.common.events import Role
from services.deliberation.domain import (
    AgentSpec,
    Criterion,
    DeliberationResult,
    ProgressEvent,
    TaskConstraints,
    dump,
    load,
)

_STATUS = "DELIBERATION_STATUS_"
_METHOD = "SELECTION_METHOD_"


# --- results ------------------------------------------------------------------------------------------------------


def result_to_proto(r: DeliberationResult) -> dpb.DeliberationResult:
    d: dict[str, Any] = dump(r)
    d["status"] = _STATUS + d["status"]
    if d["selection"]:
        d["selection"]["method"] = _METHOD + d["selection"]["method"]
    d["phase_durations"] = [{"phase": p, "duration_ms": ms} for p, ms in d.pop("phase_durations_ms").items()]
    d["total_tokens"] = r.total_tokens
    return _parse(d, dpb.DeliberationResult())


def _parse(d: dict[str, Any], message: Message) -> Any:
    """`json_format.ParseDict` for what `dump` makes (field names, enum names, RFC 3339 timestamps, None for
    unset), filling the message field by field: ~5x less CPU than ParseDict's per-value checks, which cost ~0.5 ms
    per agent call of a deliberation (bench/bench_scale.py, issue 15). A key the message lacks raises ValueError
    and a value of the wrong type TypeError: nothing is dropped silently."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in d.items():
        if value is None:  # unset (ParseDict clears the field)
            continue
        field = fields.get(key)
        if field is None:
            raise ValueError(f"{message.DESCRIPTOR.full_name} has no field {key!r}")
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            target = getattr(message, key)
            if kind.fields_by_name["value"].message_type is None:
                target.update(value)
            else:
                for k, v in value.items():
                    _parse(v, target[k])
        elif kind is not None and kind.full_name == "google.protobuf.Timestamp":
            getattr(message, key).FromJsonString(value)
        elif kind is not None and field.is_repeated:
            target = getattr(message, key)
            for item in value:
                _parse(item, target.add())
        elif kind is not None:
            _parse(value, getattr(message, key))
        elif field.enum_type is not None:
            names = field.enum_type.values_by_name
            if field.is_repeated:
                getattr(message, key).extend(names[v].number for v in value)
            else:
                setattr(message, key, names[value].number)
        elif field.is_repeated:
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)
    return message


def result_from_proto(m: dpb.DeliberationResult) -> DeliberationResult:
    d = _dict(m)
    d["status"] = d["status"].removeprefix(_STATUS)
    if d.get("selection"):
        d["selection"]["method"] = d["selection"]["method"].removeprefix(_METHOD)
    else:
        d["selection"] = None
    d["phase_durations_ms"] = {p["phase"]: p["duration_ms"] for p in d.pop("phase_durations")}
    for ranked in d["results"]:
        for check in [*ranked["checks"], *(c for v in ranked["proposal"]["revisions"] for c in v["checks"])]:
            for f in check["findings"]:  # 0 = not known, as in the proto
                f["line"] = f["line"] or None
                f["block"] = f["block"] or None
    del d["total_tokens"]  # derived from usage
    return load(DeliberationResult, d)


def _dict(message: Message) -> dict[str, Any]:
    """`json_format.MessageToDict` (proto field names, every field without presence printed) for `load`, read
    field by field: ~4x less CPU. An unset message field is absent; int64 stays an int."""
    d: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        key, kind = field.name, field.message_type
        value = getattr(message, key)
        if kind is not None and kind.GetOptions().map_entry:
            if kind.fields_by_name["value"].message_type is None:
                d[key] = dict(value)
            else:
                d[key] = {k: _dict(v) for k, v in value.items()}
        elif kind is not None and field.is_repeated:
            d[key] = [_dict(v) for v in value]
        elif kind is not None:
            if message.HasField(key):
                d[key] = value.ToJsonString() if kind.full_name == "google.protobuf.Timestamp" else _dict(value)
        elif field.enum_type is not None:
            names = field.enum_type.values_by_number
            d[key] = [names[v].name for v in value] if field.is_repeated else names[value].name
        else:
            d[key] = list(value) if field.is_repeated else value
    return d


# --- what a deliberation is asked to do -----------------------------------------------------------------------------


def constraints_from_proto(c: dpb.Constraints, role: Role, field: str = "constraints") -> TaskConstraints:
    """Zero means the default, except the `optional` fields (rounds, token_budget) when set: 0 rounds = no peer
    review, a 0 budget = unlimited. Bad values raise InvalidArgument naming `<field>.<name>`."""
    for name in ("timeout_seconds", "max_tokens", "token_budget", "top_k", "rounds"):
        if getattr(c, name) < 0:
            raise InvalidArgument(f"{field}.{name}", f"must be >= 0, got {getattr(c, name)}")
    defaults = TaskConstraints.for_role(role)
    try:
        return TaskConstraints(
            rubric=tuple(Criterion(x.name, x.description) for x in c.rubric) or defaults.rubric,
            requirements=tuple(c.requirements),
            timeout_seconds=c.timeout_seconds or defaults.timeout_seconds,
            token_budget=c.token_budget if c.HasField("token_budget") else defaults.token_budget,
            max_tokens=c.max_tokens or defaults.max_tokens,
            rounds=c.rounds if c.HasField("rounds") else defaults.rounds,
            top_k=c.top_k or defaults.top_k,
            tests=c.tests,
            execute=c.execute if c.HasField("execute") else defaults.execute,
        )
    except InvalidArgument as e:  # the domain names "constraints.<name>": keep the caller's path
        raise InvalidArgument(e.field.replace("constraints", field, 1), e.description) from None


def constraints_to_proto(c: TaskConstraints) -> dpb.Constraints:
    return dpb.Constraints(
        rubric=[dpb.Criterion(name=x.name, description=x.description) for x in c.rubric],
        requirements=list(c.requirements),
        timeout_seconds=c.timeout_seconds,
        max_tokens=c.max_tokens,
        token_budget=c.token_budget,
        top_k=c.top_k,
        rounds=c.rounds,
        tests=c.tests,
        execute=c.execute,
    )


def agent_to_proto(a: AgentSpec) -> dpb.Agent:
    return dpb.Agent(agent_id=a.agent_id, role=str(a.role), persona=a.persona, temperature=a.temperature, seed=a.seed)


def progress_to_proto(p: ProgressEvent) -> dpb.ProgressEvent:
    return dpb.ProgressEvent(
        deliberation_id=p.deliberation_id,
        task_id=p.task_id,
        role=str(p.role),
        phase=str(p.phase or ""),
        kind=p.kind,
        agent_id=p.agent_id or "",
        detail=p.detail,
        completion_tokens=p.completion_tokens,
    )
