"""The command language's words, quoting, comments and variables."""

from __future__ import annotations

import pytest

from vmsh.script.lexer import ScriptSyntaxError, split_commands, unescape

VARS = {"k": "/img/vmlinux", "n": "2", "sp": "a b"}


@pytest.mark.parametrize(
    "line, commands",
    [
        ("boot", [["boot"]]),
        ("  pause ;resume;  ", [["pause"], ["resume"]]),
        ("create --kernel $k --cpus boot=$n", [["create", "--kernel", "/img/vmlinux", "--cpus", "boot=2"]]),
        ("echo ${k}x", [["echo", "/img/vmlinuxx"]]),
        ("echo \"$sp\" $sp", [["echo", "a b", "a b"]]),  # a value is one word, quoted or not
        ("echo '$k; not a command'", [["echo", "$k; not a command"]]),
        ("echo a # comment ; pause", [["echo", "a"]]),
        ("echo a#b", [["echo", "a#b"]]),
        ("# only a comment", []),
        ('send "ls\\n"', [["send", "ls\\n"]]),
        ("expect 'login: $'", [["expect", "login: $"]]),
        ("echo \\$k", [["echo", "$k"]]),
        ("run echo \"x;y\"; echo z", [["run", "echo", "x;y"], ["echo", "z"]]),
        ("echo $ 5$", [["echo", "$", "5$"]]),
    ],
)
def test_split(line: str, commands: list[list[str]]) -> None:
    assert split_commands(line, VARS) == commands


def test_environment_is_a_fallback(monkeypatch) -> None:
    monkeypatch.setenv("VMSH_TEST_VAR", "from-env")
    assert split_commands("echo $VMSH_TEST_VAR", {}) == [["echo", "from-env"]]
    assert split_commands("echo $VMSH_TEST_VAR", {"VMSH_TEST_VAR": "local"}) == [["echo", "local"]]


@pytest.mark.parametrize("line", ["echo $nope", "echo 'open", 'echo "open', "echo ${k"])
def test_errors(line: str) -> None:
    with pytest.raises(ScriptSyntaxError):
        split_commands(line, VARS)


def test_unescape() -> None:
    assert unescape(r"ls\n") == "ls\n"
    assert unescape(r"\e[A\t\\") == "\x1b[A\t\\"
