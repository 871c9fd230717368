"""The option grammar: splitting, quoting, unset values and each value type."""

from __future__ import annotations

import pytest

from vmsh.config.options import (
    OptionParser,
    byte_sized,
    dequote,
    integer,
    integer_list,
    mac_address,
    split_commas,
    string_list,
    toggle,
    tuple_list,
)
from vmsh.errors import OptionParseError


@pytest.mark.parametrize(
    "text, items",
    [
        ("a=1,b=2", ["a=1", "b=2"]),
        ("a=[1,2],b=3", ["a=[1,2]", "b=3"]),
        ('a="x,y",b=3', ['a="x,y"', "b=3"]),
        ("a=[[1,2],[3]],b", ["a=[[1,2],[3]]", "b"]),
        ('a="[",b=1', ['a="["', "b=1"]),
        ("  a=1  ", ["a=1"]),
        ("a=1,,b=2", ["a=1", "", "b=2"]),
    ],
)
def test_split_commas_respects_brackets_and_quotes(text: str, items: list[str]) -> None:
    assert split_commas(text) == items


@pytest.mark.parametrize("text", ["a=]", "a=[1,2", 'a="x', "a=[1]]"])
def test_split_commas_rejects_unbalanced(text: str) -> None:
    with pytest.raises(ValueError):
        split_commas(text)


def test_dequote_removes_quotes_and_keeps_doubled_quote() -> None:
    assert dequote('"console=ttyS0,9600n8"') == "console=ttyS0,9600n8"
    assert dequote('"say ""hi"""') == 'say "hi"'
    assert dequote('a"b"c') == "abc"


def test_parser_first_equals_splits_and_values_are_trimmed() -> None:
    p = OptionParser("extra", "b").parse("extra=foo=bar, b = 2 ")
    assert p.get("extra") == "foo=bar"
    assert p.get("b") == "2"


def test_parser_empty_value_is_unset() -> None:
    p = OptionParser("mac").parse("mac=")
    assert p.is_set("mac")
    assert p.get("mac") is None
    assert p.convert("mac", str) is None


def test_parser_later_duplicate_wins() -> None:
    assert OptionParser("a").parse("a=1,a=2").get("a") == "2"


def test_parser_empty_input_sets_nothing() -> None:
    p = OptionParser("a").parse("   ")
    assert not p.is_set("a")


def test_parser_unknown_key() -> None:
    with pytest.raises(OptionParseError, match=r"^Unknown option: foo$"):
        OptionParser("a").parse("a=1,foo=2")


def test_parser_value_key_without_value_is_invalid_syntax() -> None:
    with pytest.raises(OptionParseError, match=r"^Invalid syntax: a$"):
        OptionParser("a").parse("a")


def test_parser_valueless_key() -> None:
    p = OptionParser("file", valueless=("tty",)).parse("tty")
    assert p.is_set("tty") and not p.is_set("file")


def test_parser_unbalanced_input_is_invalid_syntax() -> None:
    with pytest.raises(OptionParseError, match=r"^Invalid syntax: a=\[1$"):
        OptionParser("a").parse("a=[1")


def test_convert_failure_names_value_and_key() -> None:
    with pytest.raises(OptionParseError, match=r"^Unable to convert x for n$"):
        OptionParser("n").parse("n=x").convert("n", integer("u8"))


@pytest.mark.parametrize("word, value", [("on", True), ("ON", True), ("true", True), ("off", False), ("False", False)])
def test_toggle(word: str, value: bool) -> None:
    assert toggle(word) is value


@pytest.mark.parametrize("word", ["yes", "1", "enabled"])
def test_toggle_rejects(word: str) -> None:
    with pytest.raises(ValueError):
        toggle(word)


@pytest.mark.parametrize(
    "text, value", [("0", 0), ("512", 512), ("1K", 1024), ("512M", 512 << 20), ("1G", 1 << 30), ("16G", 16 << 30)]
)
def test_byte_sized(text: str, value: int) -> None:
    assert byte_sized(text) == value


@pytest.mark.parametrize("text", ["1T", "1k", "1m", "G", "", "-1", "1.5G", "1 G", "99999999999G"])
def test_byte_sized_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        byte_sized(text)


@pytest.mark.parametrize("kind, text", [("u8", "256"), ("u8", "-1"), ("u16", "65536"), ("u32", "0x10"), ("u8", " 1"),
                                        ("u8", "1_0")])
def test_integer_range_and_syntax(kind: str, text: str) -> None:
    with pytest.raises(ValueError):
        integer(kind)(text)


def test_integer_list_ranges_inclusive() -> None:
    assert integer_list("u8")("[0-3,6]") == [0, 1, 2, 3, 6]
    assert integer_list("u8")("1,2") == [1, 2]


@pytest.mark.parametrize("text", ["[5-5]", "[5-3]", "[1,x]", "[300]"])
def test_integer_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        integer_list("u8")(text)


def test_string_list_keeps_quoted_commas() -> None:
    assert string_list('[a,"b,c",d]') == ["a", "b,c", "d"]


def test_tuple_list() -> None:
    conv = tuple_list(integer("u8"), integer_list("usize"))
    assert conv("[0@[0,2],1@[1,3]]") == [(0, [0, 2]), (1, [1, 3])]
    assert tuple_list(integer("u32"), integer("u8"))("[0@25,1@20]") == [(0, 25), (1, 20)]


@pytest.mark.parametrize("text", ["0@1", "[@1]", "[0]", "[0@x]"])
def test_tuple_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        tuple_list(integer("u8"), integer("u8"))(text)


def test_mac_address_normalized() -> None:
    assert mac_address("12:34:56:78:90:AB") == "12:34:56:78:90:ab"
    with pytest.raises(ValueError):
        mac_address("12:34:56:78:90")
