"""Export for devices: ONNX (fp32/fp16/int8) checked against PyTorch, TensorRT engines.

Submodules are imported where used: `parity` and `quantize` need no torch. The model metadata
export writes is `sdr_edge.artifacts.model_metadata`, which the device-side inference path reads
without importing export (or torch).
"""
