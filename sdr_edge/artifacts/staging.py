"""The one staged-output rule: a command never deletes what it did not write.

Every writer of a folder (`--out` of fetch, fetch --kit, prune, the agent's state, the kit and
bundles of a run) stages into a fresh sibling folder and swaps it in only when it is complete.
Before that, `check_replaceable_dir` decides whether the existing `--out` may go: it must be
absent, empty, or recognisably an artifact of this project (a `manifest.json` / `kit.json`
with our format marker, holding only the files it lists, no links or sub-folders); anything
else is refused with one line naming the folder. The swap is atomic (`renameat2`
RENAME_EXCHANGE where the kernel has it), and the old artifact is removed file by file, only
the names that were checked: nothing foreign is ever rmtree'd.

Files (`sdr-export onnx --out model.onnx`, `trt --out model.engine`) follow the same rule via
`check_replaceable_file`: an existing file is replaced only when its sidecar JSON is ours and
records that file's sha256.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from sdr_edge.artifacts.atomic import fsync_dir, sha256_file
from sdr_edge.artifacts.signed import BUNDLE_FORMAT, KIT_FORMAT, MANIFEST, SIGNATURE, is_plain_name
from sdr_edge.errors import SdrEdgeError

log = logging.getLogger(__name__)

# marker file -> (formats it may carry, files that come with it besides the listed ones)
OWN_MARKERS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    MANIFEST: (frozenset({BUNDLE_FORMAT, KIT_FORMAT}), (MANIFEST, SIGNATURE)),
    "kit.json": (frozenset({"sdr-signature-kit"}), ("kit.json",)),  # a run's unsigned kit
    # `sdr-export deepstream --out DIR` (sdr_edge.export.deepstream)
    "sdr_edge_deepstream.json": (frozenset({"sdr-edge-deepstream"}), ("sdr_edge_deepstream.json",)),
}
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class OutputError(SdrEdgeError, ValueError):
    """An output path holds something this command did not write (or cannot be used)."""


def resolve_out(out: str | Path) -> Path:
    """Absolute output path; refuses the root, the current folder and its parents."""
    given = Path(out)
    path = Path(os.path.abspath(given))
    if path == Path(path.anchor):
        raise OutputError(f"{given}: cannot write to the root folder; name a new folder")
    cwd = Path.cwd()
    if cwd == path or cwd.is_relative_to(path):
        raise OutputError(f"{given} ({path}) is the current folder or holds it; name a new "
                          f"folder for the output, e.g. {given / 'bundle'}")
    return path


def owned_names(folder: Path) -> list[str] | None:
    """The files of `folder` if it is an artifact this project wrote, else None."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return None
    names = {e.name for e in entries}
    if any(e.is_symlink() or not e.is_file(follow_symlinks=False) for e in entries):
        return None
    for marker, (formats, companions) in OWN_MARKERS.items():
        if marker not in names:
            continue
        try:
            doc = json.loads((folder / marker).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") not in formats:
            return None
        listed = doc.get("files")
        if not isinstance(listed, dict) or not all(isinstance(n, str) and is_plain_name(n)
                                                   for n in listed):
            return None
        if names <= set(listed) | set(companions):
            return sorted(names)
        return None
    return None


def _foreign(folder: Path, limit: int = 3) -> str:
    names = sorted(os.listdir(folder))
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} entries)" if len(names) > limit else "")
    return shown


def check_replaceable_dir(out: str | Path) -> list[str]:
    """Raise OutputError unless `out` is absent, empty or ours; return the names to replace."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link; refusing to replace it (name a new folder)")
    if not out.exists():
        return []
    if not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; refusing to replace it")
    if not any(os.scandir(out)):
        return []
    names = owned_names(out)
    if names is None:
        raise OutputError(f"{out} is not empty and is not a bundle or kit written by sdr-edge "
                          f"(holds {_foreign(out)}); refusing to replace it: name a new or "
                          "empty folder")
    return names


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _dispose(folder: Path, names: Collection[str]) -> None:
    """Remove an earlier artifact: only the checked names, then the folder if it is empty."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    try:
        folder.rmdir()
    except OSError:
        log.warning("%s was left in place: it holds files that appeared while it was being "
                    "replaced", folder)


def publish_dir(staging: Path, out: Path) -> Path:
    """Move a complete staging folder to `out`, replacing only an earlier artifact of ours."""
    staging, out = Path(staging), Path(out)
    names = check_replaceable_dir(out)  # again: the folder may have changed while we staged
    if out.exists():
        if _exchange(staging, out):
            _dispose(staging, names)  # staging now holds the old artifact
        elif names:
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, aside)  # onto an empty folder we just made
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(aside, out)
                raise
            _dispose(aside, names)
        else:
            try:
                os.replace(staging, out)  # replaces an empty folder atomically
            except OSError as exc:
                raise OutputError(f"{out} changed while the output was written; "
                                  f"nothing was replaced ({exc.strerror})") from exc
    else:
        os.replace(staging, out)
    fsync_dir(out.parent)
    return out


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Check `out`, yield a fresh sibling staging folder, then publish it over `out`.

    On an error the staging folder (which this created) is removed and `out` is untouched.
    """
    out = resolve_out(out)
    check_replaceable_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    published = False
    try:
        yield staging
        publish_dir(staging, out)
        published = True
    finally:
        if not published:
            shutil.rmtree(staging, ignore_errors=True)


def check_replaceable_file(out: str | Path, sidecar: str | Path, formats: Collection[str],
                           sha_key: str) -> None:
    """Raise OutputError unless `out` (and its sidecar) are absent or an earlier output of ours.

    An existing `out` is ours when its sidecar JSON carries one of `formats` and records the
    file's sha256 under `sha_key`; an existing sidecar alone must carry the format.
    """
    out, sidecar = Path(out), Path(sidecar)
    for path in (out, sidecar):
        if path.is_symlink():
            raise OutputError(f"{path} is a symbolic link; refusing to replace it")
        if path.exists() and not path.is_file():
            raise OutputError(f"{path} exists and is not a file; refusing to replace it")
    doc = None
    if sidecar.exists():
        try:
            doc = json.loads(sidecar.read_bytes())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict) or doc.get("format") not in formats:
            raise OutputError(f"{sidecar} exists and was not written by sdr-edge; refusing to "
                              "overwrite it: choose another --out")
    if out.exists() and (doc is None or doc.get(sha_key) != sha256_file(out)):
        raise OutputError(f"{out} exists and was not written by sdr-edge (no {sidecar.name} "
                          "recording its sha256); refusing to overwrite it: choose another --out")
