"""The deliberation contract's one mapping (services/deliberation/proto.py), tested without writing a field by hand:
a result with *every* field of every nested dataclass set to a non-default value is built by introspection, so a
field added to the domain and forgotten in the proto (or the other way round) fails here, loudly."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from domain_filler import filled

from fleet.deliberation.v1 import deliberation_pb2 as dpb
from services.common.errors import InvalidArgument
from services.common.events import Role
from services.deliberation.domain import DeliberationResult, TaskConstraints, dump
from services.deliberation.proto import (
    constraints_from_proto,
    constraints_to_proto,
    result_from_proto,
    result_to_proto,
)

# What the domain derives or spells differently (proto.py's docstring lists the same).
PROTO_ONLY = {"DeliberationResult": {"phase_durations", "total_tokens"}}
DOMAIN_ONLY = {"DeliberationResult": {"phase_durations_ms"}}


def test_a_result_with_every_field_set_round_trips_through_the_proto():
    result = filled(DeliberationResult)
    back = result_from_proto(result_to_proto(result))
    assert dump(back) == dump(result)
    assert back == result


def test_every_domain_field_has_a_proto_field_and_back():
    """Walk the result's dataclasses and the proto messages side by side: the same names on both sides."""

    def walk(cls: type, message: typing.Any) -> None:
        hints = typing.get_type_hints(cls)
        domain = {f.name for f in dataclasses.fields(cls)} - DOMAIN_ONLY.get(cls.__name__, set())
        proto = {f.name for f in message.fields} - PROTO_ONLY.get(cls.__name__, set())
        assert domain == proto, (cls.__name__, domain ^ proto)
        for f in dataclasses.fields(cls):
            inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
            for a in typing.get_args(hints[f.name]) or ():
                inner += [x for x in typing.get_args(a) if dataclasses.is_dataclass(x)]
            if inner and f.name in message.fields_by_name:
                walk(inner[0], message.fields_by_name[f.name].message_type)

    walk(DeliberationResult, dpb.DeliberationResult.DESCRIPTOR)


def test_a_domain_field_the_proto_lacks_fails_loudly(monkeypatch):
    import services.deliberation.proto as proto

    monkeypatch.setattr(proto, "dump", lambda r: dump(r) | {"mood": "cheerful"})
    with pytest.raises(ValueError, match=r"fleet\.deliberation\.v1\.DeliberationResult has no field 'mood'"):
        result_to_proto(filled(DeliberationResult))


def test_a_value_of_the_wrong_type_fails_loudly(monkeypatch):
    import services.deliberation.proto as proto

    monkeypatch.setattr(proto, "dump", lambda r: dump(r) | {"deliberation_id": 7})
    with pytest.raises(TypeError):
        result_to_proto(filled(DeliberationResult))


def test_a_pending_result_without_selection_or_end_round_trips():
    pending = dataclasses.replace(filled(DeliberationResult), selection=None, finished_at=None, results=())
    assert result_from_proto(result_to_proto(pending)) == pending


def test_constraints_zero_means_default_but_optional_zero_is_taken():
    defaults = TaskConstraints.for_role(Role.DEV)
    unset = constraints_from_proto(dpb.Constraints(), Role.DEV)
    assert (unset.rounds, unset.token_budget, unset.timeout_seconds) == (
        defaults.rounds,
        defaults.token_budget,
        defaults.timeout_seconds,
    )
    zero = constraints_from_proto(dpb.Constraints(rounds=0, token_budget=0, execute=False), Role.DEV)
    assert (zero.rounds, zero.token_budget, zero.execute) == (0, 0, False)  # no review, no limit, no execution
    assert unset.execute is True
    full = filled(TaskConstraints)
    full = dataclasses.replace(full, tests="def test_x():\n    assert True\n", top_k=3, rounds=2, max_tokens=100)
    assert constraints_from_proto(constraints_to_proto(full), Role.DEV) == full


@pytest.mark.parametrize(
    ("constraints", "field"),
    [
        (dpb.Constraints(rounds=-1), "constraints.rounds"),
        (dpb.Constraints(rounds=9), "constraints.rounds"),
        (dpb.Constraints(token_budget=-5), "constraints.token_budget"),
        (dpb.Constraints(tests="def test_x(:\n"), "constraints.tests"),
        (dpb.Constraints(tests="x = 1\n"), "constraints.tests"),
    ],
)
def test_bad_constraints_name_the_field(constraints, field):
    with pytest.raises(InvalidArgument) as info:
        constraints_from_proto(constraints, Role.DEV)
    assert info.value.field == field
