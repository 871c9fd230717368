"""The configuration layer: the one place where VM configurations are parsed and validated.

Pure: no I/O beyond what the caller hands in, and nothing else of vmsh is imported.
Every front-end goes through these functions:

* :func:`vm_config_from_argv` - launcher flags (``--cpus boot=2 --disk path=...``);
* :func:`vm_config_from_json` - a JSON VmConfig (``vm.create`` body, ``config.json``);
* :func:`normalize` - validation plus device ids: the config a booted VM reports;
* :func:`canonical_json` - the canonical text of a config (every field, keys sorted).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from vmsh.config.launcher_args import LauncherArgs, parse_argv, vm_config_from_args
from vmsh.config.model import RestoreConfig, VmConfig
from vmsh.config.serde import JsonValueError, from_json_value, to_json_value
from vmsh.config.validate import assign_device_ids, validate
from vmsh.errors import OptionParseError

__all__ = [
    "LauncherArgs",
    "RestoreConfig",
    "VmConfig",
    "canonical_json",
    "normalize",
    "parse_argv",
    "restore_config_from_json",
    "to_json_value",
    "vm_config_from_args",
    "vm_config_from_argv",
    "vm_config_from_json",
]


def vm_config_from_argv(argv: list[str]) -> VmConfig:
    """The validated VmConfig of launcher flags (``argv`` without the program name)."""
    return validate(vm_config_from_args(parse_argv(argv)))


def _load(text: str | bytes | Any, what: str) -> Any:
    if not isinstance(text, (str, bytes, bytearray)):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise OptionParseError(f"Error parsing JSON {what}") from OptionParseError(
            f"{err.msg} at line {err.lineno} column {err.colno}"
        )
    except RecursionError:
        raise OptionParseError(f"Error parsing JSON {what}") from OptionParseError("nested too deeply")
    except UnicodeDecodeError as err:
        raise OptionParseError(f"Error parsing JSON {what}") from OptionParseError(f"not UTF-8: {err.reason}")
    except ValueError:
        # the one other ValueError of json.loads: an integer over Python's digit limit for str -> int
        raise OptionParseError(f"Error parsing JSON {what}") from OptionParseError(
            f"a number has more than {sys.get_int_max_str_digits()} digits"
        )


def vm_config_from_json(text: str | bytes | Any) -> VmConfig:
    """The (unvalidated) VmConfig of a JSON text or an already decoded JSON value."""
    try:
        return from_json_value(VmConfig, _load(text, "VmConfig"))
    except JsonValueError as err:
        raise OptionParseError("Error parsing JSON VmConfig") from err


def restore_config_from_json(text: str | bytes | Any) -> RestoreConfig:
    """The RestoreConfig of a ``vm.restore`` body."""
    try:
        return from_json_value(RestoreConfig, _load(text, "RestoreConfig"))
    except JsonValueError as err:
        raise OptionParseError("Error parsing JSON RestoreConfig") from err


def normalize(cfg: VmConfig) -> VmConfig:
    """Validate ``cfg`` and name its devices: the config as a booted VM reports it."""
    return assign_device_ids(validate(cfg))


def canonical_json(cfg: VmConfig) -> str:
    """The canonical JSON text of ``cfg``: every field, keys sorted, two-space indent."""
    return json.dumps(to_json_value(cfg), sort_keys=True, indent=2) + "\n"
