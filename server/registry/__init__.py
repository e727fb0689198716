"""The sub-net registry served by `sdr-server serve` (FastAPI app, tokens, bundle cache).

`create_app` is imported lazily so that `sdr-server token` does not pay for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
