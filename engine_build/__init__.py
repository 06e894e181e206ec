"""Checkpoint -> model bundle (ONNX, TensorRT FP16 plan, parity report) and its runtime."""
