"""Bearer tokens for the registry: stored as sha256 hashes, compared in constant time.

A tokens file holds one `NAME sha256:HEX` line per client (comments start with '#'). Tokens
are 256-bit random strings, so a plain sha256 is enough to make a stolen file useless (no
password stretching is needed for high-entropy secrets). The plain token is printed once,
when it is created, and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.errors import SdrEdgeError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sdr_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_LINE = re.compile(r"^(\S+)\s+sha256:([0-9a-f]{64})$")


class TokenFileError(SdrEdgeError, ValueError):
    """A tokens file is malformed, or a token name is invalid or taken."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenStore:
    """Known token hashes by client name."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        if not path.is_file():
            raise TokenFileError(f"tokens file not found: {path} (create one with "
                                 "`sdr-server token --tokens FILE --name NAME`)")
        entries: list[tuple[str, bytes]] = []
        for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if not match:
                raise TokenFileError(f"{path}:{lineno}: expected 'NAME sha256:HEX'")
            entries.append((match.group(1), bytes.fromhex(match.group(2))))
        return cls(tuple(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, token: str) -> str | None:
        """The client name for `token`, or None; every entry is compared (no early exit)."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: str | None = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


class TokensUnavailable(SdrEdgeError, RuntimeError):
    """The tokens file cannot be read or parsed: no token is trusted until it is fixed."""


class TokenFile:
    """A TokenStore that follows its file: tokens added or revoked take effect without a
    restart (the file is stat-ed at most once per `interval` seconds).

    Revocation must not fail open: when the file disappears, becomes unreadable or is edited
    into something malformed, every check raises TokensUnavailable (the app answers 503 and
    the reason is logged) until a valid file is back. Keeping the previous tokens would keep
    a token its owner just removed working.
    """

    def __init__(self, path: str | Path, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.store: TokenStore | None = TokenStore.load(self.path)
        self.error: str | None = None
        self._stamp = self._stat()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else 0

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.interval:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.store = TokenStore.load(self.path)
        except (TokenFileError, OSError, UnicodeDecodeError) as exc:
            self.store, self.error = None, str(exc)
            log.error("refusing every token until the tokens file is valid again: %s", exc)
            return
        if self.error is not None:
            log.warning("tokens file %s is valid again", self.path)
        self.error = None
        log.info("reloaded %d token(s) from %s", len(self.store), self.path)

    def check(self, token: str) -> str | None:
        """The client name for `token`, None when unknown; TokensUnavailable when the file
        is missing or malformed."""
        self._refresh()
        if self.store is None:
            raise TokensUnavailable(self.error or f"{self.path} is not usable")
        return self.store.check(token)


def create_token(path: str | Path, name: str) -> str:
    """Append a new token's hash for `name` to the tokens file (0600) and return the token."""
    if not _NAME.match(name):
        raise TokenFileError(f"invalid token name {name!r}: use letters, digits, '_', '.', '@', "
                             "'-' (up to 64)")
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if path.is_file():
        names = {n for n, _ in TokenStore.load(path).entries}
        if name in names:
            raise TokenFileError(f"{path} already has a token named {name!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    if existing and not existing.endswith("\n"):
        existing += "\n"
    atomic_write_text(path, f"{existing}{name} sha256:{hash_token(token)}\n")
    path.chmod(0o600)
    return token
