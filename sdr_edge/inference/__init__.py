"""On-device inference: ONNX Runtime or TensorRT by file type, OpenCV preprocessing, no torch."""
