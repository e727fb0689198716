"""What an exported model carries about itself: input spec, route, precision, provenance.

The same JSON goes into the ONNX model's `metadata_props` (so the file alone is enough on a
device) and into a sidecar `model.json` (readable without ONNX tooling). It lives in the
artifacts layer because `sdr_edge.export` writes it and `sdr_edge.inference` reads it: both
import this module, and inference never imports export. It imports neither torch nor onnx:
the inference path reads it back from ONNX Runtime's metadata map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdr_edge.data.preprocess import InputSpec
from sdr_edge.errors import SdrEdgeError

METADATA_KEY = "sdr_edge"
METADATA_FORMAT = "sdr-edge-model"
METADATA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_KINDS = ("logits", "features")


class MetadataError(SdrEdgeError, ValueError):
    """A model's sdr-edge metadata is missing or malformed."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a device needs to feed the model and name its outputs."""

    input_spec: InputSpec
    route: tuple[int, ...]
    precision: str
    output_kind: str
    input_name: str = "input"
    output_name: str = "logits"
    batch: str | int = "dynamic"
    opset: int = 18
    bundle_sha256: str = ""
    bundle_weights_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise MetadataError(f"unknown precision {self.precision!r} ({', '.join(PRECISIONS)})")
        if self.output_kind not in OUTPUT_KINDS:
            raise MetadataError(f"unknown output kind {self.output_kind!r} (logits or features)")

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.input_spec.label_names

    def to_dict(self) -> dict:
        return {
            "format": METADATA_FORMAT,
            "format_version": METADATA_VERSION,
            "input_spec": self.input_spec.to_dict(),
            "route": [int(v) for v in self.route],
            "precision": self.precision,
            "output_kind": self.output_kind,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "batch": self.batch,
            "opset": int(self.opset),
            "bundle_sha256": self.bundle_sha256,
            "bundle_weights_sha256": self.bundle_weights_sha256,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelMetadata:
        if d.get("format") != METADATA_FORMAT:
            raise MetadataError(f"not sdr-edge model metadata (format {d.get('format')!r})")
        if int(d.get("format_version", -1)) > METADATA_VERSION:
            raise MetadataError(f"metadata version {d.get('format_version')} is newer than this "
                                f"sdr-edge understands ({METADATA_VERSION}); upgrade sdr-edge")
        try:
            batch = d.get("batch", "dynamic")
            return cls(
                input_spec=InputSpec.from_dict(d["input_spec"]),
                route=tuple(int(v) for v in d.get("route", ())),
                precision=str(d["precision"]),
                output_kind=str(d["output_kind"]),
                input_name=str(d.get("input_name", "input")),
                output_name=str(d.get("output_name", "logits")),
                batch=batch if batch == "dynamic" else int(batch),
                opset=int(d.get("opset", 18)),
                bundle_sha256=str(d.get("bundle_sha256", "")),
                bundle_weights_sha256=str(d.get("bundle_weights_sha256", "")),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, MetadataError):
                raise
            raise MetadataError(f"malformed sdr-edge metadata: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def metadata_from_props(props: dict[str, str], source: str = "model") -> ModelMetadata:
    """Parse the `sdr_edge` entry of an ONNX metadata_props map (or ORT's custom_metadata_map)."""
    raw = props.get(METADATA_KEY)
    if raw is None:
        raise MetadataError(
            f"{source} has no '{METADATA_KEY}' metadata: it was not exported by `sdr-export onnx` "
            "(its input size, normalisation and label names are unknown)"
        )
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{source}: '{METADATA_KEY}' metadata is not JSON ({exc})") from exc
    return ModelMetadata.from_dict(d)


def sidecar_path(model_path: str | Path) -> Path:
    """`model.onnx` -> `model.json`: the sidecar written next to an exported ONNX model."""
    return Path(model_path).with_suffix(".json")


def engine_metadata_path(engine_path: str | Path) -> Path:
    """`model.engine` -> `model.engine.json` (kept apart from the ONNX sidecar of the same stem)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def sidecar_document(meta: ModelMetadata, model_sha256: str, checks: list[dict]) -> dict:
    """The sidecar JSON: the embedded metadata plus the model's checksum and its parity checks."""
    return {**meta.to_dict(), "model_sha256": model_sha256, "checks": checks}


def read_sidecar(path: str | Path) -> tuple[ModelMetadata, dict]:
    """Metadata and the whole document of a sidecar JSON file."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: not a JSON document ({exc})") from exc
    meta = doc.get("model_metadata", doc) if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise MetadataError(f"{path}: expected a JSON object")
    return ModelMetadata.from_dict(meta), doc
