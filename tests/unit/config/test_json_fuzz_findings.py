"""JSON texts the fuzz campaign (ci/fuzz/fuzz_json.py) found raising out of the config layer:
each is refused with the usual ``Error parsing JSON ...`` error instead."""

from __future__ import annotations

import pytest

from vmsh.config import restore_config_from_json, vm_config_from_json
from vmsh.errors import OptionParseError, error_chain

CASES = [
    # json.loads raises RecursionError
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"payload": {"kernel": "/k"}, "disks": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    # json.loads raises a plain ValueError (Python's limit on digits for str -> int)
    (b'{"cpus": {"boot_vcpus": ' + b"9" * 4301 + b"}}", "a number has more than 4300 digits"),
    # json.loads raises UnicodeDecodeError for bytes that are not UTF-8
    (b'{"payload": {"kernel": "/k\x80"}}', "not UTF-8: invalid start byte"),
]


@pytest.mark.parametrize(("text", "cause"), CASES, ids=["deep", "deep-field", "digits", "utf8"])
def test_vm_config_from_json_refuses(text: bytes, cause: str) -> None:
    with pytest.raises(OptionParseError) as info:
        vm_config_from_json(text)
    assert error_chain(info.value) == ["Error parsing JSON VmConfig", cause]


@pytest.mark.parametrize(("text", "cause"), CASES[:1], ids=["deep"])
def test_restore_config_from_json_refuses(text: bytes, cause: str) -> None:
    with pytest.raises(OptionParseError) as info:
        restore_config_from_json(text)
    assert error_chain(info.value) == ["Error parsing JSON RestoreConfig", cause]
