"""Reading a ``--event-monitor`` file in guest tests: its records as (source, event,
properties), read while the VMM still writes, and waits for the records a test expects."""

from __future__ import annotations

import json
from pathlib import Path

from vmsh.harness.waiting import WaitTimeout, wait_until

Record = tuple[str, str, dict]


def events_of(path: Path) -> list[Record]:
    """The (source, event, properties) of every record in an event-monitor file so far."""
    decoder, text, out, pos = json.JSONDecoder(), path.read_text(), [], 0
    while (pos := _skip_space(text, pos)) < len(text):
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # a record still being written
        out.append((record["source"], record["event"], record.get("properties") or {}))
    return out


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def wait_for_event(path: Path, source: str, event: str, timeout: float = 60.0) -> dict:
    """The properties of the first ``source event`` record in ``path``, once it is there."""

    def found() -> tuple[dict] | None:
        for src, ev, props in events_of(path):
            if (src, ev) == (source, event):
                return (props,)  # a tuple: true even when the record has no properties
        return None

    try:
        return wait_until(found, timeout, f"a {source} {event} event in {path}", interval=0.2)[0]
    except WaitTimeout as err:
        raise WaitTimeout(f"{err}; the events so far: {events_of(path)}") from None


def wait_for_events(path: Path, count: int, what: str, timeout: float = 60.0) -> list[Record]:
    """The records of ``path`` once there are at least ``count``."""
    try:
        return wait_until(lambda: (len(e := events_of(path)) >= count) and e, timeout, what, interval=0.2)
    except WaitTimeout as err:
        raise WaitTimeout(f"{err}; the events so far: {events_of(path)}") from None


def activated(ids: list[str]) -> list[Record]:
    """The ``virtio-device activated`` records of ``ids``."""
    return [("virtio-device", "activated", {"id": i}) for i in ids]


def resets(ids: list[str]) -> list[Record]:
    """The ``virtio-device reset`` records of ``ids``."""
    return [("virtio-device", "reset", {"id": i}) for i in ids]


def vm(*names: str) -> list[Record]:
    """The ``vm`` records (no properties) called ``names``."""
    return [("vm", n, {}) for n in names]


def by_id(records: list[Record]) -> list[Record]:
    """``records`` in id order: the guest's drivers start (and stop) its devices in an order of
    their own (driver init order, not slot order)."""
    return sorted(records, key=lambda r: r[2].get("id", ""))
