"""Route ids ("1-2-3-0") are parsed strictly to integers before anything touches the disk.

The cache path of a bundle is built only from the validated integer tuple, never from the
text a client sent, so '../..', '%2e%2e', absolute paths or huge digits cannot reach the
file system.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_DIGIT = r"(?:0|[1-9][0-9]{0,3})"
# fullmatch, not `$`: a `$` also matches before a trailing newline ('1-2-3-0\n')
_ROUTE_ID = re.compile(rf"{_DIGIT}(?:-{_DIGIT}){{0,63}}", re.ASCII)


class RouteIdError(ValueError):
    """A route id is malformed or names no sub-net of this SDRnet."""


def format_route_id(route: Sequence[int]) -> str:
    return "-".join(str(int(d)) for d in route)


def parse_route_id(text: str, branching: Sequence[int]) -> tuple[int, ...]:
    """'1-2-3-0' -> (1, 2, 3, 0), checked against the branching; raises RouteIdError."""
    if len(text) > 320 or not _ROUTE_ID.fullmatch(text):
        raise RouteIdError(f"malformed route id {text[:40]!r}: expected digits joined by '-'")
    route = tuple(int(part) for part in text.split("-"))
    if len(route) != len(branching):
        raise RouteIdError(f"route id has {len(route)} levels, this SDRnet has {len(branching)}")
    for level, (digit, limit) in enumerate(zip(route, branching, strict=True)):
        if digit >= limit:
            raise RouteIdError(f"route digit {digit} at level {level} is out of range "
                               f"(0..{limit - 1})")
    return route


def _number_pattern(limit: int) -> str:
    """ECMA/Python regex for the decimal integers 0..limit-1, without leading zeros."""
    return "|".join(str(d) for d in range(limit - 1, -1, -1))


def route_id_pattern(branching: Sequence[int]) -> str:
    """The JSON-schema `pattern` of exactly the route ids `parse_route_id` accepts.

    Anchored with '^...$', which in the ECMA regexes JSON schema uses (no multiline flag)
    matches only at the very end, unlike Python's `$`.
    """
    return "^" + "-".join(f"(?:{_number_pattern(int(b))})" for b in branching) + "$"
