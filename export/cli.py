"""`sdr-export`: onnx (fp32 / fp16 / int8) and trt (TensorRT engines)."""

from __future__ import annotations

from sdr_edge.cli import run_cli

# Module names from this package's own name (repository layout or installed name).
COMMANDS = {
    "onnx": f"{__package__}.onnx_cmd",
    "trt": f"{__package__}.trt_cmd",
    "triton": f"{__package__}.triton_cmd",
    "deepstream": f"{__package__}.deepstream_cmd",
}


def main(argv: list[str] | None = None) -> int:
    return run_cli("sdr-export", "Export sub-net bundles for devices: ONNX and TensorRT.",
                   COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
