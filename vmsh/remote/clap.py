"""A command-line parser that reads, answers and fails like clap 4.5, which ch-remote v40 is built with.

``vmsh remote`` is a drop-in for ch-remote, so its command line must behave the same way to a
script: ``--flag value`` and ``--flag=value`` alike, subcommands and ``help [COMMAND]...``, the
help layout (wrapped to the terminal, 100 columns when there is none) and clap's error texts,
their suggestions ("tip: a similar argument exists") and exit status 2. Only what ch-remote's
command tree uses is modelled: long options with one value, switches, single positionals, one
level of subcommands, ``-h/--help`` and ``-V/--version``.

The parse is clap's: tokens are read left to right; an option waiting for its value takes the
next token whatever it is, unless it starts with ``-`` (then the option's value is missing);
``--`` makes every later token a positional value; a subcommand name ends the parent's tokens.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Sequence

from vmsh.errors import UsageError

TAB = "  "
NEXT_LINE_INDENT = " " * 8
#: where a help text starts when it goes on the line after its argument
NEXT_LINE_COLUMN = len(TAB + NEXT_LINE_INDENT)
#: clap's width when the output is not a terminal and COLUMNS is unset
DEFAULT_WIDTH = 100


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument: a long option with a value, a switch, or (without ``long``) a positional."""

    id: str
    help: str = ""
    long: str | None = None
    short: str | None = None
    #: "option" (one value), "switch" (clap's SetTrue), "positional", "help", "version"
    kind: str = "option"
    default: str | None = None
    required: bool = False
    #: a positional that takes every value left (only ``help [COMMAND]...``)
    multiple: bool = False

    @property
    def positional(self) -> bool:
        return self.kind == "positional"

    @property
    def takes_value(self) -> bool:
        return self.kind in ("option", "positional")

    def shown(self, required: bool | None = None) -> str:
        """The argument as clap writes it in messages and usage lines (``--cpus <cpus>``, ``[id]``)."""
        if self.positional:
            needed = self.required if required is None else required
            return (f"<{self.id}>" if needed else f"[{self.id}]") + ("..." if self.multiple else "")
        name = f"--{self.long}" if self.long else f"-{self.short}"
        return f"{name} <{self.id}>" if self.takes_value else name


HELP_ARG = Arg("help", "Print help", long="help", short="h", kind="help")
VERSION_ARG = Arg("version", "Print version", long="version", short="V", kind="version")


@dataclasses.dataclass(frozen=True)
class Command:
    """A command or subcommand, with clap's defaults for the help and version flags."""

    name: str
    about: str = ""
    args: tuple[Arg, ...] = ()
    subcommands: tuple[Command, ...] = ()
    version: str | None = None

    def all_args(self) -> tuple[Arg, ...]:
        extra = (HELP_ARG, VERSION_ARG) if self.version else (HELP_ARG,)
        return self.args + extra

    def positionals(self) -> list[Arg]:
        return [a for a in self.args if a.positional]

    def options(self) -> list[Arg]:
        return [a for a in self.all_args() if not a.positional]

    def by_long(self, name: str) -> Arg | None:
        return next((a for a in self.all_args() if a.long == name), None)

    def by_short(self, char: str) -> Arg | None:
        return next((a for a in self.all_args() if a.short == char), None)

    def subcommand(self, name: str) -> Command | None:
        if self.subcommands and name == "help":
            return HELP_COMMAND
        return next((c for c in self.subcommands if c.name == name), None)

    def subcommand_names(self) -> list[str]:
        return [c.name for c in self.subcommands] + (["help"] if self.subcommands else [])


#: clap's generated ``help`` subcommand (only in a command that has subcommands)
HELP_COMMAND = Command("help", "Print this message or the help of the given subcommand(s)",
                       (Arg("COMMAND", "Print help for the subcommand(s)", kind="positional", multiple=True),))


@dataclasses.dataclass
class Matches:
    """What a command line gave: values by argument id, and the subcommand's own matches."""

    values: dict[str, str | bool] = dataclasses.field(default_factory=dict)
    subcommand: tuple[str, Matches] | None = None

    def get(self, arg_id: str) -> str | None:
        value = self.values.get(arg_id)
        return value if isinstance(value, str) else None

    def flag(self, arg_id: str) -> bool:
        return self.values.get(arg_id) is True


class ClapExit(UsageError):
    """Parsing stopped: ``text`` goes to stdout (help, version: status 0) or stderr (errors: status 2).

    ``str()`` is the first line without ``error: ``, for callers that show a one-line message.
    """

    def __init__(self, text: str, status: int, summary: str = "") -> None:
        super().__init__(summary or text.splitlines()[0])
        self.text = text
        self.status = status

    @property
    def to_stdout(self) -> bool:
        return self.status == 0


def terminal_width() -> int:
    """clap's help width: the terminal's (when it has a size), else ``COLUMNS``, else 100."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        if size.columns > 0 and size.lines > 0:
            return size.columns
    except (OSError, ValueError, AttributeError):
        pass
    columns = os.environ.get("COLUMNS", "").removeprefix("+")
    return int(columns) if columns.isascii() and columns.isdigit() else DEFAULT_WIDTH


# -- suggestions -----------------------------------------------------------------------------------


def jaro(a: str, b: str) -> float:
    """Jaro similarity, as the ``strsim`` crate computes it (clap suggests above 0.7)."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    reach = max(max(len(a), len(b)) // 2 - 1, 0)
    a_flags = [False] * len(a)
    b_flags = [False] * len(b)
    matches = 0
    for i, ch in enumerate(a):
        for j in range(max(0, i - reach), min(len(b), i + reach + 1)):
            if not b_flags[j] and b[j] == ch:
                a_flags[i] = b_flags[j] = True
                matches += 1
                break
    if matches == 0:
        return 0.0
    b_matched = iter(ch for ch, flag in zip(b, b_flags, strict=True) if flag)
    transpositions = sum(ch != next(b_matched) for ch, flag in zip(a, a_flags, strict=True) if flag) // 2
    return (matches / len(a) + matches / len(b) + (matches - transpositions) / matches) / 3


def did_you_mean(value: str, candidates: Iterable[str]) -> list[str]:
    """The candidates similar to ``value``, least similar first (clap's order)."""
    scored = [(jaro(value, c), c) for c in candidates]
    return [c for score, c in sorted((s for s in scored if s[0] > 0.7), key=lambda s: s[0])]


# -- usage and help text ---------------------------------------------------------------------------


def usage(cmd: Command, bin_name: str, used: Sequence[Arg] = ()) -> str:
    """clap's usage line: the plain one, or with the arguments already ``used`` (and required ones) spelled out."""
    parts = [bin_name]
    if not used:
        if any(not a.positional and a.kind in ("option", "switch") and not a.required for a in cmd.args):
            parts.append("[OPTIONS]")
        parts += [a.shown() for a in cmd.positionals()]
    else:
        picked = [a for a in cmd.args if a.required and not a.positional]
        picked += [a for a in used if not a.positional and a not in picked]
        parts += [a.shown(True) for a in picked]
        parts += [a.shown(a.required or a in used) for a in cmd.positionals()]
    if cmd.subcommands:
        parts.append("<COMMAND>")
    return " ".join(parts)


def _display_width(text: str) -> int:
    """Columns, skipping ANSI escapes the way clap does (a control character up to the next ``m``)."""
    width, escape = 0, False
    for ch in text:
        if ch.isascii() and (ord(ch) < 0x20 or ord(ch) == 0x7F):
            escape = True
        elif escape and ch == "m":
            escape = False
            continue
        if not escape:
            width += 1
    return width


def _words(line: str) -> list[str]:
    """Split at spaces, each word keeping the spaces after it (clap's ``find_words_ascii_space``)."""
    words: list[str] = []
    start, in_space = 0, False
    for i, ch in enumerate(line):
        space = ch == " "
        if in_space and not space:
            words.append(line[start:i])
            start = i
        in_space = space
    if start < len(line):
        words.append(line[start:])
    return words


def wrap(text: str, width: int) -> str:
    """clap's greedy wrap: words move to a new line past ``width``; the result is trimmed at the end."""
    out: list[str] = []
    parts = text.split("\n")
    for line in [p + "\n" for p in parts[:-1]] + parts[-1:]:
        words = _words(line)
        carry = words[0] if words and not words[0].strip() else ""
        line_width, i = 0, 0
        while i < len(words):
            word = words[i]
            trimmed = word.rstrip()
            word_width = _display_width(trimmed)
            if i != 0 and width < line_width + word_width:
                words[i - 1] = words[i - 1].rstrip()
                words[i:i] = ["\n", carry] if carry else ["\n"]
                i += 2 if carry else 1
                line_width = len(carry)
            line_width += word_width + len(word) - len(trimmed)
            i += 1
        out.extend(words)
    return "".join(out).rstrip()


def _help_block(text: str, indent: int, width: int) -> str:
    return wrap(text, max(width - indent, 0)).replace("\n", "\n" + " " * indent)


def _next_line(help_width: int, taken: int, width: int) -> bool:
    return width >= taken and taken / width > 0.40 and help_width > width - taken


def _arg_lines(args: Sequence[Arg], width: int) -> list[str]:
    longest = max([2] + [_display_width(a.shown()) for a in args if a.takes_value or a.long or not a.short])
    taken = longest + 2 * len(TAB) + (0 if args[0].positional else 4)

    def spec(a: Arg) -> str:
        return f"[default: {a.default}]" if a.default is not None else ""

    def about(a: Arg) -> str:
        return f"{a.help} {spec(a)}" if a.help and spec(a) else a.help or spec(a)

    # clap measures the help and its [default: ...] without the space between them
    next_line = any(_next_line(_display_width(a.help) + _display_width(spec(a)), taken, width) for a in args)
    lines = []
    for a in args:
        if a.positional:
            head = a.shown()
        else:
            head = (f"-{a.short}" if a.short else "    ") + (", " if a.short and a.long else "")
            head += f"--{a.long}" if a.long else ""
            head += f" <{a.id}>" if a.takes_value else ""
        if next_line:
            lines.append(f"{TAB}{head}\n{TAB}{NEXT_LINE_INDENT}" + _help_block(about(a), NEXT_LINE_COLUMN, width))
            continue
        pad = longest + len(TAB) - _display_width(a.shown()) + (0 if a.positional or a.long else 4)
        lines.append(f"{TAB}{head}{' ' * pad}" + _help_block(about(a), taken, width))
    return lines


def _command_lines(cmd: Command, width: int) -> list[str]:
    subs = [*cmd.subcommands, HELP_COMMAND]
    longest = max([2] + [_display_width(c.name) for c in subs])
    taken = longest + 2 * len(TAB)
    next_line = any(_next_line(_display_width(c.about), taken, width) for c in subs)
    lines = []
    for c in subs:
        if next_line:
            lines.append(f"{TAB}{c.name}\n{TAB}{NEXT_LINE_INDENT}" + _help_block(c.about, NEXT_LINE_COLUMN, width))
        else:
            # clap indents an about's wrapped lines 4 columns deeper than its first line
            pad = " " * (longest + len(TAB) - _display_width(c.name))
            lines.append(f"{TAB}{c.name}{pad}" + _help_block(c.about, taken + 4, width))
    return lines


def help_text(cmd: Command, bin_name: str, width: int | None = None) -> str:
    """``--help``: about, usage, then the Commands, Arguments and Options sections."""
    width = terminal_width() if width is None else width
    sections = []
    if cmd.subcommands:
        sections.append("Commands:\n" + "\n".join(_command_lines(cmd, width)))
    if cmd.positionals():
        sections.append("Arguments:\n" + "\n".join(_arg_lines(cmd.positionals(), width)))
    if cmd is not HELP_COMMAND:  # clap's help subcommand has no --help of its own
        sections.append("Options:\n" + "\n".join(_arg_lines(cmd.options(), width)))
    about = wrap(cmd.about, width) + "\n" if cmd.about else ""
    return f"{about}\nUsage: {usage(cmd, bin_name)}\n\n" + "\n\n".join(sections).rstrip() + "\n"


# -- errors ----------------------------------------------------------------------------------------


def error(message: str, usage_line: str | None = None, tips: Sequence[str] = (), extra: str = "",
          summary: str = "") -> ClapExit:
    """A clap error: ``error: ...``, its tips, the usage line, and the pointer to ``--help``; status 2.

    ``summary`` is the one-line message (default: ``message``).
    """
    text = f"error: {message}{extra}"
    if tips:
        text += "\n\n" + "\n".join(f"{TAB}tip: {tip}" for tip in tips)
    if usage_line is not None:
        text += f"\n\nUsage: {usage_line}"
    text += "\n\nFor more information, try '--help'.\n"
    return ClapExit(text, 2, summary or message)


def _similar(kind: str, names: Sequence[str]) -> str:
    listed = ", ".join(f"'{n}'" for n in names)
    return f"a similar {kind} exists: {listed}" if len(names) == 1 else f"some similar {kind}s exist: {listed}"


def missing_required(cmd: Command, bin_name: str, missing: Sequence[Arg], used: Sequence[Arg]) -> ClapExit:
    """clap's "the following required arguments were not provided" (``cmd`` has its required arguments marked)."""
    ordered = [a for a in missing if not a.positional] + [a for a in missing if a.positional]
    names = "".join(f"\n{TAB}{a.shown(True)}" for a in ordered)
    return error("the following required arguments were not provided:", usage(cmd, bin_name, [*used, *missing]),
                 extra=names, summary="missing " + ", ".join(a.shown(True) for a in ordered))


# -- parsing ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    cmd: Command
    bin_name: str
    matches: Matches
    #: the option waiting for its value, if any
    pending: Arg | None = None
    trailing: bool = False
    position: int = 0
    used: list[Arg] = dataclasses.field(default_factory=list)


def parse(cmd: Command, argv: Sequence[str], bin_name: str) -> Matches:
    """Parse ``argv`` (without the program name) as clap would.

    :raises ClapExit: for help and version (status 0) and for every usage error (status 2).
    """
    matches = Matches()
    state = _State(cmd, bin_name, matches)
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not state.trailing:
            if state.pending is None and cmd.subcommand(token) is not None:
                if token == "help" and cmd.subcommands:
                    raise _help_subcommand(cmd, bin_name, tokens[i:])
                sub = cmd.subcommand(token)
                assert sub is not None
                matches.subcommand = (sub.name, parse(sub, tokens[i:], f"{bin_name} {sub.name}"))
                return matches
            if token == "--":
                state.trailing = True
                continue
            if token.startswith("--"):
                _long(state, token[2:], tokens[i:])
                continue
            if token.startswith("-") and len(token) > 1:
                _short(state, token)
                continue
            if state.pending is not None:
                _store(state, state.pending, token)
                state.pending = None
                continue
        _positional(state, token)
    _resolve_pending(state)
    if cmd.subcommands:
        if not state.used:
            raise ClapExit(help_text(cmd, bin_name), 2, "a subcommand is required")
        names = ", ".join(cmd.subcommand_names())
        raise error(f"'{bin_name}' requires a subcommand but one was not provided",
                    usage(cmd, bin_name), extra=f"\n{TAB}[subcommands: {names}]")
    for a in cmd.args:
        if a.default is not None and a.id not in matches.values:
            matches.values[a.id] = a.default
    missing = [a for a in cmd.args if a.required and a.id not in matches.values]
    if missing:
        raise missing_required(cmd, bin_name, missing, state.used)
    return matches


def _resolve_pending(state: _State) -> None:
    """An option still waiting for its value when something else comes: clap's empty-value error."""
    if state.pending is not None:
        arg, state.pending = state.pending, None
        raise error(f"a value is required for '{arg.shown()}' but none was supplied")


def _store(state: _State, arg: Arg, value: str | bool) -> None:
    if arg.id in state.matches.values:
        raise error(f"the argument '{arg.shown()}' cannot be used multiple times", usage(state.cmd, state.bin_name))
    state.matches.values[arg.id] = value
    state.used.append(arg)


def _react(state: _State, arg: Arg, value: str | None) -> None:
    """A flag was given (``value`` is the ``=...`` part): show help or version, store, or wait for the value."""
    _resolve_pending(state)
    if arg.kind == "help":
        text = help_text(state.cmd, state.bin_name)
        raise ClapExit(text, 0, text.rstrip())
    if arg.kind == "version":
        text = f"{state.cmd.name} {state.cmd.version}\n"
        raise ClapExit(text, 0, text.rstrip())
    if arg.kind == "switch":
        _store(state, arg, True)
    elif value is None:
        state.pending = arg
    else:
        _store(state, arg, value)


def _long(state: _State, body: str, rest: Sequence[str]) -> None:
    name, eq, value = body.partition("=")
    arg = state.cmd.by_long(name)
    if arg is None:
        state.pending = None
        raise _unknown_long(state, name, rest)
    if eq and not arg.takes_value:
        state.pending = None
        raise error(f"unexpected value '{value}' for '{arg.shown()}' found; no more were expected",
                    usage(state.cmd, state.bin_name, [*state.used, arg]))
    _react(state, arg, value if eq else None)


def _unknown_long(state: _State, name: str, rest: Sequence[str]) -> ClapExit:
    cmd = state.cmd
    tips: list[str] = []
    used = list(state.used)
    similar = did_you_mean(name, [a.long for a in cmd.all_args() if a.long])
    if similar:
        suggested = cmd.by_long(similar[-1])
        assert suggested is not None
        if suggested not in used:
            used.append(suggested)
        tips.append(_similar("argument", [f"--{similar[-1]}"]))
    else:
        best: tuple[int, str] | None = None
        for sub in cmd.subcommands:
            close = did_you_mean(name, [a.long for a in sub.all_args() if a.long])
            if close and sub.name in rest:
                place = list(rest).index(sub.name)
                if best is None or place < best[0]:
                    best = (place, f"'{sub.name} --{close[-1]}' exists")
        if best is not None:
            tips.append(best[1])
    if not tips and not state.trailing and cmd.positionals():
        tips.insert(0, f"to pass '--{name}' as a value, use '-- --{name}'")
    return error(f"unexpected argument '--{name}' found", usage(cmd, state.bin_name, used), tips)


def _short(state: _State, token: str) -> None:
    for char in token[1:]:
        arg = state.cmd.by_short(char)
        if arg is None:
            state.pending = None
            tips = [f"to pass '-{char}' as a value, use '-- -{char}'"] if state.cmd.positionals() else []
            raise error(f"unexpected argument '-{char}' found", usage(state.cmd, state.bin_name), tips)
        _react(state, arg, None)


def _positional(state: _State, token: str) -> None:
    cmd = state.cmd
    positionals = cmd.positionals()
    if state.position < len(positionals):
        _resolve_pending(state)
        _store(state, positionals[state.position], token)
        state.position += 1
        return
    state.pending = None
    if state.trailing and cmd.subcommand(token) is not None:
        raise error(f"unexpected argument '{token}' found", usage(cmd, state.bin_name),
                    [f"subcommand '{token}' exists; to use it, remove the '--' before it"])
    if cmd.subcommands:
        similar = did_you_mean(token, cmd.subcommand_names())
        if similar:
            raise error(f"unrecognized subcommand '{token}'", usage(cmd, state.bin_name),
                        [_similar("subcommand", similar)])
        if not positionals:
            raise error(f"unrecognized subcommand '{token}'", usage(cmd, state.bin_name))
    raise error(f"unexpected argument '{token}' found", usage(cmd, state.bin_name))


def _help_subcommand(cmd: Command, bin_name: str, names: Sequence[str]) -> ClapExit:
    """``help [COMMAND]...``: the help of the named (sub)command, or an unrecognized-subcommand error."""
    for name in names:
        sub = cmd.subcommand(name)
        if sub is None:
            return error(f"unrecognized subcommand '{name}'", usage(cmd, bin_name))
        cmd, bin_name = sub, f"{bin_name} {sub.name}"
    text = help_text(cmd, bin_name)
    return ClapExit(text, 0, text.rstrip())
