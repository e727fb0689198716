"""Export for devices: ONNX (fp32/fp16/int8) checked against PyTorch, TensorRT engines.

Submodules are imported where used: `metadata`, `parity` and `quantize` need no torch, so the
device-side inference path can read model metadata without it.
"""
