"""`sdr-export`: onnx (fp32 / fp16 / int8), trt (TensorRT engines), triton and deepstream
(serving configs)."""

from __future__ import annotations

from sdr_edge.cli import run_cli

# Module names from this package's own name (repository layout or installed name):
# sub-command `x` lives in `<package>.x_cmd`.
COMMANDS = {name: f"{__package__}.{name}_cmd" for name in ("onnx", "trt", "triton", "deepstream")}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-export", "Export sub-net bundles for devices: ONNX and TensorRT.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
