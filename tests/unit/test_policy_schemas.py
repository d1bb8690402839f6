"""What the policies API and the VM tags route accept, field by field
(hub/policies/schemas.py, hub/vms/schemas.py): no hub needed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sendense.hub.policies.schemas import PolicyCreate, PolicyUpdate
from sendense.hub.vms.schemas import VmUpdate

BASE: dict[str, Any] = {
    "name": "gold",
    "selector": {"vms": ["web1"], "tags": {"tier": "gold"}},
    "repository_id": "default",
    "schedule": "0 2 * * *",
    "retention": {"keep_last": 3},
}


def fields_of(e: ValidationError) -> set[str]:
    return {".".join(str(p) for p in err["loc"]) for err in e.errors()}


def test_defaults() -> None:
    p = PolicyCreate.model_validate(BASE)
    assert p.enabled is True and p.timezone == "UTC" and p.full_every is None
    assert p.verify_after is False and p.window is None
    assert p.retention.model_dump() == {
        "keep_last": 3,
        "keep_hourly": 0,
        "keep_daily": 0,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
    }


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"enabled": "yes"}, "enabled"),
        ({"enabled": 1}, "enabled"),
        ({"full_every": 0}, "full_every"),
        ({"full_every": "7"}, "full_every"),
        ({"full_every": True}, "full_every"),
        ({"retention": {"keep_last": -2}}, "retention.keep_last"),
        ({"retention": {"keep_daily": 1.5}}, "retention.keep_daily"),
        ({"retention": {"keep_weekly": True}}, "retention.keep_weekly"),
        ({"retention": {"keep_forever": 1}}, "retention.keep_forever"),
        ({"window": {"start": "24:00", "end": "06:00"}}, "window.start"),
        ({"window": {"start": "2:00", "end": "06:00"}}, "window.start"),
        ({"window": {"start": "22:00", "end": "06:60"}}, "window.end"),
        ({"selector": {"vms": "web1"}}, "selector.vms"),
        ({"selector": {"tags": {"a=b": "c"}}}, "selector.tags.a=b.[key]"),
        ({"selector": {"tags": {"tier": "two words"}}}, "selector.tags.tier"),
        ({"selector": {"hosts": []}}, "selector.hosts"),
        ({"repository_id": "x" * 37}, "repository_id"),
        ({"schedule": ""}, "schedule"),
        ({"timezone": ""}, "timezone"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_create_refuses(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        PolicyCreate.model_validate({**BASE, **over})
    assert field in fields_of(e.value), e.value.errors()


def test_keep_minus_one_and_window_wrapping_midnight() -> None:
    p = PolicyCreate.model_validate(
        {**BASE, "retention": {"keep_daily": -1}, "window": {"start": "22:00", "end": "06:00"}}
    )
    assert p.retention.keep_daily == -1 and p.window is not None and p.window.start == "22:00"


def test_update_is_partial() -> None:
    u = PolicyUpdate.model_validate({"enabled": False, "window": None})
    assert u.model_fields_set == {"enabled", "window"}
    assert u.model_dump(include=u.model_fields_set) == {"enabled": False, "window": None}
    with pytest.raises(ValidationError):
        PolicyUpdate.model_validate({"schedule_description": "x"})


@pytest.mark.parametrize(
    "tags",
    [
        {"": "x"},
        {"a b": "x"},
        {"k": "\x00"},
        {"k" * 65: "v"},
        {"k": "v" * 257},
        {"k": 1},
        {f"k{i}": "v" for i in range(51)},
    ],
)
def test_vm_tags_refused(tags: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        VmUpdate.model_validate({"tags": tags})


def test_vm_tags_accepted() -> None:
    tags = {"tier": "gold", "customer": "acme-42", "empty": "", "k.x/y:z": "a=b"}
    assert VmUpdate.model_validate({"tags": tags}).tags == tags
    assert VmUpdate.model_validate({"tags": {}}).tags == {}
    with pytest.raises(ValidationError):
        VmUpdate.model_validate({})
