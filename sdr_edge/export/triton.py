"""A Triton Inference Server model repository for an exported ONNX model.

Layout (Triton's model-repository guide): `REPO/<name>/config.pbtxt`, `REPO/<name>/labels.txt`
and `REPO/<name>/<version>/model.onnx`, served by the ONNX Runtime backend
(`platform: "onnxruntime_onnx"`). Inputs and outputs are read from the graph. With
`max_batch_size > 0` Triton prepends the batch axis itself, so `dims` leave it out; that needs a
dynamic first axis on every input and output, and a fixed-batch graph gets `max_batch_size: 0`
with its full shape.

The config is written as protobuf text by hand, not through `tritonclient`'s `model_config_pb2`:
it is some thirty lines of a stable format, and keeping the writer apart from Triton's schema
lets the test parse it with that schema as an independent check (and the export extra does not
pull in grpcio). A repository is shared with other models, so nothing is staged over it
whole: a new model folder is staged and renamed into place; an earlier one of ours
(`sdr_edge_triton.json` records the sha256 of each file written) gets its version folder
swapped in and its config rewritten atomically. Files this did not write are never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from sdr_edge.artifacts.atomic import atomic_write_text, fsync_dir, sha256_bytes, sha256_file
from sdr_edge.artifacts.staging import OutputError
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.onnx_graph import ModelGraph, TensorInfo, read_model_graph, share_modes

RECORD = "sdr_edge_triton.json"
RECORD_FORMAT = "sdr-edge-triton-model"
CONFIG = "config.pbtxt"
LABELS = "labels.txt"
MODEL_FILE = "model.onnx"  # Triton's default_model_filename for onnxruntime_onnx
KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DEFAULT_MAX_BATCH = 8
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# onnx.TensorProto element type name -> Triton DataType (model_config.proto)
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16", "FLOAT": "TYPE_FP32", "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING", "BFLOAT16": "TYPE_BF16",
}


class TritonExportError(SdrEdgeError, ValueError):
    """Options that do not fit the model, or a model Triton cannot be configured for."""


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None           # default: the ONNX file's stem
    version: int = 1
    max_batch: int | None = None      # None: DEFAULT_MAX_BATCH if batchable, else 0
    dynamic_batching: bool = False
    preferred_batch: tuple[int, ...] | None = None  # None: powers of two up to max_batch
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "auto"
    force: bool = False


@dataclass(frozen=True)
class TritonResult:
    model_dir: Path
    model_path: Path
    config_path: Path
    labels_path: Path | None
    max_batch_size: int
    config_text: str


def model_name(opts: TritonOptions, onnx_path: Path) -> str:
    name = opts.name if opts.name is not None else onnx_path.stem
    if not _NAME.match(name):
        raise TritonExportError(f"--name {name!r}: a Triton model name is a folder name of "
                                "letters, digits, '_', '-' and '.', not starting with '.' or '-'")
    return name


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C-style escapes)."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{out}"'


def _batchable(graph: ModelGraph) -> bool:
    """Triton batches along axis 0 only when every input and output has a dynamic first axis."""
    return all(t.shape and t.shape[0] is None for t in (*graph.inputs, *graph.outputs))


def resolve_max_batch(graph: ModelGraph, opts: TritonOptions) -> int:
    batchable = _batchable(graph)
    default = DEFAULT_MAX_BATCH if batchable else 0
    mb = default if opts.max_batch is None else opts.max_batch
    if mb < 0:
        raise TritonExportError(f"--max-batch must be >= 0, got {mb}")
    if mb > 0 and not batchable:
        fixed = next(t for t in (*graph.inputs, *graph.outputs)
                     if not t.shape or t.shape[0] is not None)
        raise TritonExportError(
            f"{graph.path}: tensor {fixed.name!r} has a fixed first dimension "
            f"({fixed.shape[0] if fixed.shape else 'scalar'}), so Triton cannot batch the model; "
            "pass --max-batch 0, or re-export with `sdr-export onnx --batch dynamic`")
    if opts.dynamic_batching and mb == 0:
        raise TritonExportError("--dynamic-batching needs --max-batch > 0 (and a model with a "
                                "dynamic batch axis)")
    return mb


def preferred_sizes(opts: TritonOptions, max_batch: int) -> list[int]:
    if opts.preferred_batch is None:
        sizes = {max_batch}
        size = 2
        while size < max_batch:
            sizes.add(size)
            size *= 2
        return sorted(sizes)
    bad = [s for s in opts.preferred_batch if not 1 <= s <= max_batch]
    if bad:
        raise TritonExportError(f"--preferred-batch {bad}: sizes must be between 1 and "
                                f"--max-batch {max_batch}")
    return sorted(set(opts.preferred_batch))


def _dims(shape: tuple[int | None, ...]) -> str:
    return "[ " + ", ".join(str(-1 if d is None else d) for d in shape) + " ]"


def _tensor_block(t: TensorInfo, max_batch: int, extra: list[str]) -> list[str]:
    dtype = TRITON_TYPES.get(t.type_name)
    if dtype is None:
        raise TritonExportError(f"tensor {t.name!r} has element type {t.type_name}, which "
                                "Triton's ONNX Runtime backend has no type for")
    shape = t.shape[1:] if max_batch > 0 else t.shape
    lines = [f"    name: {_quote(t.name)}", f"    data_type: {dtype}", *extra]
    if shape:
        lines.append(f"    dims: {_dims(shape)}")
    else:  # a per-sample scalar: Triton wants one dim, reshaped away (model_configuration.md)
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return ["  {", *lines, "  }"]


def _image_format(t: TensorInfo, graph: ModelGraph, max_batch: int) -> list[str]:
    """FORMAT_NCHW / FORMAT_NHWC for the image input (Triton allows it on 3 non-batch dims)."""
    spec = graph.metadata.input_spec
    if max_batch == 0 or len(t.shape) != 4 or t.name != graph.inputs[0].name:
        return []
    c, s = spec.channels, spec.image_size
    if t.shape[1:] == (c, s, s):
        return ["    format: FORMAT_NCHW"]
    if t.shape[1:] == (s, s, c):
        return ["    format: FORMAT_NHWC"]
    return []


def labels_for(graph: ModelGraph) -> str | None:
    """labels.txt (one class name a line, in output order) for a classifier with names."""
    meta = graph.metadata
    names = meta.label_names
    out = graph.outputs[0]
    if meta.output_kind != "logits" or not names or len(graph.outputs) != 1:
        return None
    if out.shape[-1] is not None and out.shape[-1] != len(names):
        raise TritonExportError(f"{graph.path}: {len(names)} label names in the metadata but "
                                f"output {out.name!r} has {out.shape[-1]} classes")
    if any("\n" in n or "\r" in n for n in names):
        raise TritonExportError(f"{graph.path}: a label name holds a line break")
    return "".join(f"{n}\n" for n in names)


def config_text(graph: ModelGraph, name: str, opts: TritonOptions, model_sha256: str,
                has_labels: bool) -> tuple[str, int]:
    """The config.pbtxt text and the max_batch_size it sets."""
    if opts.instances < 1:
        raise TritonExportError(f"--instances must be >= 1, got {opts.instances}")
    if opts.kind not in KINDS:
        raise TritonExportError(f"--kind {opts.kind!r}: one of {', '.join(KINDS)}")
    mb = resolve_max_batch(graph, opts)
    lines = [
        f"# Written by `sdr-export triton` from {graph.path.name} (sha256 {model_sha256}).",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {mb}",
        "input [",
    ]
    blocks = [_tensor_block(t, mb, _image_format(t, graph, mb)) for t in graph.inputs]
    lines += _join_blocks(blocks)
    lines.append("]")
    lines.append("output [")
    label_line = [f"    label_filename: {_quote(LABELS)}"] if has_labels else []
    blocks = [_tensor_block(t, mb, label_line if i == 0 else [])
              for i, t in enumerate(graph.outputs)]
    lines += _join_blocks(blocks)
    lines.append("]")
    lines += ["instance_group [", "  {", f"    count: {opts.instances}",
              f"    kind: {KINDS[opts.kind]}", "  }", "]"]
    if opts.dynamic_batching:
        sizes = ", ".join(str(s) for s in preferred_sizes(opts, mb))
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {sizes} ]",
                  f"  max_queue_delay_microseconds: {int(opts.max_queue_delay_us)}", "}"]
    return "\n".join(lines) + "\n", mb


def _join_blocks(blocks: list[list[str]]) -> list[str]:
    out: list[str] = []
    for i, block in enumerate(blocks):
        out += block[:-1] + [block[-1] + ("," if i < len(blocks) - 1 else "")]
    return out


# --- the repository on disk -------------------------------------------------------------------

def _read_record(model_dir: Path) -> dict[str, list[str]] | None:
    try:
        doc = json.loads((model_dir / RECORD).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
        return None
    files = doc.get("files")
    if not isinstance(files, dict):
        return None
    return {str(k): [str(s) for s in v] for k, v in files.items() if isinstance(v, list)}


def _write_record(model_dir: Path, files: dict[str, list[str]]) -> None:
    doc = {"format": RECORD_FORMAT, "format_version": 1,
           "files": {k: sorted(set(v)) for k, v in sorted(files.items())}}
    atomic_write_text(model_dir / RECORD, json.dumps(doc, indent=2) + "\n")


def _ours(path: Path, rel: str, record: dict[str, list[str]]) -> bool:
    return (path.is_file() and not path.is_symlink()
            and sha256_file(path) in record.get(rel, []))


def _check_model_dir(model_dir: Path, version: int, force: bool) -> dict[str, list[str]] | None:
    """The record of an earlier model folder of ours (None: the folder is absent or empty);
    raises OutputError for anything this must not replace."""
    if model_dir.is_symlink() or (model_dir.exists() and not model_dir.is_dir()):
        raise OutputError(f"{model_dir} exists and is not a folder; refusing to replace it")
    if not model_dir.exists() or not any(os.scandir(model_dir)):
        return None
    record = _read_record(model_dir)
    if record is None:
        raise OutputError(f"{model_dir} holds a model that `sdr-export triton` did not write "
                          f"(no {RECORD}); refusing to change it: choose another --name")
    for rel in (CONFIG, LABELS):
        path = model_dir / rel
        if (path.exists() or path.is_symlink()) and not _ours(path, rel, record):
            raise OutputError(f"{path} was changed after sdr-edge wrote it (or is not its "
                              "file); refusing to overwrite it: move it away first")
    vdir = model_dir / str(version)
    if vdir.is_symlink() or (vdir.exists() and not vdir.is_dir()):
        raise OutputError(f"{vdir} exists and is not a folder; refusing to replace it")
    if vdir.exists() and any(os.scandir(vdir)):
        if not force:
            raise OutputError(f"version {version} already exists ({vdir}); pass --force to "
                              "replace it, or choose another --version")
        for entry in os.scandir(vdir):
            if not _ours(Path(entry.path), f"{version}/{entry.name}", record):
                raise OutputError(f"{entry.path} was not written by sdr-edge; refusing to "
                                  f"replace version {version} (even with --force)")
    return record


def _swap_version(staging: Path, vdir: Path) -> None:
    """Put the staged version folder at `vdir`; an earlier one (checked to be ours) goes."""
    if not vdir.exists():
        os.replace(staging, vdir)
        return
    names = os.listdir(vdir)
    if not names:
        os.replace(staging, vdir)  # over an empty folder: atomic
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{vdir.name}.", suffix=".old", dir=vdir.parent))
    os.replace(vdir, aside)
    try:
        os.replace(staging, vdir)
    except BaseException:
        os.replace(aside, vdir)
        raise
    for name in names:  # only the files that were checked to be ours
        (aside / name).unlink(missing_ok=True)
    aside.rmdir()


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def export_triton(onnx_path: str | Path, repo: str | Path, opts: TritonOptions) -> TritonResult:
    """Write (or add a version to) `repo/<name>` for `onnx_path`; see the module docstring."""
    onnx_path = Path(onnx_path)
    graph = read_model_graph(onnx_path)
    name = model_name(opts, onnx_path)
    if opts.version < 1:
        raise TritonExportError(f"--version must be >= 1 (Triton ignores version 0), got "
                                f"{opts.version}")
    onnx.checker.check_model(graph.proto)
    labels = labels_for(graph)
    model_sha = sha256_file(onnx_path)
    text, mb = config_text(graph, name, opts, model_sha, labels is not None)

    repo = Path(os.path.abspath(repo))
    if repo.exists() and not repo.is_dir():
        raise OutputError(f"{repo} exists and is not a folder (a Triton model repository is one)")
    model_dir = repo / name
    vrel = f"{opts.version}/{MODEL_FILE}"
    new_files = {CONFIG: sha256_bytes(text.encode()), vrel: model_sha}
    if labels is not None:
        new_files[LABELS] = sha256_bytes(labels.encode())
    record = _check_model_dir(model_dir, opts.version, opts.force)
    labels_path = model_dir / LABELS if labels is not None else None

    if record is None:  # a new model: stage the whole folder, rename it into place
        repo.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=repo))
        try:
            (stage / str(opts.version)).mkdir()
            _copy_synced(onnx_path, stage / vrel)
            atomic_write_text(stage / CONFIG, text)
            if labels is not None:
                atomic_write_text(stage / LABELS, labels)
            _write_record(stage, {k: [v] for k, v in new_files.items()})
            share_modes(stage)
            _check_model_dir(model_dir, opts.version, opts.force)  # again: it may have appeared
            os.replace(stage, model_dir)  # onto nothing, or onto an empty folder
            fsync_dir(repo)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    else:  # an earlier model of ours: record first (old and new sums), then the files
        pending = {k: list(v) for k, v in record.items()}
        for rel, sha in new_files.items():
            pending.setdefault(rel, []).append(sha)
        _write_record(model_dir, pending)
        stage = Path(tempfile.mkdtemp(prefix=f".{opts.version}.", suffix=".staging",
                                      dir=model_dir))
        try:
            _copy_synced(onnx_path, stage / MODEL_FILE)
            share_modes(stage)
            _swap_version(stage, model_dir / str(opts.version))
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if labels is not None:
            atomic_write_text(model_dir / LABELS, labels)
        atomic_write_text(model_dir / CONFIG, text)
        final = {k: v for k, v in record.items() if not k.startswith(f"{opts.version}/")}
        final.update({k: [v] for k, v in new_files.items()})
        _write_record(model_dir, final)
        for rel in (CONFIG, LABELS, RECORD):
            if (model_dir / rel).is_file():
                share_modes(model_dir / rel)
        fsync_dir(model_dir)
    return TritonResult(model_dir, model_dir / vrel, model_dir / CONFIG, labels_path, mb, text)
