"""A DeepStream Gst-nvinfer config (and labels file) for an exported ONNX model.

nvinfer preprocesses every frame itself as `y = net-scale-factor * (x - offsets[c])` on 0..255
pixels (DeepStream's Gst-nvinfer guide), while our graphs take `(x / 255 - mean[c]) / std[c]`.
So `offsets[c] = 255 * mean[c]` and `net-scale-factor = 1 / (255 * std)`, exact when the model
has one std for all channels (every 1-channel model, and 3-channel ones normalised with one
std). nvinfer has only one scale factor: with per-channel stds, no value is exact. The one
that minimises the worst relative error is `1 / (255 * (min std + max std) / 2)`, off by
`(max - min) / (max + min)` on the extreme channels; this refuses unless the caller accepts that
error (`max_scale_error`), and records it in a comment of the config when accepted.

Images are decoded by OpenCV, so a 3-channel model was trained on BGR channel order:
`model-color-format=1` (BGR), `2` (GRAY) for 1 channel. Classifier logits go through a
Softmax appended to a copy of the graph, because nvinfer's built-in classifier parser reads the
output as probabilities and compares the best one with `classifier-threshold`; a features model
is `network-type=100` with `output-tensor-meta=1` (the raw tensor is attached to the metadata).
The folder is staged and swapped in (`sdr_edge.artifacts.staging`).

Keys and values follow DeepStream's gstnvinfer_property_parser.h: network-mode 0 FP32,
1 INT8, 2 FP16; network-type 1 classifier; process-mode 1 primary (full frame), 2 secondary
(objects of another GIE); network-input-order 0 NCHW; infer-dims C;H;W.
"""

from __future__ import annotations

import configparser
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.staging import staged_dir
from sdr_edge.errors import SdrEdgeError
from sdr_edge.export.onnx_graph import ModelGraph, read_model_graph, share_modes

CONFIG_NAME = "config_infer.txt"
LABELS_NAME = "labels.txt"
MODEL_NAME = "model.onnx"
MARKER = "sdr_edge_deepstream.json"
MARKER_FORMAT = "sdr-edge-deepstream"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}
COLOR_FORMAT = {1: 2, 3: 1}  # channels -> 2 GRAY, 1 BGR (0 would be RGB)
PROCESS_MODE = {"primary": 1, "secondary": 2}
PROB_OUTPUT = "probabilities"
STD_EXACT = 1e-6  # relative: stds this close are one std (float rounding of the stats)


class DeepStreamExportError(SdrEdgeError, ValueError):
    """A model or option that an nvinfer config cannot express."""


@dataclass(frozen=True)
class DeepStreamOptions:
    precision: str | None = None  # None: the model's own precision
    batch: int = 1
    process_mode: str = "primary"
    gie_id: int = 1
    gpu_id: int = 0
    threshold: float = 0.5
    max_scale_error: float = 0.0  # accepted relative error of the single net-scale-factor


@dataclass(frozen=True)
class Normalisation:
    scale: float
    offsets: tuple[float, ...]
    max_rel_error: float  # of the scale, worst channel


@dataclass(frozen=True)
class DeepStreamResult:
    out: Path
    config_path: Path
    labels_path: Path | None
    model_path: Path
    properties: dict[str, str] = field(default_factory=dict)


def nvinfer_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> Normalisation:
    """offsets and the single scale that map 0..255 pixels to (x/255 - mean)/std (see above)."""
    if any(s <= 0 for s in std):
        raise DeepStreamExportError(f"std {std} must be positive")
    lo, hi = min(std), max(std)
    mid = (lo + hi) / 2
    err = (hi - lo) / (hi + lo)
    return Normalisation(1.0 / (255.0 * mid), tuple(255.0 * m for m in mean),
                         0.0 if err <= STD_EXACT else err)


def _precision(graph: ModelGraph, opts: DeepStreamOptions) -> str:
    """nvinfer's network mode. Whether the model is int8, and for which runtime, is read from
    its Q/DQ nodes, as the TensorRT builder reads it: metadata can be edited, the graph is
    what TensorRT builds."""
    meta = graph.metadata
    precision = opts.precision or meta.precision
    if precision not in NETWORK_MODE:
        raise DeepStreamExportError(f"--precision {precision!r}: one of fp32, fp16, int8")
    refusal = graph.tensorrt_int8_refusal()
    if refusal:
        raise DeepStreamExportError(refusal)
    quantized = graph.activation_quant_types
    if quantized and precision != "int8":
        raise DeepStreamExportError(f"{graph.path} is an int8 (Q/DQ) graph: TensorRT "
                                    "builds it in network-mode int8 only (--precision int8)")
    if not quantized and precision == "int8":
        raise DeepStreamExportError(
            f"{graph.path} has no Q/DQ nodes ({meta.precision}): nvinfer int8 would need a "
            "calibration cache; export an explicitly quantized graph instead (`sdr-export "
            "onnx --precision int8 --int8-target tensorrt`) and pass that")
    return precision


def _check_input(graph: ModelGraph) -> tuple[int, int, int]:
    spec = graph.metadata.input_spec
    if len(graph.inputs) != 1:
        raise DeepStreamExportError(f"{graph.path}: {len(graph.inputs)} inputs; nvinfer feeds "
                                    "one image tensor")
    t = graph.inputs[0]
    if t.type_name not in ("FLOAT", "FLOAT16"):
        raise DeepStreamExportError(
            f"{graph.path}: input {t.name!r} is {t.type_name}; nvinfer feeds float planar "
            "images and normalises them itself: pass the normalised-input graph (not "
            "--raw-input)")
    chw = (spec.channels, spec.image_size, spec.image_size)
    if len(t.shape) != 4 or t.shape[1:] != chw:
        raise DeepStreamExportError(f"{graph.path}: input {t.name!r} has shape {t.shape}, not "
                                    f"N x {chw[0]} x {chw[1]} x {chw[2]} as its metadata says")
    if spec.channels not in COLOR_FORMAT:
        raise DeepStreamExportError(f"{graph.path}: {spec.channels} channels; nvinfer takes "
                                    "1 (GRAY) or 3 (BGR/RGB)")
    return chw


def _check_batch(graph: ModelGraph, batch: int) -> None:
    if batch < 1:
        raise DeepStreamExportError(f"--batch must be >= 1, got {batch}")
    fixed = graph.inputs[0].shape[0]
    if fixed is not None and fixed != batch:
        raise DeepStreamExportError(f"{graph.path} has a fixed batch of {fixed}; pass --batch "
                                    f"{fixed} or export with a dynamic batch")


def with_softmax(proto: onnx.ModelProto, logits: str) -> onnx.ModelProto:
    """A copy of the graph whose only output is Softmax(logits) over the class axis."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    old = next(o for o in graph.output if o.name == logits)
    node = helper.make_node("Softmax", [logits], [PROB_OUTPUT], axis=-1,
                            name="sdr_edge_deepstream_softmax")
    graph.node.append(node)
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = PROB_OUTPUT
    del graph.output[:]
    graph.output.append(new)
    onnx.checker.check_model(model)
    return model


def labels_line(graph: ModelGraph) -> str | None:
    """nvinfer's classifier label file: one line per output layer, labels split by ';'."""
    names = graph.metadata.label_names
    if graph.metadata.output_kind != "logits" or not names:
        return None
    classes = graph.outputs[0].shape[-1]
    if classes is not None and classes != len(names):
        raise DeepStreamExportError(f"{graph.path}: {len(names)} label names in the metadata "
                                    f"but {classes} classes in output {graph.outputs[0].name!r}")
    bad = [n for n in names if ";" in n or "\n" in n or "\r" in n]
    if bad:
        raise DeepStreamExportError(f"{graph.path}: label {bad[0]!r} holds ';' or a line "
                                    "break, which nvinfer's label file cannot carry")
    return ";".join(names) + "\n"


def _fmt(x: float) -> str:
    return repr(float(x))  # shortest string that reads back to the same double


def build_config(graph: ModelGraph, opts: DeepStreamOptions
                 ) -> tuple[dict[str, str], list[str], bool, bool]:
    """(properties, comment lines, append a Softmax, write a labels file)."""
    precision = _precision(graph, opts)
    c, h, w = _check_input(graph)
    _check_batch(graph, opts.batch)
    if opts.process_mode not in PROCESS_MODE:
        raise DeepStreamExportError(f"--process-mode {opts.process_mode!r}: primary or "
                                    "secondary")
    spec = graph.metadata.input_spec
    norm = nvinfer_normalisation(spec.mean, spec.std)
    comments = [f"Written by `sdr-export deepstream` from {graph.path.name} "
                f"(sha256 {sha256_file(graph.path)}).",
                f"Model normalisation: (x / 255 - mean) / std, mean {list(spec.mean)}, "
                f"std {list(spec.std)}, channel order {'GRAY' if c == 1 else 'BGR'}."]
    if norm.max_rel_error > 0:
        if norm.max_rel_error > opts.max_scale_error:
            raise DeepStreamExportError(
                f"{graph.path}: the model's std differs per channel {list(spec.std)}, but "
                "nvinfer has one net-scale-factor for all channels; the closest one is off by "
                f"up to {norm.max_rel_error:.3%} on the extreme channels. Pass "
                f"--max-scale-error {norm.max_rel_error:.4g} to accept that, or use a model "
                "normalised with one std")
        comments.append(f"APPROXIMATE: one net-scale-factor for per-channel std: relative "
                        f"error up to {norm.max_rel_error:.4%} (accepted, limit "
                        f"{opts.max_scale_error:.4g}).")
    classifier = graph.metadata.output_kind == "logits"
    labels = labels_line(graph) is not None
    engine = f"{MODEL_NAME}_b{opts.batch}_gpu{opts.gpu_id}_{precision}.engine"
    props = {
        "gpu-id": str(opts.gpu_id),
        "onnx-file": MODEL_NAME,
        "model-engine-file": engine,
        "batch-size": str(opts.batch),
        "network-mode": str(NETWORK_MODE[precision]),
        "net-scale-factor": _fmt(norm.scale),
        "offsets": ";".join(_fmt(o) for o in norm.offsets),
        "model-color-format": str(COLOR_FORMAT[c]),
        "infer-dims": f"{c};{h};{w}",
        "network-input-order": "0",
        "gie-unique-id": str(opts.gie_id),
        "process-mode": str(PROCESS_MODE[opts.process_mode]),
    }
    if classifier:
        props.update({"network-type": "1", "output-blob-names": PROB_OUTPUT,
                      "classifier-threshold": _fmt(opts.threshold)})
        if labels:
            props["labelfile-path"] = LABELS_NAME
        comments.append(f"Output {PROB_OUTPUT!r}: Softmax appended to the graph's "
                        f"{graph.outputs[0].name!r} (nvinfer's classifier reads probabilities).")
    else:
        props.update({"network-type": "100", "output-tensor-meta": "1",
                      "output-blob-names": ";".join(o.name for o in graph.outputs)})
    comments.append(f"model-engine-file is the name nvinfer gives the engine it builds from "
                    f"onnx-file on first run ({precision}, batch {opts.batch}); it is reused "
                    "afterwards.")
    return props, comments, classifier, labels


def render(props: dict[str, str], comments: list[str]) -> str:
    head = "".join(f"# {line}\n" for line in comments)
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keys keep their case
    cp["property"] = props
    buf = io.StringIO()
    cp.write(buf, space_around_delimiters=False)
    return head + buf.getvalue()


def export_deepstream(onnx_path: str | Path, out: str | Path,
                      opts: DeepStreamOptions) -> DeepStreamResult:
    """Write `out/` with model.onnx (Softmax appended for classifiers), config_infer.txt and
    labels.txt; see the module docstring."""
    graph = read_model_graph(onnx_path)
    props, comments, softmax, labels = build_config(graph, opts)
    model = with_softmax(graph.proto, graph.outputs[0].name) if softmax else graph.proto
    text = render(props, comments)
    with staged_dir(out) as stage:
        onnx.save(model, str(stage / MODEL_NAME))
        (stage / CONFIG_NAME).write_text(text, encoding="utf-8")
        files = [MODEL_NAME, CONFIG_NAME]
        if labels:
            (stage / LABELS_NAME).write_text(labels_line(graph) or "", encoding="utf-8")
            files.append(LABELS_NAME)
        marker = {"format": MARKER_FORMAT, "format_version": 1,
                  "files": {n: sha256_file(stage / n) for n in files},
                  "source_onnx_sha256": sha256_file(graph.path)}
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        share_modes(stage)
    out = Path(out)
    return DeepStreamResult(out, out / CONFIG_NAME, out / LABELS_NAME if labels else None,
                            out / MODEL_NAME, props)

