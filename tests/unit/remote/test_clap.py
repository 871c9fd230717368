"""The clap-compatible parser, on ch-remote's command tree.

The expected texts are what clap 4.5.2 (ch-remote v40's) prints for the same command tree,
with the program named ``vmsh remote``: they were produced by a throwaway Rust program that
builds :data:`vmsh.remote.commands.REMOTE` with clap and run with the same arguments.
"""

from __future__ import annotations

import pytest

from vmsh.remote.clap import ClapExit, Matches, did_you_mean, help_text, jaro, parse, wrap
from vmsh.remote.commands import BIN_NAME, REMOTE

TRY = "\n\nFor more information, try '--help'.\n"


def outcome(argv: list[str]) -> tuple[int, str]:
    try:
        parse(REMOTE, argv, BIN_NAME)
    except ClapExit as done:
        return done.status, done.text
    return -1, ""


def sub(argv: list[str]) -> tuple[str, Matches]:
    matches = parse(REMOTE, argv, BIN_NAME)
    assert matches.subcommand is not None
    return matches.subcommand


@pytest.mark.parametrize("argv, text", [
    (["resize", "--vcpus", "2"],
     "error: unexpected argument '--vcpus' found\n\n  tip: a similar argument exists: '--cpus'\n\n"
     "Usage: vmsh remote resize --cpus <cpus>" + TRY),
    (["resiz"],
     "error: unrecognized subcommand 'resiz'\n\n"
     "  tip: some similar subcommands exist: 'resume', 'resize-zone', 'resize'\n\n"
     "Usage: vmsh remote [OPTIONS] <COMMAND>" + TRY),
    (["frob"], "error: unrecognized subcommand 'frob'\n\nUsage: vmsh remote [OPTIONS] <COMMAND>" + TRY),
    (["send-migration", "--local=true", "u"],
     "error: unexpected value 'true' for '--local' found; no more were expected\n\n"
     "Usage: vmsh remote send-migration --local [send_migration_config]" + TRY),
    (["remove-device", "-x"],
     "error: unexpected argument '-x' found\n\n  tip: to pass '-x' as a value, use '-- -x'\n\n"
     "Usage: vmsh remote remove-device [id]" + TRY),
    (["--hepl"],
     "error: unexpected argument '--hepl' found\n\n  tip: a similar argument exists: '--help'\n\n"
     "Usage: vmsh remote --help <COMMAND>" + TRY),
    (["resize", "--cpus"], "error: a value is required for '--cpus <cpus>' but none was supplied" + TRY),
    (["resize", "--cpus", "-h"], "error: a value is required for '--cpus <cpus>' but none was supplied" + TRY),
    (["resize", "--cpus", "-1"], "error: unexpected argument '-1' found\n\nUsage: vmsh remote resize [OPTIONS]" + TRY),
    (["resize", "--cpus=1", "--cpus", "2"],
     "error: the argument '--cpus <cpus>' cannot be used multiple times\n\nUsage: vmsh remote resize [OPTIONS]" + TRY),
    (["--api-socket", "/s", "--", "boot"],
     "error: unexpected argument 'boot' found\n\n"
     "  tip: subcommand 'boot' exists; to use it, remove the '--' before it\n\n"
     "Usage: vmsh remote [OPTIONS] <COMMAND>" + TRY),
    (["--cpus", "4", "resize"],
     "error: unexpected argument '--cpus' found\n\n  tip: 'resize --cpus' exists\n\n"
     "Usage: vmsh remote [OPTIONS] <COMMAND>" + TRY),
    (["boot", "extra"], "error: unexpected argument 'extra' found\n\nUsage: vmsh remote boot" + TRY),
    (["boot", "--api-socket", "/s"],
     "error: unexpected argument '--api-socket' found\n\nUsage: vmsh remote boot" + TRY),
    (["boot", "-V"], "error: unexpected argument '-V' found\n\nUsage: vmsh remote boot" + TRY),
    (["help", "resize", "x"], "error: unrecognized subcommand 'x'\n\nUsage: vmsh remote resize [OPTIONS]" + TRY),
    (["--api-socket"], "error: a value is required for '--api-socket <api-socket>' but none was supplied" + TRY),
    (["read-memory"],
     "error: the following required arguments were not provided:\n  <address>\n\n"
     "Usage: vmsh remote read-memory <address> [length]" + TRY),
])
def test_usage_errors_read_as_clap_s(argv: list[str], text: str) -> None:
    assert outcome(argv) == (2, text)


def test_a_subcommand_is_required() -> None:
    status, text = outcome(["--api-socket=/s"])
    names = ", ".join([c.name for c in REMOTE.subcommands] + ["help"])
    assert status == 2 and text == (
        f"error: 'vmsh remote' requires a subcommand but one was not provided\n  [subcommands: {names}]\n\n"
        "Usage: vmsh remote [OPTIONS] <COMMAND>" + TRY)


def test_no_arguments_is_the_help_as_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert outcome([]) == (2, help_text(REMOTE, BIN_NAME, 100))


RESIZE_HELP = """\
Resize the VM

Usage: vmsh remote resize [OPTIONS]

Options:
      --cpus <cpus>        New vCPUs count
      --memory <memory>    New memory size in bytes (supports K/M/G suffix)
      --balloon <balloon>  New balloon size in bytes (supports K/M/G suffix)
  -h, --help               Print help
"""

SEND_MIGRATION_HELP_40 = """\
Initiate a VM migration

Usage: vmsh remote send-migration [OPTIONS] [send_migration_config]

Arguments:
  [send_migration_config]
          <destination_url>

Options:
      --local  \n  -h, --help   Print help
"""

CREATE_HELP = """\
Create VM from a JSON configuration

Usage: vmsh remote create [path]

Arguments:
  [path]  [default: -]

Options:
  -h, --help  Print help
"""

HELP_HELP = """\
Print this message or the help of the given subcommand(s)

Usage: vmsh remote help [COMMAND]...

Arguments:
  [COMMAND]...  Print help for the subcommand(s)
"""


@pytest.mark.parametrize("argv", [["resize", "--help"], ["resize", "-h"], ["help", "resize"],
                                  ["resize", "--cpus=1", "-h"]])
def test_help_goes_to_stdout(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert outcome(argv) == (0, RESIZE_HELP)


def test_help_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert outcome(["create", "--help"]) == (0, CREATE_HELP)
    assert outcome(["help", "help"]) == (0, HELP_HELP)
    monkeypatch.setenv("COLUMNS", "40")  # narrow: help goes on the next line
    assert outcome(["send-migration", "--help"]) == (0, SEND_MIGRATION_HELP_40)


def test_top_level_help_lists_every_subcommand() -> None:
    text = help_text(REMOTE, BIN_NAME, 100)
    assert text.startswith("Remotely control a cloud-hypervisor VMM.\n\n"
                           "Usage: vmsh remote [OPTIONS] <COMMAND>\n\nCommands:\n"
                           "  add-device         Add VFIO device\n")
    assert text.endswith("  help               Print this message or the help of the given subcommand(s)\n\nOptions:\n"
                         "      --api-socket <api-socket>  HTTP API socket path (UNIX domain socket).\n"
                         "  -h, --help                     Print help\n"
                         "  -V, --version                  Print version\n")


def test_long_help_wraps_like_clap() -> None:
    text = help_text(REMOTE.subcommand("restore"), "vmsh remote restore", 100)  # type: ignore[arg-type]  # it exists
    lines = text.splitlines()
    assert lines[5] == "  [restore_config]  Restore from a VM snapshot. "
    assert lines[6] == "                    Restore parameters"
    # the line after an over-long word: clap keeps the trailing space's own line, indented
    assert lines[8] == " " * 20
    assert all(len(line) <= 100 for line in lines if " " in line.strip())


def test_version() -> None:
    status, text = outcome(["--version"])
    assert status == 0 and text.startswith("vmsh ") and text.endswith(" (ch-remote v40.0)\n")
    assert outcome(["-V"]) == (status, text)


@pytest.mark.parametrize("argv, values", [
    (["resize", "--cpus=4"], {"cpus": "4"}),
    (["resize", "--cpus", "4"], {"cpus": "4"}),
    (["resize", "--cpus="], {"cpus": ""}),
    (["resize", "--cpus", "resize"], {"cpus": "resize"}),  # a waiting option takes any word
    (["remove-device", "--", "-x"], {"id": "-x"}),
    (["create"], {"path": "-"}),
    (["create", "-"], {"path": "-"}),
    (["send-migration", "u", "--local"], {"send_migration_config": "u", "send_migration_local": True}),
])
def test_values(argv: list[str], values: dict[str, object]) -> None:
    assert sub(argv)[1].values == values


def test_api_socket_takes_the_next_word_even_a_subcommand_name() -> None:
    status, text = outcome(["--api-socket", "boot"])
    assert status == 2 and text.startswith("error: 'vmsh remote' requires a subcommand")
    matches = parse(REMOTE, ["--api-socket", "boot", "boot"], BIN_NAME)
    assert matches.get("api-socket") == "boot" and matches.subcommand is not None and matches.subcommand[0] == "boot"


def test_jaro_is_strsim_s() -> None:
    assert jaro("MARTHA", "MARHTA") == pytest.approx(0.944444, abs=1e-6)
    assert jaro("DWAYNE", "DUANE") == pytest.approx(0.822222, abs=1e-6)
    assert jaro("DIXON", "DICKSONX") == pytest.approx(0.766667, abs=1e-6)
    assert jaro("", "") == 1.0 and jaro("a", "") == 0.0
    assert did_you_mean("te", ["test", "temp", "possible", "values"]) == ["test", "temp"]
    assert did_you_mean("hahaahahah", ["test", "possible", "values"]) == []


@pytest.mark.parametrize("text, width, lines", [  # clap's own textwrap cases
    ("To be, or not to be, that is the question.", 10, ["To be, or", "not to be,", "that is", "the", "question."]),
    ("foo bar baz", 5, ["foo", "bar", "baz"]),
    ("foo bar baz", 10, ["foo bar", "baz"]),
    ("foo bar", 0, ["foo", "bar"]),
    ("  foo bar", 6, ["  foo", "  bar"]),
    (" foobar baz", 6, ["", " foobar", " baz"]),
    ("foo     bar     baz  ", 5, ["foo", "bar", "baz"]),
    ("aaabbbccc x yyyzzzwww", 9, ["aaabbbccc", "x", "yyyzzzwww"]),
    ("x \u2013 x", 1, ["x", "\u2013", "x"]),
])
def test_wrap_is_clap_s_greedy_wrap(text: str, width: int, lines: list[str]) -> None:
    assert wrap(text, width).split("\n") == lines
