"""Property: a valid config survives config -> launcher flags -> config and
config -> JSON -> config unchanged, and both routes give the same canonical text."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from vmsh.config import canonical_json, normalize, to_json_value, vm_config_from_argv, vm_config_from_json
from vmsh.config.render import to_argv

from .strategies import vm_configs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vm_configs())
def test_config_round_trips_through_flags_and_json(cfg) -> None:
    expected = normalize(cfg)
    via_flags = normalize(vm_config_from_argv(to_argv(cfg)))
    via_json = normalize(vm_config_from_json(json.dumps(to_json_value(cfg))))
    assert via_flags == expected
    assert via_json == expected
    assert canonical_json(via_flags) == canonical_json(via_json)
