"""The one parser of route ids ("1-2-3-0"): strict ASCII digits, fullmatched, to a tuple.

Route ids reach URL paths (the registry client), cache paths (the registry) and configs
(Flower's `route`), so they are parsed once, here. `int()` alone would take ' 1', '+1', '1_0'
and '１', and a regex anchored with `$` a trailing newline; only plain digits (no leading
zeros, at most 4 per level, at most 64 levels) joined by a separator pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sdr_edge.errors import SdrEdgeError

MAX_LEVELS = 64
MAX_ID_CHARS = 320
_DIGIT = r"(?:0|[1-9][0-9]{0,3})"


class RouteIdError(SdrEdgeError, ValueError):
    """A route id is malformed or names no sub-net of this SDRnet."""


def format_route_id(route: Sequence[int]) -> str:
    """(1, 2, 3, 0) -> '1-2-3-0', the form used in URLs, cache folders and manifests."""
    return "-".join(str(int(d)) for d in route)


def _pattern(separators: str) -> re.Pattern[str]:
    sep = "[" + re.escape(separators) + "]"
    return re.compile(rf"{_DIGIT}(?:{sep}{_DIGIT}){{0,{MAX_LEVELS - 1}}}", re.ASCII)


def parse_route_id(text: str, branching: Sequence[int] | None = None, *,
                   separators: str = "-") -> tuple[int, ...]:
    """'1-2-3-0' -> (1, 2, 3, 0); raises RouteIdError.

    `separators` lists the characters allowed between digits ('-' in URLs, '-,' in configs).
    With `branching`, the number of levels and every digit are checked against it too.
    """
    if not separators or any(c.isalnum() or c.isspace() for c in separators):
        raise ValueError(f"route id separators must be punctuation, got {separators!r}")
    if (not isinstance(text, str) or len(text) > MAX_ID_CHARS
            or not _pattern(separators).fullmatch(text)):
        shown = text[:40] if isinstance(text, str) else type(text).__name__
        raise RouteIdError(f"malformed route id {shown!r}: expected digits joined by "
                           f"{' or '.join(repr(c) for c in separators)}")
    route = tuple(int(part) for part in re.split("[" + re.escape(separators) + "]", text))
    if branching is None:
        return route
    if len(route) != len(branching):
        raise RouteIdError(f"route id has {len(route)} levels, this SDRnet has {len(branching)}")
    for level, (digit, limit) in enumerate(zip(route, branching, strict=True)):
        if digit >= limit:
            raise RouteIdError(f"route digit {digit} at level {level} is out of range "
                               f"(0..{limit - 1})")
    return route
