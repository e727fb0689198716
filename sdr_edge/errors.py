"""The one base of this project's own errors: an error to show the user as one line.

The CLIs (`sdr_edge.cli.run_cli`) print a `SdrEdgeError` as `prog command: error: message`
with exit status 2; any other exception is a bug and keeps its traceback. Subclasses keep
their historical second base (`ValueError`, `RuntimeError`) so existing `except` clauses
still catch them.
"""

from __future__ import annotations


class SdrEdgeError(Exception):
    """An error to show the user as one line (a bad input, file or answer, not a bug)."""
