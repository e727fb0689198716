"""Route ids ("1-2-3-0") are parsed strictly to integers before anything touches the disk.

The parser is the library's (`sdr_edge.routing.route_ids`, shared with the registry client
and the Flower config); this module adds the JSON-schema pattern the OpenAPI document states.
The cache path of a bundle is built only from the validated integer tuple, never from the
text a client sent, so '../..', '%2e%2e', absolute paths or huge digits cannot reach the
file system.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdr_edge.routing.route_ids import RouteIdError, format_route_id, parse_route_id

__all__ = ["RouteIdError", "format_route_id", "parse_route_id", "route_id_pattern"]


def _number_pattern(limit: int) -> str:
    """ECMA/Python regex for the decimal integers 0..limit-1, without leading zeros."""
    return "|".join(str(d) for d in range(limit - 1, -1, -1))


def route_id_pattern(branching: Sequence[int]) -> str:
    """The JSON-schema `pattern` of exactly the route ids `parse_route_id` accepts.

    Anchored with '^...$', which in the ECMA regexes JSON schema uses (no multiline flag)
    matches only at the very end, unlike Python's `$`.
    """
    return "^" + "-".join(f"(?:{_number_pattern(int(b))})" for b in branching) + "$"
